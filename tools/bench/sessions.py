"""Sessions: a multi-turn conversation kept by the OS against re-sending its history.

    python -m tools.bench.sessions [--quick] [--json PATH]

The demo model on one CPU driver, `llmos up`'s processes (auth off); one
conversation of T turns, each turn N new random byte tokens and M generated
(greedy, EOS ignored), one turn at a time. The same conversation is run
three ways, side by side in one boot (the prefix cache emptied and the
session closed between ways):

* ``session``: each turn sends only its new tokens with `session=`; the
  scheduler binds it to the history and forks the last turn's pinned KV;
* ``resend``: each turn re-sends the whole history as a plain request (the
  prefix cache alone keeps its full blocks, when nothing evicted them);
* ``resend-cold``: as resend, with the prefix cache emptied before each turn
  (`EvictCached`): a busy server where others' work evicted it. The
  session's pinned KV survives that; this way has nothing.

Per way and turn: tokens the client sent, positions the driver computed
(its health counter: the truth, prefill and decode), cached prompt tokens
(usage) and TTFT. Every way must give the same answers (greedy):
`outputs_identical`; the exit status is 1 when they differ. T=6, N=160,
M=64 (--quick: T=4, N=96, M=32).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from common.config.scheduler import SchedulerConfig
from common.home import llmos_home
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol.sampling import SamplingParams
from tools.bench._serve_targets import OsTarget, booted_os
from tools.bench.common import parser, print_table, write_result

GREEDY = SamplingParams(temperature=0.0)
WAYS = ("session", "resend", "resend-cold")


@dataclass(frozen=True)
class Plan:
    turns: int
    new: int
    out: int


FULL = Plan(6, 160, 64)
QUICK = Plan(4, 96, 32)


@dataclass
class Turn:
    sent: int
    computed: int
    cached: int
    ttft_ms: float
    answer: list[int]


async def _positions(target: OsTarget) -> int:
    health: dp.DriverHealthReply = await target.client.call("driver", dp.DriverHealth(), timeout=10.0)
    return health.tokens


async def run_way(target: OsTarget, way: str, news: list[list[int]], out: int) -> list[Turn]:
    c = target.client
    await c.call("memory", mp.EvictCached(), timeout=10.0)
    history: list[int] = []
    turns = []
    for k, new in enumerate(news):
        if way == "resend-cold":
            await c.call("memory", mp.EvictCached(), timeout=10.0)
        before = await _positions(target)
        prompt = new if way == "session" else history + new
        got = await c.generate(prompt, max_tokens=out, params=GREEDY, ignore_eos=True,
                               session="bench" if way == "session" else "", request_id=f"{way}-{k}")
        turns.append(Turn(len(prompt), await _positions(target) - before, got.usage.cached_tokens,
                          got.usage.ttft_s * 1e3, got.token_ids))
        history += new + got.token_ids
    if way == "session":
        await c.sessions.close("bench")
    return turns


async def run_all(home: Path, plan: Plan) -> dict[str, list[Turn]]:
    rng = random.Random(7)
    news = [[rng.randrange(32, 256) for _ in range(plan.new)] for _ in range(plan.turns)]
    async with booted_os(home, SchedulerConfig(), kv_cache_mb=256) as target:
        await target.client.generate(list(range(32, 96)), max_tokens=4, params=GREEDY)  # warm-up
        return {way: await run_way(target, way, news, plan.out) for way in WAYS}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, help="LLMOS_HOME for the run (default: $LLMOS_HOME/bench/sessions)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    home = (args.home or llmos_home() / "bench" / "sessions").resolve()
    began = time.perf_counter()
    runs = anyio.run(run_all, home, plan, backend="asyncio")
    identical = all([t.answer for t in runs[w]] == [t.answer for t in runs["session"]] for w in WAYS)
    rows: list[tuple[str, ...]] = [("turn", *(f"{w} {x}" for w in WAYS for x in ("sent", "computed", "ttft ms")))]
    for k in range(plan.turns):
        rows.append((str(k + 1), *(v for w in WAYS for v in (str(runs[w][k].sent), str(runs[w][k].computed),
                                                                 f"{runs[w][k].ttft_ms:.0f}"))))
    rows.append(("total", *(v for w in WAYS for v in (str(sum(t.sent for t in runs[w])),
                                                      str(sum(t.computed for t in runs[w])),
                                                      f"{sum(t.ttft_ms for t in runs[w]):.0f}"))))
    print_table(f"sessions: {plan.turns} turns of {plan.new} new + {plan.out} generated tokens, demo model, "
                f"CPU (outputs identical: {identical})", rows)
    figures: dict[str, float] = {}
    for w in WAYS:
        key = w.replace("-", "_")
        figures[f"{key}_sent_tokens"] = sum(t.sent for t in runs[w])
        figures[f"{key}_computed_positions"] = sum(t.computed for t in runs[w])
        figures[f"{key}_ttft_ms_last_turn"] = runs[w][-1].ttft_ms
        figures[f"{key}_cached_tokens_last_turn"] = runs[w][-1].cached
    write_result(args.json, "sessions", figures,
                 {"plan": plan.__dict__, "outputs_identical": identical,
                  "per_turn": {w: [t.__dict__ | {"answer": None} for t in runs[w]] for w in WAYS},
                  "wall_s": round(time.perf_counter() - began, 1)})
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
