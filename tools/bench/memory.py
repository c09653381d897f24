"""The memory server: Reserve throughput, KV waste, prefix-cache hit rate.

    python -m tools.bench.memory [--quick] [--json PATH] [--no-kernel]

Every figure comes from `Workload`, continuous batching as the scheduler
drives the memory server: up to `width` running sequences; per step one
`Release` (the sequences that finished) and one `Reserve` (a new sequence's
whole prompt, one token for every other), then each sequence samples a
token. Token ids are random, so prompts share nothing unless told to.

(a) reserve_steps_per_s_inproc: steps/s of 256 sequences (prompts and outputs
    16-256 tokens) against `MemoryManager` in this process, counting only the
    manager's time; reserve_steps_per_s_codec adds what the wire costs on
    both sides (msgpack encode + decode of request and reply). Both count
    the CPU time of this thread, so other work on shared cores does not
    count (on a quiet core that is the wall time); the table shows the wall
    clock too.
    reserve_steps_per_s_kernel: the same steps as requests through a kernel
    to the memory service (`reserve_steps_per_s_kernel`, any async `call`);
    a stand-in driver supplies the pool.
(b) waste_paged_pct / waste_contiguous_pct: prompts 16-1024, outputs 16-512,
    256 running: slots allocated but holding no token, as a share of slots
    allocated, averaged over the steady state; paged = 16-token blocks from
    the memory server, contiguous = each sequence holding prompt + 512 (its
    max_tokens) slots from admission; waste_contiguous_model_len_pct holds
    2048 (the model's context, as the systems the PagedAttention paper
    measured did). External fragmentation, which makes contiguous
    allocation worse still, is not modelled.
(c) prefix_hit_rate: every prompt = one 512-token system prompt + 16-256 own
    tokens, outputs 16-128, 64 running, at most 4 admitted per step: prompt
    tokens served from the prefix cache / prompt tokens.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ipc.protocol.driver import DRIVER
from ipc.protocol.memory import (
    ListPools, MemoryReply, MemoryRequest, MemoryStats, RegisterPool, Release, Reserve,
    ReserveReply, SeqReserve,
)
from kernel.config import ChildSpec
from sdk.service import Service
from tools.testing import running_llmos
from services.memory import MemoryManager
from tools.bench.common import parser, print_table, write_result

MEMORY = "memory"

BLOCK = 16
MODEL_LEN = 2048
VOCAB = 32000
POOL = "bench"


@dataclass
class _Seq:
    seq_id: int
    tokens: list[int]
    prompt_len: int
    out_len: int
    known: int = 0  # tokens the memory server was told
    slots: int = 0  # tokens with KV


@dataclass
class Workload:
    rng: random.Random
    width: int
    prompt: tuple[int, int]
    output: tuple[int, int]
    system: list[int] = field(default_factory=list)
    admit_per_step: int = 1 << 30
    tenant: str = "bench"
    pool: str = POOL
    running: list[_Seq] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    admitted: int = 0
    failures: int = 0

    def next_step(self) -> tuple[Release | None, Reserve]:
        release = Release(self.finished) if self.finished else None
        self.finished = []
        admit = min(self.width - len(self.running), self.admit_per_step)
        for _ in range(admit):
            own = [self.rng.randrange(VOCAB) for _ in range(self.rng.randint(*self.prompt))]
            prompt = self.system + own
            self.admitted += 1
            self.running.append(_Seq(self.admitted, prompt, len(prompt),
                                     self.rng.randint(*self.output)))
        items = []
        for s in self.running:
            if s.known == 0:
                items.append(SeqReserve(s.seq_id, 0, s.tokens, len(s.tokens), self.tenant,
                                        self.pool))
            else:
                items.append(SeqReserve(s.seq_id, s.known, s.tokens[s.known:], 1))
        return release, Reserve(items)

    def apply(self, reply: ReserveReply) -> None:
        """The step ran: every sequence that got its slots samples a token."""
        still: list[_Seq] = []
        for s, r in zip(self.running, reply.seqs):
            if r.error is not None:
                self.failures += 1
                still.append(s)
                continue
            s.known = s.slots = len(s.tokens)
            s.tokens.append(self.rng.randrange(VOCAB))
            if len(s.tokens) - s.prompt_len >= s.out_len:
                self.finished.append(s.seq_id)
            else:
                still.append(s)
        self.running = still

    def slots_needed(self) -> int:
        """Blocks that can never run out for this workload."""
        longest = len(self.system) + self.prompt[1] + self.output[1]
        return self.width * -(-longest // BLOCK)


def _decode_workload(seed: int, width: int = 256) -> Workload:
    return Workload(random.Random(seed), width, (16, 256), (16, 256))


def _manager_for(w: Workload) -> MemoryManager:
    m = MemoryManager()
    m.register_pool(RegisterPool(w.pool, w.slots_needed(), BLOCK))
    return m


def reserve_steps_per_s_inproc(steps: int, width: int = 256, seed: int = 1,
                               rounds: int = 1) -> dict[str, float]:
    """(a) in process: steps per CPU second ("manager", "codec": with msgpack
    on both sides of the wire) and per wall-clock second ("manager_wall",
    "codec_wall"); each the best of `rounds` runs of the same steps."""
    rates = dict.fromkeys(["manager", "codec", "manager_wall", "codec_wall"], 0.0)
    enc = msgspec.msgpack.Encoder()
    req_dec = msgspec.msgpack.Decoder(MemoryRequest)
    rep_dec = msgspec.msgpack.Decoder(MemoryReply)
    for wire in [False, True] * rounds:
        w = _decode_workload(seed, width)
        m = _manager_for(w)
        cpu = wall = 0.0
        for i in range(steps + width):  # the first `width` steps fill the batch
            release, reserve = w.next_step()
            c0, t0 = time.thread_time(), time.perf_counter()
            if wire:
                if release is not None:
                    rep_dec.decode(enc.encode(m.handle(req_dec.decode(enc.encode(release)))))
                reply = rep_dec.decode(enc.encode(m.handle(req_dec.decode(enc.encode(reserve)))))
            else:
                if release is not None:
                    m.release(release)
                reply = m.reserve(reserve)
            if i >= width:
                wall += time.perf_counter() - t0
                cpu += time.thread_time() - c0
            assert isinstance(reply, ReserveReply)
            w.apply(reply)
        assert not w.failures, "the bench pool ran out of blocks"
        name = "codec" if wire else "manager"
        rates[name] = max(rates[name], steps / cpu)
        rates[name + "_wall"] = max(rates[name + "_wall"], steps / wall)
    return rates


async def reserve_steps_per_s_kernel(call: Callable[[Any], Awaitable[Any]], pool: str,
                                     steps: int, width: int = 256, seed: int = 1) -> float:
    """(a) through the kernel: the steps of `reserve_steps_per_s_inproc`, each
    Release and Reserve awaited through `call` (e.g. ``lambda msg:
    client.call("memory", msg)``) against a memory service holding `pool`
    (at least `_decode_workload().slots_needed()` blocks of 16 slots)."""
    w = _decode_workload(seed, width)
    w.pool = pool
    busy = 0.0
    for i in range(steps + width):
        release, reserve = w.next_step()
        t0 = time.perf_counter()
        if release is not None:
            await call(release)
        reply = await call(reserve)
        if i >= width:
            busy += time.perf_counter() - t0
        w.apply(reply)
    if w.failures:
        raise RuntimeError(f"pool {pool!r} ran out of blocks; it needs {w.slots_needed()}")
    await call(Release(w.finished + [s.seq_id for s in w.running]))
    return steps / busy


def waste(steps: int, warmup: int, seed: int = 2) -> tuple[float, float, float]:
    """(b): KV waste in % for paged blocks, for contiguous slabs of each
    sequence's max length and for slabs of the model's context length."""
    max_tokens = 512
    w = Workload(random.Random(seed), 256, (16, 1024), (16, max_tokens))
    m = _manager_for(w)
    paged_alloc = paged_waste = contig_alloc = contig_held = model_len_alloc = 0
    for i in range(warmup + steps):
        release, reserve = w.next_step()
        if release is not None:
            m.release(release)
        w.apply(m.reserve(reserve))
        if i < warmup:
            continue
        ps = m.stats(MemoryStats(POOL)).pools[0]
        paged_alloc += ps.used * ps.block_size
        paged_waste += ps.waste_slots
        for s in w.running:
            contig_alloc += s.prompt_len + max_tokens
            contig_held += s.slots
            model_len_alloc += MODEL_LEN
    return (100 * paged_waste / paged_alloc, 100 * (1 - contig_held / contig_alloc),
            100 * (1 - contig_held / model_len_alloc))


def prefix_hit_rate(requests: int, seed: int = 3) -> tuple[float, float, int]:
    """(c): the hit rate, the best any cache could do (every system-prompt
    token of every request), and the steps it took."""
    rng = random.Random(seed)
    system = [rng.randrange(VOCAB) for _ in range(512)]
    w = Workload(rng, 64, (16, 256), (16, 128), system=system, admit_per_step=4)
    m = _manager_for(w)
    steps = 0
    prompt_tokens = 0
    while w.admitted < requests or w.running:
        w.admit_per_step = 4 if w.admitted < requests else 0
        release, reserve = w.next_step()
        prompt_tokens += sum(len(i.tokens) for i in reserve.seqs if i.start == 0)
        if release is not None:
            m.release(release)
        w.apply(m.reserve(reserve))
        steps += 1
    ps = m.stats(MemoryStats(POOL)).pools[0]
    assert ps.prompt_tokens == prompt_tokens
    return ps.hit_rate, len(system) * requests / prompt_tokens, steps


class _StandInDriver(Service):
    """A driver with a KV pool and nothing else: its READY is all the memory
    service needs to create the pool."""

    name = DRIVER
    num_blocks = 0

    def ready_meta(self) -> dict[str, str | int | float | bool]:
        return {"num_blocks": self.num_blocks, "block_size": BLOCK, "host_slots": 0}


def measure_kernel(steps: int, num_blocks: int) -> tuple[float | None, str]:
    """(a) through a kernel booted here with the memory service and a
    stand-in driver; (None, why) when that cannot run."""

    async def run(home: Path) -> float:
        children = [ChildSpec("memory", "services.memory"),
                    ChildSpec("bench-pool", "tools.bench.memory", service=DRIVER,
                              args=["--serve-pool", str(num_blocks)])]
        async with running_llmos(home, children) as llmos:
            client = llmos.client
            with anyio.fail_after(60):
                while not (pools := (await client.call(MEMORY, ListPools())).pools):
                    await anyio.sleep(0.05)

            async def call(msg: Any) -> Any:
                return await client.call(MEMORY, msg, timeout=60)

            return await reserve_steps_per_s_kernel(call, pools[0], steps)

    home = Path(tempfile.mkdtemp(prefix="llmos-bench-memory-", dir="/tmp"))
    try:
        return anyio.run(run, home), ""
    except Exception as e:  # a figure we cannot measure is reported, not invented
        return None, f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[1])
    ap.add_argument("--no-kernel", action="store_true", help="skip the through-the-kernel figure")
    # How measure_kernel starts the stand-in driver (as a kernel child).
    ap.add_argument("--serve-pool", type=int, metavar="BLOCKS", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_pool:
        _StandInDriver.num_blocks = args.serve_pool
        _StandInDriver.main()
        return 0
    a_steps, rounds, w_steps, w_warm, c_reqs, k_steps = (
        (300, 2, 250, 512, 400, 200) if args.quick else (1000, 3, 1000, 768, 2000, 1000))
    t0 = time.perf_counter()
    a = reserve_steps_per_s_inproc(a_steps, rounds=rounds)
    paged, contiguous, model_len = waste(w_steps, w_warm)
    hit, ideal, c_steps = prefix_hit_rate(c_reqs)
    kernel: float | None = None
    why = "--no-kernel"
    if not args.no_kernel:
        kernel, why = measure_kernel(k_steps, _decode_workload(1).slots_needed())
    figures: dict[str, float] = {
        "reserve_steps_per_s_inproc": round(a["manager"], 1),
        "reserve_steps_per_s_codec": round(a["codec"], 1),
        "waste_paged_pct": round(paged, 2),
        "waste_contiguous_pct": round(contiguous, 2),
        "waste_contiguous_model_len_pct": round(model_len, 2),
        "prefix_hit_rate": round(hit, 4),
    }
    if kernel is not None:
        figures["reserve_steps_per_s_kernel"] = round(kernel, 1)
    rows: list[tuple[str, ...]] = [("figure", "value", "workload")]
    rows.append(("(a) Reserve steps/s, in process", f"{a['manager']:,.0f}",
                 f"256 seqs, {a_steps} steps, best of {rounds}, CPU time"))
    rows.append(("    + msgpack both ways", f"{a['codec']:,.0f}", ""))
    rows.append(("    in process, wall clock", f"{a['manager_wall']:,.0f}",
                 f"+ msgpack: {a['codec_wall']:,.0f}"))
    rows.append(("    through the kernel", f"{kernel:,.0f}" if kernel else "not measured",
                 f"{k_steps} steps, wall clock" if kernel else why))
    rows.append(("(b) KV waste, paged (16-slot blocks)", f"{paged:.2f} %", f"{w_steps} steps"))
    rows.append(("    KV waste, contiguous (prompt + 512)", f"{contiguous:.2f} %", ""))
    rows.append(("    KV waste, contiguous (2048 each)", f"{model_len:.2f} %", ""))
    rows.append(("(c) prefix hit rate", f"{hit:.3f}", f"{c_reqs} requests, {c_steps} steps"))
    rows.append(("    at most (system prompt share)", f"{ideal:.3f}", ""))
    print_table(f"memory ({'quick' if args.quick else 'full'}, {time.perf_counter() - t0:.0f} s)", rows)
    if kernel is None:
        print("\n  kernel: not measured" + (f" ({why})" if why else ""))
    write_result(args.json, "memory", figures, {
        "quick": args.quick, "kernel_note": why, "prefix_hit_rate_max": round(ideal, 4),
        "reserve_steps_per_s_inproc_wall": round(a["manager_wall"], 1),
        "reserve_steps_per_s_codec_wall": round(a["codec_wall"], 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
