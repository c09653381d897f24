"""Token ids to streamed text: incremental detokenization plus stop strings.

`TextStream` is a pure function of the ids fed one at a time: the text it
has released after token i never depends on step boundaries or on which
scheduler instance fed it. That is what lets a re-submitted request continue
the client's text exactly (replay the ids it holds, then go on).
"""

from __future__ import annotations

from collections.abc import Sequence

from text.tokenizer import Tokenizer


class TextStream:
    """Releases text as ids arrive, holding back an incomplete UTF-8 character
    and any tail that could still become a stop string."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self._detok = tokenizer.detokenizer(prompt_ids)
        self._stop = tuple(stop)
        self._held = ""  # decoded, not yet released
        self.text = ""  # released so far
        self.stopped = False  # a stop string matched; nothing more is released

    def feed(self, token: int) -> str:
        """Add one generated id; return the newly released text."""
        if self.stopped:
            return ""
        return self._release(self._detok.feed(token), final=False)

    def finish(self) -> str:
        """The sequence ended for a reason other than a stop string: release
        everything held (still cut at a stop string that completes now)."""
        if self.stopped:
            return ""
        return self._release(self._detok.flush(), final=True)

    def _release(self, new: str, *, final: bool) -> str:
        buf = self._held + new
        if not buf:
            return ""
        if not self._stop:  # nothing to hold back but an incomplete character (the detokenizer's)
            self._held = ""
            self.text += buf
            return buf
        cut = _first_stop(buf, self._stop)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            out = buf[:cut]
        else:
            keep = 0 if final else _partial_stop(buf, self._stop)
            out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in `text`, or -1.

    Released text never ends in the start of a stop string, so a match
    cannot begin before the held part: searching the buffer is enough."""
    best = -1
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
