"""n choices of one prompt: forked by copy-on-write against n separate requests.

    python -m tools.bench.fanout [--quick] [--json PATH]

The demo model on one CPU driver, `llmos up`'s processes (auth off); one
prompt of P random byte tokens, n choices of M tokens each (greedy, EOS
ignored), side by side in one boot (the prefix cache emptied before each):

* ``fork``: `generate_n` (one fork group: the scheduler computes the prompt
  once and the choices fork its KV blocks);
* ``separate``: n requests of the same prompt sent at once (what a client
  does where `n > 1` is refused): a request whose prefill runs after the
  first's full blocks reached the prefix cache reuses them, the others
  compute the whole prompt; no partial block is ever shared.

Per way: positions the driver computed (its health counter: prefill and
decode), the prompt positions of them (computed minus n x (M - 1) decodes),
the time to the last choice's first token and to the end. Both ways must
give the same answers (greedy): `outputs_identical`; the exit status is 1
when they differ. P=512, n=4, M=32 (--quick: P=256, n=4, M=16).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec

from common.home import llmos_home
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol.sampling import SamplingParams
from sdk.generate import Completion
from kernel.config import ChildSpec, default_children
from tools.bench._serve_targets import OsTarget
from tools.testing import running_llmos
from tools.bench.common import parser, print_table, write_result

GREEDY = SamplingParams(temperature=0.0)
WAYS = ("fork", "separate")


@dataclass(frozen=True)
class Plan:
    prompt: int
    n: int
    out: int


FULL = Plan(512, 4, 32)
QUICK = Plan(256, 4, 16)


@dataclass
class Way:
    computed: int
    prompt_positions: int
    ttft_ms: float  # the last choice's first token
    total_ms: float
    answers: list[list[int]]


async def _positions(target: OsTarget) -> int:
    health: dp.DriverHealthReply = await target.client.call("driver", dp.DriverHealth(), timeout=10.0)
    return health.tokens


async def run_way(target: OsTarget, way: str, prompt: list[int], plan: Plan) -> Way:
    c = target.client
    await c.call("memory", mp.EvictCached(), timeout=10.0)
    before = await _positions(target)
    began = time.perf_counter()
    if way == "fork":
        got = await c.generate_n(prompt, plan.n, max_tokens=plan.out, params=GREEDY, ignore_eos=True)
    else:
        out: list[Completion | None] = [None] * plan.n

        async def one(i: int) -> None:
            out[i] = await c.generate(prompt, max_tokens=plan.out, params=GREEDY, ignore_eos=True)

        async with anyio.create_task_group() as tg:
            for i in range(plan.n):
                tg.start_soon(one, i)
        got = [x for x in out if x is not None]
    total_ms = (time.perf_counter() - began) * 1e3
    computed = await _positions(target) - before
    return Way(computed, computed - plan.n * (plan.out - 1), max(g.usage.ttft_s for g in got) * 1e3, total_ms,
               [g.token_ids for g in got])


async def run_all(home: Path, plan: Plan) -> dict[str, Way]:
    rng = random.Random(11)
    prompt = [rng.randrange(32, 256) for _ in range(plan.prompt)]
    home.mkdir(parents=True, exist_ok=True)
    # The tuner's early rejection off: n requests at once are the point here, not an objective.
    (home / "scheduler.toml").write_text("[scheduler.tuner]\nenabled = false\nreject_factor = 0\n")
    children: list[ChildSpec] = []
    for c in default_children("demo", {"cpu": 1}, kv_cache_mb=256):
        if c.name in ("security", "echo"):
            continue
        if c.name == "scheduler":
            c = msgspec.structs.replace(c, args=["--config", str(home / "scheduler.toml")])
        children.append(c)
    async with running_llmos(home, children, ready_timeout=300.0) as llmos:
        target = OsTarget(llmos.client)
        await target.client.generate(list(range(32, 96)), max_tokens=4, params=GREEDY)  # warm-up
        return {way: await run_way(target, way, prompt, plan) for way in WAYS}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, help="LLMOS_HOME for the run (default: $LLMOS_HOME/bench/fanout)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    home = (args.home or llmos_home() / "bench" / "fanout").resolve()
    began = time.perf_counter()
    runs = anyio.run(run_all, home, plan, backend="asyncio")
    first = runs["fork"].answers[0]
    identical = all(a == first for w in WAYS for a in runs[w].answers)
    rows: list[tuple[str, ...]] = [("way", "positions computed", "prompt positions", "last TTFT ms", "total ms")]
    for w in WAYS:
        r = runs[w]
        rows.append((w, str(r.computed), str(r.prompt_positions), f"{r.ttft_ms:.0f}", f"{r.total_ms:.0f}"))
    print_table(f"fanout: n={plan.n} choices of a {plan.prompt}-token prompt, {plan.out} generated each, demo model, "
                f"CPU (outputs identical: {identical})", rows)
    figures: dict[str, float] = {}
    for w in WAYS:
        figures[f"{w}_computed_positions"] = runs[w].computed
        figures[f"{w}_prompt_positions"] = runs[w].prompt_positions
        figures[f"{w}_last_ttft_ms"] = round(runs[w].ttft_ms, 1)
        figures[f"{w}_total_ms"] = round(runs[w].total_ms, 1)
    figures["prompt_positions_ratio"] = round(runs["separate"].prompt_positions / max(1, runs["fork"].prompt_positions), 2)
    write_result(args.json, "fanout", figures, {"plan": plan.__dict__, "outputs_identical": identical,
                                                "wall_s": round(time.perf_counter() - began, 1)})
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
