"""The choices of one completion (`n`, `best_of`) and their tokens'
log-probabilities, in OpenAI's schema.

`n` > 1 sends one Submit per choice naming one fork group
(`sdk.generate.fork_submits`): the scheduler computes the prompt once and
the choices fork its KV blocks. `best_of` k (completions) runs k choices
and returns the n whose tokens have the highest mean log-probability, as
OpenAI does. Usage counts the prompt once, every choice's tokens, and (an
llmos extra, `prefill_tokens`) the prompt tokens actually computed for the
whole request: with a fork, the shared prefix once plus one per choice.
"""

from __future__ import annotations

from contextlib import suppress
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

import anyio

from ipc.errors import LlmosError
from ipc.protocol.scheduler import Usage
from sdk.generate import Chunk, Completion, GenerationStream, collect
from text.tokenizer import Tokenizer

Release = Callable[[GenerationStream], Awaitable[None]]
MAX_PIECES = 1 << 16  # token texts kept per tokenizer


class Pieces:
    """A token id as the text OpenAI's logprobs show: the token decoded alone."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        piece = self._cache.get(token)
        if piece is None:
            piece = self._tok.decode([token], skip_special_tokens=False)
            if len(self._cache) < MAX_PIECES:
                self._cache[token] = piece
        return piece


Tops = Sequence[Sequence[tuple[int, float]]]


def completion_logprobs(pieces: Pieces, ids: Sequence[int], lps: Sequence[float], tops: Tops,
                        text_offset: int = 0) -> dict[str, Any]:
    """/v1/completions' `logprobs` object for these tokens."""
    tokens = [pieces(t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    top = [_alternatives(pieces, alts) for _, alts in zip_longest(ids, tops[:len(ids)], fillvalue=())]
    return {"tokens": tokens, "token_logprobs": list(lps[:len(ids)]), "top_logprobs": top, "text_offset": offsets}


def _alternatives(pieces: Pieces, alts: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Text -> logprob, most likely first; tokens whose texts coincide (half
    a UTF-8 character decodes alone to U+FFFD) keep the likelier one."""
    out: dict[str, float] = {}
    for t, lp in alts:
        out.setdefault(pieces(t), lp)
    return out


def chat_logprobs(pieces: Pieces, ids: Sequence[int], lps: Sequence[float], tops: Tops) -> dict[str, Any]:
    """/v1/chat/completions' `logprobs` object (`content`) for these tokens."""
    def entry(token: int, lp: float) -> dict[str, Any]:
        text = pieces(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
               for t, lp, alts in zip(ids, lps, [*tops, *[()] * (len(ids) - len(tops))])]
    return {"content": content, "refusal": None}


def usage_json(usages: Sequence[Usage | None]) -> dict[str, Any]:
    """OpenAI's usage for the choices of one request: the prompt once, the
    choices' tokens summed, cached tokens (prefix-cache hits), and
    `prefill_tokens`: prompt tokens computed, the fork group's shared
    prefix counted once."""
    us = [u or Usage() for u in usages]
    prompt = us[0].prompt_tokens
    completion = sum(u.completion_tokens for u in us)
    prefill = max(u.forked_tokens for u in us) + sum(u.prompt_tokens - u.cached_tokens - u.forked_tokens for u in us)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(u.cached_tokens for u in us)},
            "prefill_tokens": prefill}


def best(results: list[Completion], n: int) -> list[Completion]:
    """best_of: the `n` results with the highest mean token log-probability, in their order."""
    def mean(c: Completion) -> float:
        return sum(c.logprobs) / len(c.logprobs) if c.logprobs else float("-inf")

    keep = sorted(range(len(results)), key=lambda i: mean(results[i]), reverse=True)[:n]
    return [results[i] for i in sorted(keep)]


async def gather(streams: list[GenerationStream], release: Release) -> list[Completion]:
    """Every stream read to its end, concurrently; the first failure
    cancels the others and is raised."""
    out: list[Completion | None] = [None] * len(streams)
    failed: list[LlmosError] = []

    async def one(i: int, scope: anyio.CancelScope) -> None:
        try:
            out[i] = await collect(streams[i])
        except LlmosError as exc:
            failed.append(exc)
            scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await release(streams[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(streams)):
            tg.start_soon(one, i, tg.cancel_scope)
    if failed:
        raise failed[0]
    return [c for c in out if c is not None]


async def merged(streams: list[GenerationStream], release: Release) -> AsyncIterator[tuple[int, Chunk | LlmosError]]:
    """The chunks of every stream as they come, tagged with the stream's
    index; a stream's failure comes as its error (the caller stops there).
    Leaving early releases every stream."""
    send, recv = anyio.create_memory_object_stream[tuple[int, Chunk | LlmosError]](len(streams))

    async def pump(i: int, out: Any) -> None:
        async with out:
            try:
                async for c in streams[i]:
                    await out.send((i, c))
            except LlmosError as exc:
                with suppress(anyio.BrokenResourceError):
                    await out.send((i, exc))
            except anyio.BrokenResourceError:
                pass  # the reader left
            finally:
                with anyio.CancelScope(shield=True):
                    await release(streams[i])

    async with anyio.create_task_group() as tg:
        async with send:
            for i in range(len(streams)):
                tg.start_soon(pump, i, send.clone())
        try:
            async for item in recv:
                yield item
        finally:
            tg.cancel_scope.cancel()
            recv.close()


@dataclass
class Shape:
    """What one request's answer looks like: chat or completion, how many
    choices (`best_of` run, `n` returned), and whether logprobs are shown
    (`pieces`: the model's token texts, then)."""

    chat: bool
    model: str
    n: int = 1
    best_of: int = 1
    pieces: Pieces | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def runs(self) -> int:
        return max(self.n, self.best_of)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def id(self, rid: str) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{rid}"

    def logprobs(self, ids: Sequence[int], lps: Sequence[float], tops: Tops, text_offset: int = 0) -> Any:
        if self.pieces is None:
            return None
        if self.chat:
            return chat_logprobs(self.pieces, ids, lps, tops)
        return completion_logprobs(self.pieces, ids, lps, tops, text_offset)

    def body(self, rid: str, results: list[Completion]) -> dict[str, Any]:
        """The whole (not streamed) answer: `n` choices of the `best_of` results."""
        shown = best(results, self.n) if len(results) > self.n else results
        choices = []
        for i, c in enumerate(shown):
            lp = self.logprobs(c.token_ids, c.logprobs, c.top_logprobs)
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                                "finish_reason": str(c.finish_reason)})
            else:
                choices.append({"text": c.text, "index": i, "logprobs": lp, "finish_reason": str(c.finish_reason)})
        return {"id": self.id(rid), "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_json([c.usage for c in results])}

    def chunk(self, rid: str, index: int, c: Chunk, text_offset: int, *, first: bool = False) -> dict[str, Any]:
        """One streamed event of choice `index` (`first`: a chat choice's opening, its role)."""
        finish = str(c.finish_reason) if c.finish_reason is not None else None
        lp = self.logprobs(c.token_ids, c.logprobs, c.top_logprobs, text_offset) if c.token_ids else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {"content": c.text} if c.text else {}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"text": c.text, "index": index, "logprobs": lp, "finish_reason": finish}
        return {"id": self.id(rid), "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [choice]}

    def usage_chunk(self, rid: str, usages: Sequence[Usage | None]) -> dict[str, Any]:
        return {"id": self.id(rid), "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [], "usage": usage_json(usages)}
