"""Step N's text is fed beside step N+1 (services/scheduler/_text.py
`TextLater`): a slow detokenizer does not hold the driver's next step, and
every stream still gets its text complete and in order, whatever ends it
(its length, a stop string, a cancel, a deadline)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import anyio

from ipc.protocol.scheduler import FinishReason
from services.scheduler.engine import Model
from tests.helpers.scheduler_fakes import TOK, InProcessBackend, Stream, expected, running
from text.tokenizer import ByteTokenizer


class GatedTokenizer(ByteTokenizer):
    """Decodes wait while the gate is shut (in the engine's worker thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.blocked = threading.Event()

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        if not self.gate.is_set():
            self.blocked.set()
            self.gate.wait(20)
        return super().decode(ids, skip_special_tokens=skip_special_tokens)


def executes(backend: InProcessBackend) -> int:
    return sum(1 for what, _ in backend.calls if what == "execute")


async def test_the_next_step_goes_to_the_driver_while_the_last_steps_text_is_still_decoding() -> None:
    tok = GatedTokenizer()
    async with running() as (engine, backend):
        engine.set_model(Model(tok, frozenset(tok.eos_token_ids), 256))
        s = Stream(engine, prompt_ids=TOK.encode("gated text"), max_tokens=30, request_id="g")
        req = engine.requests[("", "g")]
        with anyio.fail_after(10):
            while len(s.events) < 3:
                await anyio.sleep(0)
        tok.gate.clear()
        try:
            with anyio.fail_after(10):
                while not tok.blocked.is_set():
                    await anyio.sleep(0)
                generated = len(req.generated)  # token k's text is stuck; tokens 0..k are recorded
                # Step k+1 (the Execute after the one that made token k) reaches the driver meanwhile.
                while executes(backend) < generated + 1:
                    await anyio.sleep(0)
            assert tok.blocked.is_set() and not tok.gate.is_set() and len(req.generated) == generated
        finally:
            tok.gate.set()
        final = await s.result()
    ids = s.tokens(final)
    assert final.finish_reason == FinishReason.LENGTH and ids == expected("gated text", 30)
    assert s.text(final) == TOK.decode(ids)


async def test_text_is_complete_and_in_order_whatever_ends_the_stream() -> None:
    async with running() as (engine, _):
        prompt = TOK.encode("complete text")
        stop_at = TOK.decode(expected("complete text", 12)[8:10])
        plain = Stream(engine, prompt_ids=prompt, max_tokens=25, request_id="plain")
        stopped = Stream(engine, prompt_ids=prompt, max_tokens=40, stop=[stop_at], request_id="stop")
        cancelled = Stream(engine, prompt_ids=prompt, max_tokens=200, request_id="cancel")
        late = Stream(engine, prompt_ids=prompt, max_tokens=200, request_id="late",
                      deadline_ns=time.time_ns() + 600_000_000_000)
        with anyio.fail_after(10):
            while len(cancelled.events) < 5 or len(late.events) < 5:
                await anyio.sleep(0)
        engine.cancel("", "cancel")
        late.submit.deadline_ns = time.time_ns()  # its deadline passes now (it had started: not an error)
        finals = {s.submit.request_id: (s, await s.result()) for s in (plain, stopped, cancelled, late)}
    reasons = {rid: f.finish_reason for rid, (_, f) in finals.items()}
    assert reasons == {"plain": FinishReason.LENGTH, "stop": FinishReason.STOP, "cancel": FinishReason.CANCELLED,
                       "late": FinishReason.DEADLINE}
    for rid, (s, final) in finals.items():
        ids = s.tokens(final)
        assert ids == expected("complete text", len(ids)), rid
        text = TOK.decode(ids)
        if rid == "stop":
            assert s.text(final) == text[:text.index(stop_at)]
        else:
            assert s.text(final) == text, rid
    assert 0 < len(finals["cancel"][0].tokens(finals["cancel"][1])) < 200
