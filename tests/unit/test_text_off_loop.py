"""Tokenizing prompts and detokenizing outputs never run on the scheduler's
event loop (services/scheduler/_text.py): a tokenizer that notes the thread
of every encode and decode, under a real engine and the service's prompt path."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import anyio

from ipc.protocol.sampling import SamplingParams
from ipc.protocol.scheduler import FinishReason, Submit
from services.scheduler.engine import Model
from services.scheduler.service import SchedulerService
from tests.helpers.scheduler_fakes import GREEDY, Stream, expected, running
from text.tokenizer import ByteTokenizer


class ThreadNotingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []  # (what, thread id)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.calls.append(("encode", threading.get_ident()))
        return super().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        self.calls.append(("decode", threading.get_ident()))
        return super().decode(ids, skip_special_tokens=skip_special_tokens)

    def on(self, thread: int) -> list[str]:
        return [what for what, t in self.calls if t == thread]


def model(tok: ByteTokenizer) -> Model:
    return Model(tok, frozenset(tok.eos_token_ids), 256)


async def test_the_engine_detokenizes_every_step_off_its_loop() -> None:
    tok = ThreadNotingTokenizer()
    loop_thread = threading.get_ident()
    async with running() as (engine, _):
        engine.set_model(model(tok))
        ids = await anyio.to_thread.run_sync(tok.encode, "hello there")   # as the service does
        plain = Stream(engine, prompt_ids=ids, max_tokens=20)
        stopped = Stream(engine, prompt_ids=ids, max_tokens=40, stop=[ByteTokenizer().decode(expected("hello there", 6)[3:5])],
                         request_id="stop")
        sampled = Stream(engine, prompt_ids=ids, max_tokens=12, params=SamplingParams(temperature=0.0, logprobs=2),
                         request_id="lp")
        finals = [await s.result() for s in (plain, stopped, sampled)]
        cancelled = Stream(engine, prompt_ids=ids, max_tokens=200, request_id="cancel")
        with anyio.fail_after(10):
            while not cancelled.events:
                await anyio.sleep(0)
        engine.cancel("", "cancel")
        finals.append(await cancelled.result())
    assert finals[0].finish_reason == FinishReason.LENGTH
    assert plain.text(finals[0]) == ByteTokenizer().decode(expected("hello there", 20))
    assert finals[1].finish_reason == FinishReason.STOP and len(stopped.tokens(finals[1])) < 40
    assert finals[3].finish_reason == FinishReason.CANCELLED
    assert tok.calls and {w for w, _ in tok.calls} >= {"decode"}
    assert tok.on(loop_thread) == [], f"ran on the event loop: {tok.on(loop_thread)}"


async def test_the_service_tokenizes_every_prompt_off_its_loop(tmp_path: Path) -> None:
    tok = ThreadNotingTokenizer()
    svc = SchedulerService([], home=str(tmp_path))
    svc.engine.set_model(model(tok))
    for prompt in ("hi", "a longer prompt " * 400):
        assert await svc._tokenize(Submit(prompt=prompt, params=GREEDY)) == ByteTokenizer().encode(prompt)
    assert await svc._tokenize(Submit(prompt_ids=[256, 104], params=GREEDY)) == [256, 104]
    assert [w for w, _ in tok.calls] == ["encode", "encode"]
    assert tok.on(threading.get_ident()) == []
