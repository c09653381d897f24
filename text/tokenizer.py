"""Text <-> token ids, and streaming text out of a growing list of ids.

Torch-free on purpose (the scheduler and gateway detokenize). Two tokenizers:
`ByteTokenizer` (the demo model: one id per byte plus bos/eos) and
`HFTokenizer` (a tokenizer.json read with the `tokenizers` library).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from text.errors import CheckpointError

BYTE_TOKENIZER_FILE = "llmos_tokenizer.json"


class Tokenizer(ABC):
    """What the rest of llmos needs from a tokenizer.

    `vocab_size` counts the ids `decode` understands (ids 0..vocab_size-1); a
    model's embedding table may be padded past it, and the runner never
    samples the padding.
    """

    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    chat_template: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids)


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are the bytes of the UTF-8 text; then bos and eos."""

    def __init__(self, bos_token_id: int = 256, eos_token_id: int = 257):
        if {bos_token_id, eos_token_id} != {256, 257}:
            raise CheckpointError("byte tokenizer: bos/eos ids must be 256 and 257")
        self.bos_token_id = bos_token_id
        self.eos_token_ids = (eos_token_id,)

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        try:
            return bytes(ids).decode("utf-8", errors="replace")  # all bytes: the usual case, in C
        except ValueError:
            pass  # a special id (or one out of range) among them
        data = bytearray()
        for i in ids:
            if 0 <= i < 256:
                data.append(i)
            elif not skip_special_tokens:
                data += b"<s>" if i == self.bos_token_id else b"</s>" if i in self.eos_token_ids else b""
        return data.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (tokenizer.json)."""

    def __init__(self, path: str | Path, *, eos_token_ids: Sequence[int] = (),
                 bos_token_id: int | None = None, special: dict[str, Any] | None = None,
                 text: str | None = None):
        """`text`: the tokenizer.json's contents, sent over the wire (then
        `path` only names where they came from in errors)."""
        from tokenizers import Tokenizer as _Tok  # kept local: only this class needs it

        self.path = Path(path)
        try:
            self._tok = _Tok.from_str(text) if text is not None else _Tok.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"{self.path}: not a valid tokenizer.json ({exc})",
                                  detail={"file": str(self.path)}) from None
        special = special or {}
        eos = list(eos_token_ids)
        named_eos = self._id_of(special.get("eos_token"))
        if named_eos is not None and named_eos not in eos:
            eos.append(named_eos)
        self.eos_token_ids = tuple(eos)
        named_bos = self._id_of(special.get("bos_token"))
        self.bos_token_id = bos_token_id if bos_token_id is not None else named_bos
        template = special.get("chat_template")
        self.chat_template = template if isinstance(template, str) else None

    def _id_of(self, token: Any) -> int | None:
        # tokenizer_config.json writes a special token as a string or as
        # {"content": "..."}.
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        found: int | None = self._tok.token_to_id(token)
        return found

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas.

    A token can end in the middle of a UTF-8 character (byte-level BPE, byte
    fallback, the byte tokenizer), and some tokenizers only know whether a
    token starts with a space from the token before it. So each delta is the
    decode of a short window of recent ids minus the decode of the window's
    already-emitted prefix, and a delta ending in U+FFFD (an incomplete
    character) is held back until the next id completes it. The same scheme as
    Hugging Face TGI and vLLM.
    """

    # Ids of context kept before the first new one (sentencepiece spacing).
    _CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-self._CONTEXT:]) if prompt_ids else []
        self._prefix = 0
        self._read = len(self._ids)

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add generated ids; return the text they complete (may be "")."""
        if isinstance(ids, int):
            self._ids.append(ids)
        else:
            self._ids.extend(ids)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        delta = text[len(prefix_text):]
        # Keep only the ids still needed as context for the next delta.
        self._ids = self._ids[self._read:]
        self._prefix, self._read = 0, len(self._ids)
        return delta

    def flush(self) -> str:
        """At the end of a sequence: whatever was held back, as decoded."""
        if self._read == len(self._ids):
            return ""  # nothing held back: nothing to decode
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(prefix_text):] if len(text) > len(prefix_text) else ""


def load_tokenizer(model_dir: str | Path, *, eos_token_ids: Sequence[int] = (),
                   bos_token_id: int | None = None) -> Tokenizer:
    """The tokenizer stored in a model directory: tokenizer.json (with
    tokenizer_config.json for special tokens and the chat template, if
    present), or the byte tokenizer's marker file."""
    root = Path(model_dir)
    hf = root / "tokenizer.json"
    if hf.is_file():
        special: dict[str, Any] = {}
        cfg = root / "tokenizer_config.json"
        if cfg.is_file():
            try:
                loaded = json.loads(cfg.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{cfg}: not readable JSON ({exc})",
                                      detail={"file": str(cfg)}) from None
            special = loaded if isinstance(loaded, dict) else {}
        return HFTokenizer(hf, eos_token_ids=eos_token_ids, bos_token_id=bos_token_id,
                           special=special)
    marker = root / BYTE_TOKENIZER_FILE
    if marker.is_file():
        try:
            spec = json.loads(marker.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{marker}: not readable JSON ({exc})",
                                  detail={"file": str(marker)}) from None
        if not isinstance(spec, dict) or spec.get("type") != "byte":
            raise CheckpointError(f"{marker}: expected {{\"type\": \"byte\", ...}}",
                                  detail={"file": str(marker)})
        return ByteTokenizer(int(spec.get("bos_token_id", 256)), int(spec.get("eos_token_id", 257)))
    raise CheckpointError(f"{hf}: missing (a model directory needs tokenizer.json)",
                          detail={"file": str(hf)})
