"""What a request must pass before it waits in line: the model's context
and vocabulary, and the waiting line's bounds. Pure checks; the engine
calls them from `submit`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.config.scheduler import SchedulerConfig
from ipc.errors import BadRequest, Overloaded, Unavailable
from ipc.protocol import scheduler as sp
from services.scheduler._request import Seq
from services.scheduler.planner import PoolShape
from text.tokenizer import Tokenizer

# A text prompt longer than the model's context times this many characters
# cannot fit in any tokenization and is refused before it is tokenized (real
# tokenizers average 3-5 characters a token; 32 leaves room for long runs of
# whitespace or repeated characters that merge into one token).
CHARS_PER_TOKEN = 32


@dataclass(frozen=True, slots=True)
class Model:
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    max_model_len: int
    vocab_size: int = 0  # the model's embedding rows (0: the tokenizer's vocabulary)

    @property
    def max_prompt_chars(self) -> int:
        return self.max_model_len * CHARS_PER_TOKEN

    @property
    def num_ids(self) -> int:
        """Token ids the model takes: 0 .. num_ids - 1."""
        return self.vocab_size or self.tokenizer.vocab_size


def check_prompt_size(model: Model | None, msg: sp.Submit) -> None:
    """Refuse a prompt that cannot fit the model, before anything reads
    it (O(1)): ids past the context, text past it whatever its
    tokenization."""
    if model is not None and len(msg.prompt_ids) >= model.max_model_len:
        raise BadRequest(f"the prompt has {len(msg.prompt_ids)} ids; this model takes at most "
                         f"{model.max_model_len - 1} before the first generated one",
                         detail={"field": "prompt_ids"})
    if model is not None and len(msg.prompt) > model.max_prompt_chars:
        raise BadRequest(f"the prompt has {len(msg.prompt)} characters; this model takes at most "
                         f"{model.max_prompt_chars} ({model.max_model_len} tokens of context x "
                         f"{CHARS_PER_TOKEN} characters)", detail={"field": "prompt"})


def tokenize(model: Model | None, msg: sp.Submit) -> list[int]:
    """The prompt's ids (size-checked first). Blocking for a long prompt."""
    if model is None:
        raise Unavailable("the scheduler has no model yet (no driver is up)")
    check_prompt_size(model, msg)
    if msg.prompt_ids:
        return list(msg.prompt_ids)
    return model.tokenizer.encode(msg.prompt, add_special_tokens=msg.add_special_tokens)


def check_fits(model: Model, shapes: Mapping[str, PoolShape], prompt: list[int], resume_ids: list[int]) -> int:
    """The positions a sequence of this prompt may reach: the model's
    context, or the largest driver's KV pool (a sequence must fit one on its
    own, or it could only ever preempt itself). Checked before any loop over
    the ids, which must then be in the model's vocabulary."""
    room = min(model.max_model_len, max((s.num_blocks * s.block_size for s in shapes.values()),
                                        default=model.max_model_len))
    if len(prompt) + 1 > room:
        what = "the model takes" if room == model.max_model_len else "the largest driver's KV cache holds"
        raise BadRequest(f"the prompt has {len(prompt)} tokens; {what} at most "
                         f"{room - 1} before the first generated one", detail={"field": "prompt"})
    check_ids(model, prompt, "prompt_ids")
    check_ids(model, resume_ids, "resume_ids")
    return room


def check_ids(model: Model, ids: list[int], field: str) -> None:
    n = model.num_ids
    bad = next((t for t in ids if not 0 <= t < n), None)
    if bad is not None:
        raise BadRequest(f"{field} holds id {bad}, outside this model's vocabulary (0..{n - 1})",
                         detail={"field": field})


def check_queue_room(c: SchedulerConfig, queued: Sequence[Seq], principal: str, prompt_tokens: int,
                     tokens_per_s: float) -> None:
    """The waiting line's bounds: `max_waiting` requests and
    `max_waiting_tokens` tokens in all, and for a named principal (auth on)
    `max_waiting_share` of each, so one tenant's flood leaves room for the
    others. Raises Overloaded with a `retry_after_s` from the recent rate."""
    tokens = sum(s.remaining for s in queued)
    why = ""
    if len(queued) >= c.max_waiting or tokens + prompt_tokens > c.max_waiting_tokens:
        why = f"the scheduler's queue is full ({len(queued)} requests, {tokens} tokens waiting)"
    elif principal and c.max_waiting_share < 1.0:
        mine = [s for s in queued if s.tenant == principal]
        mine_tokens = sum(s.remaining for s in mine)
        cap, cap_tokens = max(1, int(c.max_waiting * c.max_waiting_share)), \
            max(1, int(c.max_waiting_tokens * c.max_waiting_share))
        if len(mine) >= cap or mine_tokens + prompt_tokens > cap_tokens:
            why = (f"{principal!r} holds its share of the scheduler's queue ({len(mine)} of at most {cap} "
                   f"requests, {mine_tokens} of {cap_tokens} tokens waiting)")
            tokens = mine_tokens
    if not why:
        return
    rate = tokens_per_s or 1.0
    retry = min(30.0, max(0.5, (tokens + prompt_tokens) / rate))
    raise Overloaded(why, detail={"retry_after_s": round(retry, 2)})


__all__ = ["CHARS_PER_TOKEN", "Model", "check_fits", "check_ids", "check_prompt_size", "check_queue_room", "tokenize"]
