"""Scale-out on Ray: null drivers on a one-host simulated Ray cluster of 2 nodes.

    python -m tools.bench.scaleout [--quick] [--json FILE]

`scaling_efficiency_K`: aggregate decode tokens/s with K null drivers spread
over 2 simulated nodes (the Ray launcher), divided by K × the figure of one
driver on the same launcher; side by side, the local launcher's figures.
The null driver (drivers/null.py) simulates a fixed step time, so the
simulated device does not use the host's cores: what is measured is llmos's
own overhead (kernel, scheduler, wire) as drivers are added.

`node_loss_lost`: requests that did not finish exactly once with the null
driver's tokens after the node holding most drivers was removed
(`remove_node(allow_graceful=False)`) mid-generation; `node_loss_recovery_s`:
the longest any stream waited for its next token after the removal (the
lost node's sequences recomputed on the drivers left).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from drivers.null import continuation
from ipc.protocol.scheduler import FinishReason
from text.tokenizer import ByteTokenizer
from tools.bench.common import parser, print_table, write_result
from tools.raysim import launcher, null_children_on_nodes, placements, start_cluster
from tools.testing import running_llmos

GREEDY = dict(temperature=0.0, ignore_eos=True)


@dataclass(frozen=True)
class Plan:
    drivers: tuple[int, ...]
    seqs_per_driver: int
    tokens: int
    step_ms: float
    local: tuple[int, ...]  # the local launcher's side-by-side runs


QUICK = Plan(drivers=(1, 4), seqs_per_driver=8, tokens=64, step_ms=20.0, local=(1, 4))
FULL = Plan(drivers=(1, 4, 8, 16), seqs_per_driver=8, tokens=200, step_ms=20.0, local=(1, 4))


def prompts(n: int) -> list[str]:
    return [f"request {i} of the scale-out bench" for i in range(n)]


def driver_args(plan: Plan) -> tuple[str, ...]:
    return ("--step-ms", f"{plan.step_ms:g}", "--block-size", "16")


def scheduler_args(drivers: int) -> tuple[str, ...]:
    """The scheduler's step limits are over all drivers together (one step
    plans every pool): K drivers get K times the defaults (64 sequences,
    512 tokens), as an operator running data parallel would set them."""
    return ("--max-seqs", str(64 * drivers), "--token-budget", str(512 * drivers))


async def throughput(home: Path, plan: Plan, drivers: int, cluster: Any | None) -> tuple[float, bool]:
    """Decode tokens/s of `drivers` null drivers under seqs_per_driver streams each;
    and whether every output was the null driver's."""
    tok = ByteTokenizer()
    ps = prompts(drivers * plan.seqs_per_driver)
    kw: dict[str, Any] = {"launcher": launcher(cluster)} if cluster is not None else {}
    async with running_llmos(home, null_children_on_nodes(drivers, *driver_args(plan),
                                                          scheduler_args=scheduler_args(drivers)),
                             ready_timeout=600, **kw) as llmos:
        c = llmos.client
        await c.generate("warm up", max_tokens=4, **GREEDY)
        outs: list[list[int]] = [[] for _ in ps]

        async def one(i: int) -> None:
            done = await c.generate(ps[i], max_tokens=plan.tokens, **GREEDY)
            outs[i] = done.token_ids
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(len(ps)):
                tg.start_soon(one, i)
        wall = time.perf_counter() - t0
    right = all(o == continuation(tok.encode(p), plan.tokens) for o, p in zip(outs, ps))
    return sum(len(o) for o in outs) / wall, right


async def node_loss(home: Path, plan: Plan, cluster: Any, drivers: int = 4) -> tuple[int, float, int]:
    """(requests lost, the longest stall of a stream after the node's removal,
    drivers that were on the node)."""
    tok = ByteTokenizer()
    ps = prompts(drivers * plan.seqs_per_driver)
    tokens = max(plan.tokens, 150)
    async with running_llmos(home, null_children_on_nodes(drivers, *driver_args(plan),
                                                          scheduler_args=scheduler_args(drivers)),
                             ready_timeout=600, launcher=launcher(cluster)) as llmos:
        c = llmos.client
        held: list[list[int]] = [[] for _ in ps]
        finals = [0] * len(ps)
        last_token = [0.0] * len(ps)
        stall = [0.0] * len(ps)  # each stream's longest wait for a token after the node was lost
        lost_at = float("inf")
        started = anyio.Event()

        async def run(i: int) -> None:
            async for ch in c.stream_generate(ps[i], max_tokens=tokens, **GREEDY):
                held[i].extend(ch.token_ids)
                now = time.perf_counter()
                if now > lost_at:
                    stall[i] = max(stall[i], now - max(last_token[i], lost_at))
                last_token[i] = now
                finals[i] += ch.finish_reason is not None
                if all(len(h) >= 10 for h in held):
                    started.set()
        async with anyio.create_task_group() as tg:
            for i in range(len(ps)):
                tg.start_soon(run, i)
            await started.wait()
            where = await anyio.to_thread.run_sync(placements, llmos.home)
            st = await c.status()
            on: dict[str, int] = {}
            for inst in st.instances:
                if inst.service == "driver" and inst.pid in where:
                    on[where[inst.pid]] = on.get(where[inst.pid], 0) + 1
            victim_id = max(on, key=lambda n: on[n])
            victim = next(n for n in cluster.list_all_nodes() if n.node_id == victim_id)
            lost_at = time.perf_counter()
            await anyio.to_thread.run_sync(lambda: cluster.remove_node(victim, allow_graceful=False))
    # The streams on the lost node's drivers stall until the scheduler has
    # recomputed them elsewhere: the longest stall is the recovery.
    recovery = max(stall)
    lost = sum(1 for h, f, p in zip(held, finals, ps)
               if f != 1 or h != continuation(tok.encode(p), tokens))
    return lost, recovery, on[victim_id]


async def run_local(root: Path, plan: Plan) -> dict[str, float]:
    figures: dict[str, float] = {}
    for k in plan.local:
        figures[f"local_tps_{k}"], ok = await throughput(root / f"local{k}", plan, k, None)
        figures[f"local_outputs_ok_{k}"] = float(ok)
    return figures


async def run_ray(root: Path, plan: Plan, cluster: Any) -> dict[str, float]:
    figures: dict[str, float] = {}
    for k in plan.drivers:
        figures[f"ray_tps_{k}"], ok = await throughput(root / f"ray{k}", plan, k, cluster)
        figures[f"ray_outputs_ok_{k}"] = float(ok)
    lost, rec, on_node = await node_loss(root / "loss", plan, cluster)
    figures["node_loss_lost"], figures["node_loss_recovery_s"] = float(lost), rec
    figures["node_loss_drivers_on_node"] = float(on_node)
    return figures


def run_all(plan: Plan) -> dict[str, float]:
    """The local runs, then the Ray ones (a Ray cluster starts and stops
    only on the main thread, so outside the event loop)."""
    opts: dict[str, Any] = dict(backend="asyncio", backend_options={"use_uvloop": True})
    with tempfile.TemporaryDirectory(prefix="llmos-so-", dir="/tmp") as tmp:
        root = Path(tmp)
        figures = anyio.run(run_local, root, plan, **opts)
        cluster = start_cluster(2, drivers_per_node=max(plan.drivers))
        try:
            figures.update(anyio.run(run_ray, root, plan, cluster, **opts))
        finally:
            cluster.shutdown()
    for k in plan.drivers[1:]:
        figures[f"scaling_efficiency_{k}"] = figures[f"ray_tps_{k}"] / (k * figures["ray_tps_1"])
    for k in plan.local[1:]:
        figures[f"local_scaling_efficiency_{k}"] = figures[f"local_tps_{k}"] / (k * figures["local_tps_1"])
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--step-ms", type=float, help="the null drivers' simulated step time (default 20)")
    ap.add_argument("--streams-per-driver", type=int,
                    help="concurrent streams per driver (default 8); fewer shows the per-driver cost apart "
                         "from the per-token one (docs/scale-out.md, where the time goes)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.step_ms is not None:
        if not 0 < args.step_ms <= 10_000:
            ap.error("--step-ms must be in (0, 10000]")
        plan = replace(plan, step_ms=args.step_ms)
    if args.streams_per_driver is not None:
        if not 1 <= args.streams_per_driver <= 256:
            ap.error("--streams-per-driver must be in [1, 256]")
        plan = replace(plan, seqs_per_driver=args.streams_per_driver)
    t0 = time.perf_counter()
    f = run_all(plan)
    rows = [("drivers", "ray tok/s", "ray efficiency", "local tok/s", "local efficiency")]
    for k in sorted(set(plan.drivers) | set(plan.local)):
        def cell(key: str, fmt: str = "{:.0f}") -> str:
            return fmt.format(f[key]) if key in f else "-"
        eff = "1.00" if k == 1 else cell(f"scaling_efficiency_{k}", "{:.2f}")
        leff = "1.00" if k == 1 else cell(f"local_scaling_efficiency_{k}", "{:.2f}")
        rows.append((str(k), cell(f"ray_tps_{k}"), eff, cell(f"local_tps_{k}"), leff))
    print_table(f"scale-out: null drivers ({plan.step_ms:g} ms steps), {plan.seqs_per_driver} streams × "
                f"{plan.tokens} tokens per driver, 2 simulated Ray nodes ({time.perf_counter() - t0:.0f} s; "
                f"reference: K × the 1-driver figure)", rows)
    print_table("node loss (4 drivers over 2 nodes, the node with most removed mid-generation)",
                [("drivers on it", "requests lost", "recovery s (longest stall)"),
                 (f"{f['node_loss_drivers_on_node']:.0f}", f"{f['node_loss_lost']:.0f}",
                  f"{f['node_loss_recovery_s']:.2f}")])
    bad = [k for k, v in f.items() if "outputs_ok" in k and not v]
    if bad:
        print(f"outputs differ from the null driver's: {bad}", file=sys.stderr)
    write_result(args.json, "scaleout", f, {"plan": plan.__dict__})
    return 1 if bad or f["node_loss_lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
