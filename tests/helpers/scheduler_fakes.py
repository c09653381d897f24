"""In-memory stand-ins for the scheduler's tests: a driver that keeps real
paged "KV" (the token at each slot), a backend that calls the real
`MemoryManager` in-process, and an engine running over them (`running`)
with a client stream (`Stream`).

The fake driver reads each sequence's history back from the blocks its
block table names and derives the next token from it, so a wrong block
table, a lost or stale block, or a bad recompute changes the output: tests
compare against `reference()` (the same function over the true history).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from drivers.seq_table import SeqTable
from ipc.errors import Unavailable
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol.base import Message
from ipc.protocol.sampling import SamplingParams
from ipc.protocol.scheduler import Finished, Submit, TokenDelta
from common.config.scheduler import SchedulerConfig
from services.memory import MemoryManager
from services.scheduler.engine import Engine, Model
from text.tokenizer import ByteTokenizer

LETTERS = list(range(ord("a"), ord("z") + 1))


def next_token(history: list[int]) -> int:
    h = 1469598103934665603
    for t in history:
        h = ((h ^ t) * 1099511628211) & (2**64 - 1)
    return LETTERS[h % len(LETTERS)]


def reference(prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(prompt + out))
    return out


class FakeDriver:
    def __init__(self, num_blocks: int, block_size: int = 4, host_slots: int = 0, device: str = "fake"):
        self.num_blocks = num_blocks
        self.device = device  # what its READY meta reports (a real one: "cpu", "cuda:0", "null")
        self.block_size = block_size
        self.host_slots = host_slots
        self.kv: dict[int, list[int | None]] = {}
        self.host: dict[int, list[int | None]] = {}  # the host swap tier
        self.swapped_out = self.swapped_in = 0
        self.alive = True
        self.steps = 0
        self.batch_sizes: list[int] = []
        self.tokens_per_step: list[int] = []
        self.table = SeqTable()  # what it keeps of each sequence between steps

    @property
    def meta(self) -> dict[str, str | int | float | bool]:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size, "host_slots": self.host_slots,
                "device": self.device}

    def restart(self) -> None:
        self.kv.clear()
        self.host.clear()
        self.table = SeqTable()
        self.alive = True

    def swap(self, req: dp.SwapBlocksOut | dp.SwapBlocksIn) -> dp.Swapped:
        # Like a real driver, a swap out leaves the device copy as it was: the
        # memory server may take a block back without a copy while it still
        # caches its content, and a block reused meanwhile holds other KV.
        empty = [None] * self.block_size
        if isinstance(req, dp.SwapBlocksOut):
            for b, slot in zip(req.block_ids, req.slots):
                self.host[slot] = list(self.kv.get(b, empty))
            self.swapped_out += len(req.block_ids)
        else:
            for slot, b in zip(req.slots, req.block_ids):
                self.kv[b] = list(self.host.pop(slot, empty))
            self.swapped_in += len(req.block_ids)
        return dp.Swapped(len(req.slots))

    def execute(self, req: dp.Execute) -> dp.Executed:
        bs = self.block_size
        for src, dst in req.copies:
            self.kv[dst] = list(self.kv.get(src, [None] * bs))
        outputs: list[dp.SeqOutput] = []
        steps, resend = self.table.expand(req)  # as a real driver does (drivers/seq_table.py)
        for s in steps:
            end = s.start_pos + len(s.token_ids)
            if len(s.block_table) * bs < end or any(not 0 <= b < self.num_blocks for b in s.block_table):
                outputs.append(dp.SeqOutput(s.seq_id, error="block table too short or out of range"))
                continue
            history: list[int] = []
            missing = -1
            for p in range(s.start_pos):
                t = self.kv.get(s.block_table[p // bs], [None] * bs)[p % bs]
                if t is None:
                    missing = p
                    break
                history.append(t)
            if missing >= 0:
                outputs.append(dp.SeqOutput(s.seq_id, error=f"no KV at position {missing}"))
                continue
            for i, t in enumerate(s.token_ids):
                p = s.start_pos + i
                self.kv.setdefault(s.block_table[p // bs], [None] * bs)[p % bs] = t
            token = next_token(history + list(s.token_ids)) if s.sample else -1
            outputs.append(dp.SeqOutput(s.seq_id, token))
        self.table.record(steps, [o.error for o in outputs], [o.token for o in outputs])
        self.steps += 1
        self.batch_sizes.append(len(steps))
        self.tokens_per_step.append(sum(len(s.token_ids) for s in steps))
        return dp.Executed(outputs + resend)


class InProcessBackend:
    def __init__(self, drivers: dict[str, FakeDriver]):
        self.drivers = drivers
        self.memory = MemoryManager()
        self.memory_alive = True
        self.reserves = 0
        # Every call the engine made, in order: ("reserve", Reserve), ("release", Release),
        # ("execute", Execute), ...
        self.calls: list[tuple[str, Message]] = []
        # When set, every Execute waits for this event (a driver busy for as
        # long as a test needs).
        self.hold_steps: anyio.Event | None = None
        # Event-loop turns each Execute takes (a device busy for a while, so
        # what overlaps it comes back first).
        self.execute_turns = 0
        self.held = 0  # Executes waiting on hold_steps now
        for name, d in drivers.items():
            self.memory.register_pool(mp.RegisterPool(name, d.num_blocks, d.block_size, d.host_slots))

    def let_go(self) -> None:
        """Release the held Executes and stop holding new ones."""
        assert self.hold_steps is not None
        self.hold_steps.set()
        self.hold_steps = None

    def restart_memory(self) -> None:
        self.memory = MemoryManager()
        for name, d in self.drivers.items():
            if d.alive:
                self.memory.register_pool(mp.RegisterPool(name, d.num_blocks, d.block_size, d.host_slots))

    def _check_memory(self) -> None:
        if not self.memory_alive:
            raise Unavailable("memory died while handling the call")

    async def reserve(self, req: mp.Reserve) -> mp.ReserveReply:
        await anyio.sleep(0)
        self._check_memory()
        self.reserves += 1
        self.calls.append(("reserve", req))
        return self.memory.reserve(req)

    async def release(self, req: mp.Release) -> mp.ReleaseReply:
        await anyio.sleep(0)
        self._check_memory()
        self.calls.append(("release", req))
        return self.memory.release(req)

    async def reregister(self, req: mp.Reregister) -> mp.ReregisterReply:
        await anyio.sleep(0)
        self._check_memory()
        return self.memory.reregister(req)

    async def execute(self, instance: str, req: dp.Execute) -> dp.Executed:
        await anyio.sleep(0)
        if self.hold_steps is not None:
            self.held += 1
            try:
                await self.hold_steps.wait()
            finally:
                self.held -= 1
        d = self.drivers[instance]
        if not d.alive:
            raise Unavailable(f"{instance} died while handling Execute")
        self.calls.append(("execute", req))
        for _ in range(self.execute_turns):
            await anyio.sleep(0)
        return d.execute(req)

    async def swap_out(self, req: mp.SwapOut) -> mp.SwapOutReply:
        await anyio.sleep(0)
        self._check_memory()
        return self.memory.swap_out(req)

    async def swap_in(self, req: mp.SwapIn) -> mp.SwapInReply:
        await anyio.sleep(0)
        self._check_memory()
        return self.memory.swap_in(req)

    async def fork(self, req: mp.Fork) -> mp.ForkReply:
        await anyio.sleep(0)
        self._check_memory()
        return self.memory.fork(req)

    async def swap_blocks(self, instance: str, req: dp.SwapBlocksOut | dp.SwapBlocksIn) -> dp.Swapped:
        await anyio.sleep(0)
        d = self.drivers[instance]
        if not d.alive:
            raise Unavailable(f"{instance} died while swapping")
        return d.swap(req)


GREEDY = SamplingParams(temperature=0.0)
TOK = ByteTokenizer()


@asynccontextmanager
async def running(config: SchedulerConfig | None = None,
                  drivers: dict[str, FakeDriver] | None = None) -> AsyncIterator[tuple[Engine, InProcessBackend]]:
    drivers = drivers if drivers is not None else {"cpu": FakeDriver(64)}
    backend = InProcessBackend(drivers)
    engine = Engine(config or SchedulerConfig(), backend)
    for name, d in drivers.items():
        engine.driver_up(name, d.meta)
    engine.set_model(Model(TOK, frozenset(TOK.eos_token_ids), 256))
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        try:
            yield engine, backend
        finally:
            tg.cancel_scope.cancel()


class Stream:
    def __init__(self, engine: Engine, **kw: Any):
        self.events: list[Message] = []
        kw.setdefault("params", GREEDY)
        principal = kw.pop("principal", "")
        self.submit = Submit(**kw)
        self.sink = engine.submit(self.submit, principal, self.events.append)

    async def result(self) -> Finished:
        with anyio.fail_after(10):
            return await self.sink.wait()

    def tokens(self, final: Finished) -> list[int]:
        """All generated ids, checking the offsets are contiguous."""
        out: list[int] = list(self.submit.resume_ids)
        for ev in [*self.events, final]:
            assert isinstance(ev, (TokenDelta, Finished))
            assert ev.offset == len(out), f"gap or repeat at {ev.offset} (have {len(out)})"
            out.extend(ev.token_ids)
        return out

    def text(self, final: Finished) -> str:
        return "".join(ev.text for ev in [*self.events, final])  # type: ignore[attr-defined]


def expected(prompt: str, n: int) -> list[int]:
    return reference(TOK.encode(prompt), n)


async def blocks_free(backend: InProcessBackend) -> None:
    """Until the memory server holds no block (what a finished run must leave)."""
    with anyio.fail_after(10):
        while any(p.used for p in backend.memory.stats(mp.MemoryStats()).pools):
            await anyio.sleep(0)


def executes(backend: InProcessBackend) -> list[dp.Execute]:
    """Every Execute the engine sent, in order."""
    return [m for _, m in backend.calls if isinstance(m, dp.Execute)]
