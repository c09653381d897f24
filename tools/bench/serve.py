"""Serving: llmos through the SDK against the same engine in-process and
against transformers, on a mixed workload; priority and prefix caching.

    python -m tools.bench.serve [--quick] [--json PATH] [--requests N] [--rate R]

The workload (the demo model, greedy, EOS ignored): Poisson arrivals,
prompts of 16-512 random byte tokens, outputs of 16-256 tokens, 200
requests at 8/s (--quick: 32 requests at 32/s, of 16-128 prompt and 16-64
output tokens: as many as transformers' one static batch). The requests
arrive in a small part of the time it takes to serve them, so throughput is
capacity (at a rate the system keeps up with, it would be the offered load,
and the arrival window would bound it) and TTFT includes queueing.
It is served three ways in one run:

* os     - `llmos up`'s processes (kernel, memory server, CPU driver,
           scheduler; auth off), requests streamed through the SDK;
* inproc - the scheduler's engine loop with the memory manager and the
           model runner in this process (no kernel, sockets or codec);
* hf     - transformers `generate` over the same prompts in static batches
           of 32, offline (arrival times ignored; TTFT from the batch start).

Throughput is generated tokens over the wall time from the first arrival to
the last token; TTFT is submission to first token seen by the client;
per-token latency (TPOT) is a request's time after its first token over its
remaining tokens. Then, on the os target:

* priority: TTFT p99 of high-priority probes (prompt lengths as in the
  workload, 4 output tokens), one at a time, on the idle system and under a
  saturating low-priority load (more requests than the batch holds, so some
  always wait; each loaded probe after a random pause of up to 0.5 s, so it
  lands anywhere in the step in flight);
* prefix caching: TTFT of a prompt that starts with a 512-token prefix
  already in the prefix cache (a shared system prompt) against one whose
  512-token prefix is new (a miss costs what no prefix cache costs).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio

import drivers  # noqa: F401  (first: OpenMP waits passively in this process too, as in a driver)
from common.home import llmos_home
from common.config.scheduler import PolicyConfig, PolicyName, SchedulerConfig, TunerConfig
from tools.bench._serve_load import Req, Summary, Timing, drive, mixed_workload, random_ids, sequentially, summarize
from tools.bench._serve_targets import OsTarget, booted_os, hf_static, inproc_engine
from tools.bench.common import parser, percentile, print_table, write_result

PREFIX = 512
LOW, HIGH = 10, 0  # priorities: lower runs first


@dataclass(frozen=True)
class Plan:
    requests: int
    rate: float  # arrivals per second
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    probes: int  # per experiment arm
    load_extra: int  # low-priority requests beyond the batch size


FULL = Plan(200, 8.0, (16, 512), (16, 256), probes=20, load_extra=32)
QUICK = Plan(32, 32.0, (16, 128), (16, 64), probes=5, load_extra=8)
# Fixed limits (the tuner off): the figures compare paths, not settings.
CONFIG = SchedulerConfig(policy=PolicyConfig(name=PolicyName.PRIORITY), token_budget=512, max_num_seqs=64,
                         tuner=TunerConfig(enabled=False))


def warmup() -> list[Req]:
    return [Req(0, list(range(32, 96)), 4)]


async def run_inproc(home: Path, workload: list[Req], kv_mb: int) -> tuple[Summary, list[Timing]]:
    async with inproc_engine(home, CONFIG, kv_mb) as target:
        await sequentially(target, warmup())
        timings, elapsed = await drive(target, workload)
    return summarize(timings, elapsed), timings


async def priority_experiment(target: OsTarget, plan: Plan, rng: random.Random) -> dict[str, float]:
    # Probes are requests like the workload's (its prompt lengths), one at a
    # time, each after a random pause: under load a request arrives at any
    # point of the step in flight, not just after one ended.
    probes = [Req(i, random_ids(rng, rng.randint(*plan.prompt_len)), 4, priority=HIGH)
              for i in range(plan.probes)]
    pauses = [rng.uniform(0.0, 0.5) for _ in probes]
    idle = await sequentially(target, probes)
    load = [Req(i, random_ids(rng, rng.randint(16, 32)), 4096, priority=LOW)
            for i in range(CONFIG.max_num_seqs + plan.load_extra)]
    first = len(target.request_ids)
    async with anyio.create_task_group() as tg:
        for req in load:
            tg.start_soon(target.serve, req, Timing(submitted=time.perf_counter()))
        # Saturated: the batch is full and requests wait behind it.
        with anyio.fail_after(600):
            while True:
                st = await target.client.scheduler_stats()
                if st.running >= CONFIG.max_num_seqs and st.waiting > 0:
                    break
                await anyio.sleep(0.2)
        loaded = []
        for probe, pause in zip(probes, pauses):
            await anyio.sleep(pause)
            loaded.extend(await sequentially(target, [probe]))
        await target.cancel(target.request_ids[first:first + len(load)])
    idle_p99 = percentile([t.ttft * 1e3 for t in idle], 99)
    loaded_p99 = percentile([t.ttft * 1e3 for t in loaded], 99)
    return {"idle_ttft_p99_ms": idle_p99, "loaded_ttft_p99_ms": loaded_p99,
            "loaded_ttft_p50_ms": percentile([t.ttft * 1e3 for t in loaded], 50),
            "ratio": loaded_p99 / idle_p99}


async def prefix_experiment(target: OsTarget, plan: Plan, rng: random.Random) -> dict[str, float]:
    shared = random_ids(rng, PREFIX)
    await sequentially(target, [Req(0, shared + random_ids(rng, 16), 4)])  # puts it in the cache
    hits = [Req(i, shared + random_ids(rng, 16), 4) for i in range(plan.probes)]
    misses = [Req(i, random_ids(rng, PREFIX) + random_ids(rng, 16), 4) for i in range(plan.probes)]
    hit = [t.ttft * 1e3 for t in await sequentially(target, hits)]
    miss = [t.ttft * 1e3 for t in await sequentially(target, misses)]
    return {"cached_ttft_p50_ms": percentile(hit, 50), "uncached_ttft_p50_ms": percentile(miss, 50),
            "speedup": percentile(miss, 50) / percentile(hit, 50)}


async def run_os(home: Path, workload: list[Req], plan: Plan, kv_mb: int
                 ) -> tuple[Summary, dict[str, float], dict[str, float]]:
    rng = random.Random(7)
    async with booted_os(home, CONFIG, kv_mb) as target:
        await sequentially(target, warmup())
        timings, elapsed = await drive(target, workload)
        summary = summarize(timings, elapsed)
        print(f"  os: {summary.tps:.1f} tok/s", file=sys.stderr)
        prio = await priority_experiment(target, plan, rng)
        print(f"  priority: {prio}", file=sys.stderr)
        prefix = await prefix_experiment(target, plan, rng)
        print(f"  prefix: {prefix}", file=sys.stderr)
    return summary, prio, prefix


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, help="requests in the mixed workload")
    ap.add_argument("--rate", type=float, help="arrivals per second (Poisson)")
    ap.add_argument("--home", type=Path, help="LLMOS_HOME for the run (default: $LLMOS_HOME/bench/serve; "
                                              "the demo model is cached there)")
    ap.add_argument("--kv-cache-mb", type=int, default=1024)
    ap.add_argument("--skip-hf", action="store_true", help="leave transformers out (hf figures are NaN)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    n = args.requests or plan.requests
    rate = args.rate or plan.rate
    home = (args.home or llmos_home() / "bench" / "serve").resolve()
    workload = mixed_workload(n, rate, plan.prompt_len, plan.output_len, seed=1)
    print(f"serve bench: {n} requests at {rate:g}/s, prompts {plan.prompt_len}, outputs {plan.output_len}, "
          f"home {home}", file=sys.stderr)

    began = time.perf_counter()
    inproc, _ = anyio.run(run_inproc, home, workload, args.kv_cache_mb, backend="asyncio",
                          backend_options={"use_uvloop": True})
    print(f"  inproc: {inproc.tps:.1f} tok/s", file=sys.stderr)
    os_sum, prio, prefix = anyio.run(run_os, home, workload, plan, args.kv_cache_mb, backend="asyncio",
                                     backend_options={"use_uvloop": True})
    if args.skip_hf:
        hf = Summary(n, 0, 0.0, float("nan"), *[float("nan")] * 4)
    else:
        hf_timings, hf_elapsed = hf_static(home / "models" / "demo", workload)
        hf = summarize(hf_timings, hf_elapsed)
        print(f"  hf: {hf.tps:.1f} tok/s", file=sys.stderr)

    figures = {
        "os_tps": os_sum.tps, "inproc_tps": inproc.tps, "hf_tps": hf.tps,
        "ratio_vs_hf": os_sum.tps / hf.tps, "ratio_os_vs_inproc": os_sum.tps / inproc.tps,
        "ttft_p50_ms": os_sum.ttft_p50_ms, "ttft_p99_ms": os_sum.ttft_p99_ms,
        "tpot_p50_ms": os_sum.tpot_p50_ms, "tpot_p99_ms": os_sum.tpot_p99_ms,
        "priority_ttft_p99_ratio_loaded_vs_idle": prio["ratio"],
        "prefix_cache_ttft_speedup": prefix["speedup"],
    }
    rows: list[tuple[str, ...]] = [("target", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "wall s")]
    for name, s in (("llmos (SDK)", os_sum), ("engine in-process", inproc), ("transformers b32", hf)):
        rows.append((name, f"{s.tps:.1f}", f"{s.ttft_p50_ms:.0f}", f"{s.ttft_p99_ms:.0f}",
                     f"{s.tpot_p50_ms:.0f}", f"{s.tpot_p99_ms:.0f}", f"{s.elapsed_s:.1f}"))
    print_table(f"serve ({'quick' if args.quick else 'full'}: {n} requests at {rate:g}/s, "
                f"{os_sum.output_tokens} output tokens; total {time.perf_counter() - began:.0f} s)", rows)
    print_table("ratios and experiments", [
        ("figure", "value", "target"),
        ("llmos / transformers", f"{figures['ratio_vs_hf']:.2f}x", ">= 3x"),
        ("llmos / in-process", f"{figures['ratio_os_vs_inproc']:.2f}x", ">= 0.9x"),
        ("high-prio TTFT p99 idle ms", f"{prio['idle_ttft_p99_ms']:.0f}", ""),
        ("high-prio TTFT p99 loaded ms", f"{prio['loaded_ttft_p99_ms']:.0f}", ""),
        ("  loaded / idle", f"{prio['ratio']:.2f}x", "<= 2x"),
        ("TTFT p50, 512-token prefix new ms", f"{prefix['uncached_ttft_p50_ms']:.0f}", ""),
        ("TTFT p50, 512-token prefix cached ms", f"{prefix['cached_ttft_p50_ms']:.0f}", ""),
        ("  speedup", f"{prefix['speedup']:.2f}x", ">= 3x"),
    ])
    write_result(args.json, "serve", {k: round(v, 3) for k, v in figures.items()}, {
        "quick": args.quick, "requests": n, "rate": rate, "prompt_len": plan.prompt_len,
        "output_len": plan.output_len, "scheduler": {"policy": CONFIG.policy.name.value,
                                                     "token_budget": CONFIG.token_budget,
                                                     "max_num_seqs": CONFIG.max_num_seqs},
        "kv_cache_mb": args.kv_cache_mb,
        "summaries": {"os": asdict(os_sum), "inproc": asdict(inproc), "hf": asdict(hf)},
        "priority": prio, "prefix": prefix})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
