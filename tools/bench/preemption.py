"""Preemption: `recompute` against `swap` on one KV-starved workload.

The same workload is served in each preemption mode through the whole OS path.

    python -m tools.bench.preemption [--quick] [--json PATH] [--reps N]

The demo model on one CPU driver, `llmos up`'s processes (kernel, memory
server, driver, scheduler with the fcfs policy; auth off), requests streamed
through the SDK, greedy with EOS ignored (every request generates exactly
its length). 48 requests arrive in one burst (1000/s), prompts of 256-384
random byte tokens, outputs of 128-192 (--quick: 16 requests, prompts
192-256, outputs 96-128); the batch cap (64) admits them all. The driver's
KV cache is sized so that a third of the in-flight sequences' full length
(prompt + output, in 16-token blocks) fits: sequences run out of blocks as
they grow and the scheduler preempts. The pool's real size is read back
from the memory server.

Each rep boots a fresh system per mode, `recompute` then `swap`, the order
alternating from rep to rep (2 reps; --quick: 1); in `swap` the driver has
a host tier that holds every sequence's full length, so no swap is refused.
Per mode (figures: the median over reps): throughput (generated tokens over
first arrival -> last token), TTFT and TPOT percentiles as in
tools.bench.serve, the scheduler's preemptions and sequences swapped out /
in, blocks copied (memory server), and the positions the driver computed
(its health counter: prefill, decode and recomputation alike) against the
least the workload needs. Every run must give every request the token ids
of the first (greedy): `outputs_identical`, and the exit status is 1 when
they differ.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import torch

import drivers  # noqa: F401  (first: OpenMP waits passively in this process too, as in a driver)
from drivers.model.catalog import DEMO_CONFIG
from drivers.model.kv_cache import block_nbytes
from common.home import llmos_home
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from common.config.scheduler import PolicyConfig, PolicyName, PreemptionMode, SchedulerConfig, TunerConfig
from tools.bench._serve_load import Req, Summary, drive, mixed_workload, sequentially, summarize
from tools.bench._serve_targets import OsTarget, booted_os
from tools.bench.common import parser, print_table, write_result
from tools.bench.serve import warmup

BLOCK_SIZE = 16  # the driver's default
BLOCK_BYTES = block_nbytes(DEMO_CONFIG, BLOCK_SIZE, torch.float32)  # the demo model on a CPU driver
BURST = 1000.0  # arrivals per second: all at once
FITS = 1 / 3  # of the in-flight sequences' full length, what the KV cache holds
MODES = (PreemptionMode.RECOMPUTE, PreemptionMode.SWAP)


@dataclass(frozen=True)
class Plan:
    requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    reps: int


FULL = Plan(48, (256, 384), (128, 192), reps=2)
QUICK = Plan(16, (192, 256), (96, 128), reps=1)


def config(mode: PreemptionMode) -> SchedulerConfig:
    return SchedulerConfig(policy=PolicyConfig(name=PolicyName.FCFS), token_budget=512, max_num_seqs=64,
                           preemption=mode, tuner=TunerConfig(enabled=False))  # fixed limits: the modes compared


def blocks_for(req: Req, block_size: int = BLOCK_SIZE) -> int:
    """Blocks `req` holds at its full length (prompt + output)."""
    return math.ceil((len(req.prompt) + req.max_tokens) / block_size)


def kv_cache_mb(workload: Sequence[Req], max_seqs: int, fits: float = FITS, block_size: int = BLOCK_SIZE,
                block_bytes: int = BLOCK_BYTES) -> int:
    """MiB of KV cache that holds `fits` of the first `max_seqs` requests'
    blocks at full length (those in flight together when all arrive at
    once), and never less than the largest request: one sequence alone must
    be able to finish."""
    need = [blocks_for(r, block_size) for r in workload[:max_seqs]]
    blocks = max(math.ceil(fits * sum(need)), max(need))
    return math.ceil(blocks * block_bytes / 2**20)


def swap_mb(workload: Sequence[Req], block_size: int = BLOCK_SIZE, block_bytes: int = BLOCK_BYTES) -> int:
    """A host tier that holds every request at full length: never full."""
    return math.ceil(sum(blocks_for(r, block_size) for r in workload) * block_bytes / 2**20)


def least_positions(workload: Sequence[Req]) -> int:
    """Positions a run computes with no recomputation and no prefix hits:
    each prompt, and each generated token but the last as the next input."""
    return sum(len(r.prompt) + r.max_tokens - 1 for r in workload)


@dataclass(frozen=True)
class Run:
    mode: str
    summary: Summary
    preemptions: int  # scheduler
    request_preemptions: int  # summed over the requests' usage
    swapped_out: int  # sequences
    swapped_in: int
    blocks_out: int  # blocks copied device -> host (memory server)
    blocks_in: int
    positions: int  # computed by the driver
    steps: int  # scheduler steps
    num_blocks: int  # the KV pool
    swap_slots: int


async def _counters(target: OsTarget) -> tuple[sp.SchedulerStatsReply, mp.PoolStats, dp.DriverHealthReply]:
    stats = await target.client.scheduler_stats()
    mem: mp.MemoryStatsReply = await target.client.call("memory", mp.MemoryStats(), timeout=10.0)
    health: dp.DriverHealthReply = await target.client.call("driver", dp.DriverHealth(), timeout=10.0)
    return stats, mem.pools[0], health


async def run_mode(home: Path, mode: PreemptionMode, workload: list[Req], kv_mb: int, host_mb: int
                   ) -> tuple[Run, dict[int, list[int]]]:
    cfg = config(mode)
    async with booted_os(home, cfg, kv_mb, swap_mb=host_mb if mode is PreemptionMode.SWAP else 0.0) as target:
        await sequentially(target, warmup())
        s0, p0, h0 = await _counters(target)
        timings, elapsed = await drive(target, workload)
        s1, p1, h1 = await _counters(target)
        outputs = {r.index: target.token_ids[r.index] for r in workload}
        run = Run(mode.value, summarize(timings, elapsed), s1.preemptions - s0.preemptions,
                  sum(target.usage[r.index].preemptions for r in workload),
                  s1.swapped_out - s0.swapped_out, s1.swapped_in - s0.swapped_in,
                  p1.swapped_out - p0.swapped_out, p1.swapped_in - p0.swapped_in,
                  h1.tokens - h0.tokens, s1.steps - s0.steps, p1.num_blocks, p1.swap_slots)
    print(f"  {mode.value}: {run.summary.tps:.1f} tok/s, {run.preemptions} preemptions, "
          f"{run.swapped_out} swapped out, {run.positions} positions", file=sys.stderr)
    return run, outputs


def _median(runs: list[Run], get: Callable[[Run], float]) -> float:
    return statistics.median(get(r) for r in runs)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, help="boots per mode, alternating which mode goes first")
    ap.add_argument("--home", type=Path, help="LLMOS_HOME for the run (default: $LLMOS_HOME/bench/preemption; "
                                              "the demo model is cached there)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    reps = args.reps or plan.reps
    home = (args.home or llmos_home() / "bench" / "preemption").resolve()
    workload = mixed_workload(plan.requests, BURST, plan.prompt_len, plan.output_len, seed=3)
    kv_mb = kv_cache_mb(workload, config(MODES[0]).max_num_seqs)
    host_mb = swap_mb(workload)
    print(f"preemption bench: {plan.requests} requests, prompts {plan.prompt_len}, outputs {plan.output_len}, "
          f"KV {kv_mb} MiB, host tier {host_mb} MiB, home {home}", file=sys.stderr)

    began = time.perf_counter()
    runs: dict[str, list[Run]] = {m.value: [] for m in MODES}
    reference: dict[int, list[int]] | None = None
    identical = True
    for rep in range(reps):
        for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
            run, outputs = anyio.run(run_mode, home, mode, workload, kv_mb, host_mb, backend="asyncio",
                                     backend_options={"use_uvloop": True})
            runs[mode.value].append(run)
            if reference is None:
                reference = outputs
            elif outputs != reference:
                differ = [i for i in reference if outputs.get(i) != reference[i]]
                print(f"  {mode.value} rep {rep}: {len(differ)} requests' outputs differ "
                      f"(first: {differ[:8]})", file=sys.stderr)
                identical = False

    rec, swp = runs["recompute"], runs["swap"]
    least = least_positions(workload)
    figures: dict[str, float] = {
        "recompute_tps": _median(rec, lambda r: r.summary.tps),
        "swap_tps": _median(swp, lambda r: r.summary.tps),
        "recompute_preemptions": _median(rec, lambda r: r.preemptions),
        "swap_preemptions": _median(swp, lambda r: r.preemptions),
        "swap_swapped_out": _median(swp, lambda r: r.swapped_out),
        "swap_swapped_in": _median(swp, lambda r: r.swapped_in),
        "recompute_positions": _median(rec, lambda r: r.positions),
        "swap_positions": _median(swp, lambda r: r.positions),
    }
    figures["swap_vs_recompute_tps"] = figures["swap_tps"] / figures["recompute_tps"]
    for name, rs in (("recompute", rec), ("swap", swp)):
        for f in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "elapsed_s"):
            figures[f"{name}_{f}"] = _median(rs, lambda r: getattr(r.summary, f))

    rows: list[tuple[str, ...]] = [("mode", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
                                    "wall s", "preempt", "swap out/in", "blocks out/in", "positions", "steps")]
    for rep in range(reps):
        for r in (rec[rep], swp[rep]):
            s = r.summary
            rows.append((f"{r.mode}" + (f" #{rep + 1}" if reps > 1 else ""), f"{s.tps:.1f}",
                         f"{s.ttft_p50_ms:.0f}", f"{s.ttft_p99_ms:.0f}", f"{s.tpot_p50_ms:.0f}",
                         f"{s.tpot_p99_ms:.0f}", f"{s.elapsed_s:.1f}", str(r.preemptions),
                         f"{r.swapped_out}/{r.swapped_in}", f"{r.blocks_out}/{r.blocks_in}",
                         f"{r.positions} ({r.positions / least:.2f}x)", str(r.steps)))
    pool = rec[0]
    print_table(f"preemption ({'quick' if args.quick else 'full'}: {plan.requests} requests, "
                f"{rec[0].summary.output_tokens} output tokens, KV pool {pool.num_blocks} blocks of {BLOCK_SIZE} "
                f"({kv_mb} MiB), host tier {swp[0].swap_slots} blocks; least positions {least}; "
                f"total {time.perf_counter() - began:.0f} s)", rows)
    print_table("comparison", [
        ("figure", "value"),
        ("swap / recompute tok/s", f"{figures['swap_vs_recompute_tps']:.2f}x"),
        ("positions swap / recompute", f"{figures['swap_positions'] / figures['recompute_positions']:.2f}x"),
        ("outputs identical", "true" if identical else "FALSE"),
    ])
    write_result(args.json, "preemption", {k: round(v, 3) for k, v in figures.items()}, {
        "quick": args.quick, "requests": plan.requests, "reps": reps, "prompt_len": plan.prompt_len,
        "output_len": plan.output_len, "outputs_identical": identical,
        "scheduler": {"policy": PolicyName.FCFS.value, "token_budget": config(MODES[0]).token_budget,
                      "max_num_seqs": config(MODES[0]).max_num_seqs},
        "kv_cache_mb": kv_mb, "kv_blocks": pool.num_blocks, "block_bytes": BLOCK_BYTES, "swap_mb": host_mb,
        "swap_slots": swp[0].swap_slots, "least_positions": least,
        "runs": [{**asdict(r), "rep": i} for rs in (rec, swp) for i, r in enumerate(rs)]})
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
