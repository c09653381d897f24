"""The engine step through the whole OS, on the null driver (issue 15).

    python -m tools.bench.steps [--quick] [--json PATH] [--async-steps {on,off,both}]

The null driver (drivers/null.py) runs no model: it answers each Execute
after a simulated step time, so what is left is the OS's own cost per step.
Two targets in one run, side by side:

* os     - kernel (auth on), security, memory server, null driver and
           scheduler as processes, requests streamed through the SDK from
           this process;
* inproc - the same engine in this process with the memory manager and the
           null driver's own Execute handler (no kernel, sockets or codec).

Saturated decode: B requests of C prompt tokens (random ids) all running,
then a window in which the scheduler's counters (SchedulerStats: steps,
critical_rpcs, execute_bytes) are read at both ends. Figures:

* rpcs_per_step_b64 / _b256: round trips the engine awaited per step
  (critical_rpcs delta / steps delta; counted by the scheduler);
* busy_frac_5ms_b64 / busy_frac_2ms_b64: steps/s x simulated step time at
  64 sequences (1.0: the driver never waits on the OS);
* overhead_ms_per_step_b256: a 0 ms null driver, 256 sequences: the
  milliseconds of a step that are orchestration (1000 / steps/s);
* execute_bytes_per_step_b256_ctx256 / _ctx2048: encoded Execute bytes per
  steady decode step (the scheduler's execute_bytes counter), at 256 and
  2,048 tokens of context: must not grow with context;
* long_prompt_stall_ms: the largest gap between chunks of 16 streams (5 ms
  steps) while a 30,000-token text prompt arrives, minus the step time;
  long_prompt_baseline_ms: the same over an equal window with no prompt
  arriving (the machine's own noise);
* steps_ahead_frac_*: the share of steps sent before the step before them
  came back (async scheduling; SchedulerStats.steps_ahead);
* cpu_ms_per_step: per process (kernel, scheduler, memory, driver,
  security, client; in process: the one process), milliseconds of CPU
  (user + system, all threads, /proc) per step over the same window, at
  0 ms b64 / b256 and 5 ms b64: where a step's time goes.

Async scheduling (the scheduler's `async_steps`, on by default) is on in
the os and inproc columns; `--async-steps both` (the default) adds the OS
path with it off ("os sync"), side by side; `on` or `off` runs one mode.

The client (this process) shares the machine's cores with the OS it drives.
"""

from __future__ import annotations

import functools
import random
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio

from tools.bench._steps_targets import Target, booted_os, cpu_seconds, inproc_engine
from tools.bench.common import parser, print_table, write_result

TARGETS = {"rpcs_per_step_b64": "<= 1.05", "rpcs_per_step_b256": "<= 1.05", "busy_frac_5ms_b64": ">= 0.95",
           "busy_frac_2ms_b64": ">= 0.90", "overhead_ms_per_step_b256": "<= 2 (aim)",
           "execute_bytes_per_step_b256_ctx256": "flat in context",
           "execute_bytes_per_step_b256_ctx2048": "flat in context",
           "long_prompt_stall_ms": "<= 10", "long_prompt_baseline_ms": "(noise)"}
NUM_BLOCKS = 262_144
Boot = Callable[[Path, float, int, int], AbstractAsyncContextManager[Target]]


def prompt(rng: random.Random, n: int) -> list[int]:
    return [256, *(rng.randrange(256) for _ in range(n - 1))]


async def drain(target: Target, what: str) -> None:
    with anyio.fail_after(120):
        while True:
            st = await target.stats()
            if st.running == 0 and st.waiting == 0:
                return
            await anyio.sleep(0.05)


async def saturate(target: Target, batch: int, context: int, window_s: float, rng: random.Random) -> dict[str, float]:
    """`batch` sequences of `context` prompt tokens decoding; the counters over `window_s`."""
    max_tokens = NUM_BLOCKS * 16 // batch - context - 64
    rids = [f"sat-{uuid.uuid4().hex[:8]}-{i}" for i in range(batch)]
    seen = [0] * batch

    async def consume(i: int) -> None:
        def got(n: int) -> None:
            seen[i] += n
        try:
            await target.stream(prompt(rng, context), max_tokens, rids[i], got)
        except Exception:  # noqa: BLE001 - cancelled at the end of the window
            pass

    async with anyio.create_task_group() as tg:
        for i in range(batch):
            tg.start_soon(consume, i)
        with anyio.fail_after(300):
            while True:
                st = await target.stats()
                if all(seen) and st.running >= batch and st.waiting == 0:
                    break
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        pids = await target.pids()
        s0, t0 = await target.stats(), time.perf_counter()
        c0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
        await anyio.sleep(window_s)
        c1 = {role: cpu_seconds(pid) for role, pid in pids.items()}
        s1, t1 = await target.stats(), time.perf_counter()
        for rid in rids:
            await target.cancel(rid)
        tg.cancel_scope.cancel()
    await drain(target, "saturate")
    steps = s1.steps - s0.steps
    out = {"steps_per_s": steps / (t1 - t0), "running_at_end": float(s1.running)}
    if steps > 0:
        rpcs = getattr(s1, "critical_rpcs", None)
        out["rpcs_per_step"] = (rpcs - s0.critical_rpcs) / steps if rpcs is not None else float("nan")
        out["steps_ahead_frac"] = (s1.steps_ahead - s0.steps_ahead) / steps
        nbytes = getattr(s1, "execute_bytes", None)
        out["execute_bytes_per_step"] = (nbytes - s0.execute_bytes) / steps if nbytes is not None else float("nan")
        out.update({f"cpu_ms_{role}": (c1[role] - c0[role]) * 1e3 / steps for role in pids})
    return out


def largest_gap(arrivals: list[list[float]], lo: float, hi: float) -> float:
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b >= lo and a <= hi]
    return max(gaps, default=float("nan"))


async def long_prompt_stall(target: Target, step_ms: float, prompt_tokens: int, rng: random.Random) -> dict[str, float]:
    """16 streams decoding while a `prompt_tokens`-character text prompt arrives."""
    arrivals: list[list[float]] = [[] for _ in range(16)]
    rids = [f"stall-{uuid.uuid4().hex[:8]}-{i}" for i in range(16)]

    async def consume(i: int) -> None:
        try:
            await target.stream(prompt(rng, 64), 60_000, rids[i], lambda n: arrivals[i].append(time.perf_counter()))
        except Exception:  # noqa: BLE001 - cancelled at the end
            pass

    text = "".join(rng.choice("abcdefghij klmnopqrst uvwxyz") for _ in range(prompt_tokens))
    async with anyio.create_task_group() as tg:
        for i in range(16):
            tg.start_soon(consume, i)
        with anyio.fail_after(120):
            while not all(len(a) > 5 for a in arrivals):
                await anyio.sleep(0.05)
        await anyio.sleep(0.3)
        b0 = time.perf_counter()
        await target.stream(text, 1, f"long-{uuid.uuid4().hex[:8]}", lambda n: None)
        b1 = time.perf_counter()
        await anyio.sleep(0.2)
        baseline_lo = time.perf_counter()
        await anyio.sleep(b1 - b0)
        baseline_hi = time.perf_counter()
        for rid in rids:
            await target.cancel(rid)
        tg.cancel_scope.cancel()
    await drain(target, "stall")
    return {"long_prompt_stall_ms": largest_gap(arrivals, b0, b1 + 0.2) * 1e3 - step_ms,
            "long_prompt_baseline_ms": largest_gap(arrivals, baseline_lo, baseline_hi) * 1e3 - step_ms,
            "long_prompt_ttft_s": b1 - b0}


async def run_target(boot: Boot, home: Path, quick: bool) -> dict[str, float]:
    window = 1.5 if quick else 6.0
    rng = random.Random(15)
    f: dict[str, float] = {}
    async with boot(home / "zero", 0.0, 256, NUM_BLOCKS) as t:
        for batch, ctx in ((64, 256), (256, 256), (256, 2048)):
            r = await saturate(t, batch, ctx, window, rng)
            print(f"  {t.name} 0 ms b{batch} ctx{ctx}: {r}", flush=True)
            if ctx == 256:
                f[f"rpcs_per_step_b{batch}"] = r.get("rpcs_per_step", float("nan"))
            if batch == 256:
                f[f"execute_bytes_per_step_b256_ctx{ctx}"] = r.get("execute_bytes_per_step", float("nan"))
            if ctx == 256:
                f.update({f"cpu_ms_per_step_0ms_b{batch}_{k[7:]}": v for k, v in r.items() if k.startswith("cpu_ms_")})
            if ctx == 256:
                f[f"steps_ahead_frac_0ms_b{batch}"] = r.get("steps_ahead_frac", float("nan"))
            if (batch, ctx) == (256, 256):
                f["overhead_ms_per_step_b256"] = 1e3 / r["steps_per_s"]
                f["steps_per_s_0ms_b256"] = r["steps_per_s"]
            if (batch, ctx) == (64, 256):
                f["steps_per_s_0ms_b64"] = r["steps_per_s"]
    for step_ms in (5.0, 2.0):
        async with boot(home / f"s{step_ms:g}", step_ms, 256, NUM_BLOCKS) as t:
            r = await saturate(t, 64, 256, window, rng)
            print(f"  {t.name} {step_ms:g} ms b64: {r}", flush=True)
            f[f"busy_frac_{step_ms:g}ms_b64"] = r["steps_per_s"] * step_ms / 1e3
            f[f"steps_ahead_frac_{step_ms:g}ms_b64"] = r.get("steps_ahead_frac", float("nan"))
            if step_ms == 5.0:
                f["steps_per_s_5ms_b64"] = r["steps_per_s"]
                f.update({f"cpu_ms_per_step_5ms_b64_{k[7:]}": v for k, v in r.items() if k.startswith("cpu_ms_")})
            if step_ms == 5.0:
                s = await long_prompt_stall(t, step_ms, 30_000, rng)
                print(f"  {t.name} long prompt: {s}", flush=True)
                f.update(s)
    return f


def fmt(v: float | None) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


CPU_SETTINGS = ("5ms_b64", "0ms_b64", "0ms_b256")
ROLES = ("kernel", "scheduler", "memory", "driver", "security", "client", "inproc")


def cpu_rows(results: dict[str, dict[str, float]]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("process", *(f"{t} {c}" for t in results for c in CPU_SETTINGS))]
    for role in ROLES:
        cells = [results[t].get(f"cpu_ms_per_step_{c}_{role}") for t in results for c in CPU_SETTINGS]
        if any(v is not None for v in cells):
            rows.append((role, *(fmt(v) for v in cells)))
    wall = [1e3 / results[t][k] if results[t].get(k) else None
            for t in results for k in ("steps_per_s_5ms_b64", "steps_per_s_0ms_b64", "steps_per_s_0ms_b256")]
    rows.append(("(wall per step)", *(fmt(v) for v in wall)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--async-steps", choices=("on", "off", "both"), default="both",
                    help="the scheduler's async scheduling: on (os, inproc), off (os sync, inproc sync) or both")
    args = ap.parse_args(argv)
    import tempfile

    modes = {"on": (True,), "off": (False,), "both": (True, False)}[args.async_steps]
    runs: list[tuple[str, Boot]] = []
    for on in modes:
        sfx = "" if on else " sync"
        runs.append((f"os{sfx}", functools.partial(booted_os, async_steps=on)))
        if on or len(modes) == 1:  # (the in-process engine without async: only when asked alone)
            runs.append((f"inproc{sfx}", functools.partial(inproc_engine, async_steps=on)))

    async def all_runs() -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, boot in runs:
            home = Path(tempfile.mkdtemp(prefix="llmos-steps-", dir="/tmp"))
            began = time.perf_counter()
            out[name] = await run_target(boot, home, args.quick)
            print(f"  {name}: {time.perf_counter() - began:.0f} s", flush=True)
        return out

    results = anyio.run(all_runs, backend="asyncio", backend_options={"use_uvloop": True})
    names = [*TARGETS, "steps_per_s_0ms_b64", "steps_per_s_0ms_b256", "long_prompt_ttft_s",
             "steps_ahead_frac_5ms_b64", "steps_ahead_frac_2ms_b64", "steps_ahead_frac_0ms_b256"]
    rows = [("figure", *results, "target")]
    rows += [(n, *(fmt(r.get(n)) for r in results.values()), TARGETS.get(n, "")) for n in names]
    print_table("engine steps on the null driver (issue 15)", rows)
    print_table("CPU per step, ms, by process (user + system, all threads)", cpu_rows(results))
    main_name = next(iter(results))
    extra: dict[str, Any] = {k: v for k, v in results.items() if k != main_name}
    extra.update({"targets": TARGETS, "quick": args.quick, "async_steps": main_name == "os"})
    write_result(args.json, "steps", results[main_name], extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
