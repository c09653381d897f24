"""Tuning: the online tuner (on by default) against static settings, on SLO goodput, through the
OS path.

    python -m tools.bench.tuning [--quick] [--json PATH] [--workload steady|bursty|ramp ...]

The demo model, greedy, EOS ignored, requests streamed through the SDK to
`llmos up`'s processes (kernel, memory server, CPU driver, scheduler; auth
off). Three workloads, each replayed against every setting:

* steady    - interactive chat: Poisson arrivals, prompts of 32-192 tokens,
              replies of 32-96;
* bursty    - streaming chats (about one a second, replies of 48-128
              tokens) into which a burst of three documents (prompts of
              1,200-1,600 tokens, replies of 8-16) lands every 6 s: a burst
              is ~4,200 prompt tokens, 1.5-2 s of prefill on two quiet
              cores, in 512-token chunks at the static default, with the
              chats' and documents' decodes waiting on each (until
              2026-12-01 two documents of 900-1,200 tokens every 5 s: the
              default met 11/11, so the workload told no setting apart);
* ramp      - chat whose arrival rate climbs linearly from light to well
              past what a 2-core machine serves (overload).

The rates are sized for a quiet 2-core CPU machine (about 330 generated
tokens/s at saturation through the OS path: docs/benchmarks.md, Serve).

Settings: the tuner (the default: it starts from the [scheduler] limits,
512 x 64, chunk 512) and a sweep of static settings, token budget x batch
cap with the tuner off (today's default static setting, 512 x 64, among
them; the chunk 512, so a budget under it is the chunk too). The system boots
once; each workload is served by every setting in turn, the scheduler
restarted alone with the setting's table before each. With `--quick`,
bursty is served in two rounds, the second in the reverse order (tuner,
statics..., statics reversed, tuner): every arm gets six bursts, and a
drift in the machine's other load weighs on them alike; an arm's figures
are over both rounds (met and requests summed).

Objectives (the scheduler's own, by priority, and what is judged here):
chat (priority 0) the default, a first token within 1 s and 100 ms per
token after it; documents (priority 1; ignored by the fair policy's order)
a first token within 10 s. A request meets its objective when the client
saw both. Goodput is met requests per second of the workload's arrival
window. A request refused (`overloaded`: early rejection or a full queue)
or given up on (no first token within `GIVE_UP_X` times its TTFT
objective: the user has left; closing the stream cancels it) is not met.

Figures, per workload:
* goodput_ratio_vs_best_static: the tuner's goodput / the best static
  setting's, that setting chosen per workload with hindsight;
* goodput_ratio_vs_default_static: / today's default static setting's;
* ttft_p50_ratio, tpot_p50_ratio: the tuner's medians / the default static
  setting's, over the requests each served (the middle must not pay for
  the tail); chat_ttft_p50_ratio, chat_tpot_p50_ratio: the same over the
  chats alone (on bursty a median over chats and documents moves with
  which class the middle request falls in).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
import msgspec

import drivers  # noqa: F401  (first: OpenMP waits passively in this process too, as in a driver)
from common.config.scheduler import Objective
from common.home import llmos_home
from ipc.errors import LlmosError, Overloaded
from ipc.protocol.sampling import SamplingParams
from kernel.config import ChildSpec, default_children
from sdk.client import AsyncClient
from tools.bench._serve_load import Req, Timing, random_ids
# The workloads (those that tests import from here too).
from tools.bench._tuning_workloads import (CHAT, DEFAULT, DOC, FULL, QUICK, WORKLOADS, Plan, bursty, ramp,
                                           steady)
from tools.bench.common import parser, percentile, print_table, write_result
from tools.testing import running_llmos

GREEDY = SamplingParams(temperature=0.0)
OBJECTIVES = {CHAT: Objective(), DOC: Objective(ttft_ms=10_000, tpot_ms=100)}
GIVE_UP_X = 5.0


@dataclass
class Outcome:
    timing: Timing = field(default_factory=Timing)
    objective: Objective = OBJECTIVES[CHAT]
    refused: bool = False
    gave_up: bool = False

    @property
    def met(self) -> bool:
        t, o = self.timing, self.objective
        if self.refused or self.gave_up or not t.tokens:
            return False
        return t.ttft * 1e3 <= o.ttft_ms and (t.tpot or 0.0) * 1e3 <= o.tpot_ms


@dataclass
class Run:
    setting: str
    workload: str
    requests: int
    met: int
    refused: int
    gave_up: int
    goodput_rps: float
    ttft_p50_ms: float
    tpot_p50_ms: float
    token_budget: int  # at the end (the tuner's choice)
    max_num_seqs: int
    tuner_changes: int
    # The chats' own medians (the documents' first tokens are seconds: a
    # median over both classes moves with which class the middle falls in).
    chat_ttft_p50_ms: float = 0.0
    chat_tpot_p50_ms: float = 0.0
    rounds: int = 1  # the workload served this many times (met and requests summed over them)


async def serve(client: AsyncClient, req: Req, out: Outcome) -> None:
    give_up = GIVE_UP_X * out.objective.ttft_ms / 1e3
    out.timing.submitted = time.perf_counter()
    try:
        with anyio.move_on_after(give_up) as scope:
            async with client.stream_generate(req.prompt, max_tokens=req.max_tokens, params=GREEDY,
                                              ignore_eos=True, priority=req.priority) as stream:
                async for chunk in stream:
                    if chunk.token_ids and not out.timing.tokens:
                        scope.deadline = math.inf  # it started: the user stays
                    out.timing.got(len(chunk.token_ids))
        out.gave_up = scope.cancelled_caught
    except Overloaded:
        out.refused = True


async def replay(client: AsyncClient, workload: list[Req]) -> list[Outcome]:
    outcomes = [Outcome(objective=OBJECTIVES[r.priority]) for r in workload]
    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for req, out in zip(workload, outcomes):
            delay = began + req.at - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)  # the arrival schedule is the workload
            tg.start_soon(serve, client, req, out)
    return outcomes


def scheduler_table(path: Path, budget: int, seqs: int, tuner: bool) -> None:
    doc = OBJECTIVES[DOC]
    path.write_text(f"[scheduler]\ntoken_budget = {budget}\nmax_num_seqs = {seqs}\nprefill_chunk = 512\n"
                    f"[scheduler.tuner]\nenabled = {'true' if tuner else 'false'}\n"
                    f'[scheduler.tuner.priorities."{DOC}"]\nttft_ms = {doc.ttft_ms}\ntpot_ms = {doc.tpot_ms}\n')


@asynccontextmanager
async def booted(home: Path, table: Path) -> AsyncIterator[AsyncClient]:
    """`llmos up`'s children (auth off), the scheduler's table from `table`."""
    children: list[ChildSpec] = []
    for c in default_children("demo", {"cpu": 1}, kv_cache_mb=512):
        if c.name in ("security", "echo"):
            continue
        if c.name == "scheduler":
            c = msgspec.structs.replace(c, args=["--config", str(table)])
        children.append(c)
    async with running_llmos(home, children, ready_timeout=300.0) as llmos:
        yield llmos.client


async def restart_scheduler(client: AsyncClient, budget: int, tuner: bool) -> None:
    """Stop the scheduler (the supervisor starts it again, reading its table
    anew) and wait until the new one answers with the new setting."""
    await client.kill("scheduler", "SIGTERM")
    with anyio.fail_after(120):
        while True:
            try:
                st = await client.scheduler_stats()
                if st.steps == 0 and st.token_budget == budget and (st.tuner != "off") == tuner:
                    return
            except LlmosError:
                pass  # not back yet
            await anyio.sleep(0.2)


async def idle(client: AsyncClient) -> None:
    """Wait (bounded) until nothing runs or waits: the next workload starts clean."""
    with anyio.move_on_after(120):
        while True:
            st = await client.scheduler_stats()
            if not st.running and not st.waiting:
                return
            await anyio.sleep(0.2)


async def warm_up(client: AsyncClient) -> None:
    """A document and a few chats at once, discarded, right after boot: the
    first arm must not pay the driver's first long prefill (allocations,
    pages of the KV cache touched) for the others."""
    rng = random.Random(0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: client.generate(random_ids(rng, 1300), max_tokens=4, params=GREEDY, ignore_eos=True))
        for _ in range(4):
            tg.start_soon(lambda: client.generate(random_ids(rng, 96), max_tokens=32, params=GREEDY, ignore_eos=True))


def salted(workload: list[Req], salt: int) -> list[Req]:
    """The workload with each prompt's first token replaced by `salt`: the
    same lengths and arrivals, but no prompt shares a cached prefix with an
    earlier arm's (the memory server's prefix cache would hand every arm
    after the first the documents' prefill for free)."""
    return [Req(r.index, [salt, *r.prompt[1:]], r.max_tokens, r.at, r.priority) for r in workload]


async def serve_arm(client: AsyncClient, workload: list[Req], salt: int) -> tuple[list[Outcome], int]:
    """One setting serves `workload` once (its prompts salted): each request's
    outcome, and the tuner's changes counted by the scheduler."""
    await client.generate(list(range(32, 96)), max_tokens=4, params=GREEDY, ignore_eos=True)  # warm up
    outcomes = await replay(client, salted(workload, salt))
    await idle(client)
    st = await client.scheduler_stats()
    return outcomes, st.tuner_changes


def summarize(plan: Plan, setting: str, name: str, workload: list[Req], rounds: list[list[Outcome]],
              limits: tuple[int, int], tuner_changes: int) -> Run:
    """One arm's figures over its rounds (each the whole of `workload`)."""
    pairs = [(o, q) for outcomes in rounds for o, q in zip(outcomes, workload)]
    served = [o.timing for o, _ in pairs if o.timing.tokens]
    met = sum(o.met for o, _ in pairs)
    r = Run(setting, name, len(pairs), met, sum(o.refused for o, _ in pairs), sum(o.gave_up for o, _ in pairs),
            met / (plan.seconds * len(rounds)), percentile([t.ttft * 1e3 for t in served], 50),
            percentile([x * 1e3 for t in served if (x := t.tpot) is not None], 50),
            limits[0], limits[1], tuner_changes, rounds=len(rounds))
    chats = [o.timing for o, q in pairs if o.timing.tokens and q.priority == CHAT]
    r.chat_ttft_p50_ms = percentile([t.ttft * 1e3 for t in chats], 50)
    r.chat_tpot_p50_ms = percentile([x * 1e3 for t in chats if (x := t.tpot) is not None], 50)
    return r


def arm_order(settings: list[str], rounds: int) -> list[str]:
    """Each setting once a round: in order, then reversed, and so on."""
    return [s for k in range(rounds) for s in (settings if k % 2 == 0 else settings[::-1])]


def ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return 1.0 if a <= 0 else math.inf


def served(runs: list[Run]) -> list[str]:
    """The workloads `runs` served, in WORKLOADS order."""
    return [w for w in WORKLOADS if any(r.workload == w for r in runs)]


def best_static(runs: list[Run], workload: str) -> Run:
    return max((r for r in runs if r.workload == workload and r.setting != "tuner"), key=lambda r: r.goodput_rps)


def figures(runs: list[Run]) -> dict[str, float]:
    out: dict[str, float] = {}
    default = f"static {DEFAULT[0]}x{DEFAULT[1]}"
    for w in served(runs):
        mine = {r.setting: r for r in runs if r.workload == w}
        tuner, base = mine["tuner"], mine[default]
        best = best_static(runs, w).goodput_rps
        out[f"{w}.goodput_ratio_vs_best_static"] = ratio(tuner.goodput_rps, best)
        out[f"{w}.goodput_ratio_vs_default_static"] = ratio(tuner.goodput_rps, base.goodput_rps)
        out[f"{w}.ttft_p50_ratio"] = ratio(tuner.ttft_p50_ms, base.ttft_p50_ms)
        out[f"{w}.tpot_p50_ratio"] = ratio(tuner.tpot_p50_ms, base.tpot_p50_ms)
        out[f"{w}.chat_ttft_p50_ratio"] = ratio(tuner.chat_ttft_p50_ms, base.chat_ttft_p50_ms)
        out[f"{w}.chat_tpot_p50_ratio"] = ratio(tuner.chat_tpot_p50_ms, base.chat_tpot_p50_ms)
        out[f"{w}.tuner_goodput_rps"] = tuner.goodput_rps
    return out


async def main_async(home: Path, quick: bool, only: list[str] | None = None) -> tuple[list[Run], dict[str, float]]:
    plan = QUICK if quick else FULL
    rng = random.Random(19)
    workloads = {name: make(plan, rng) for name, make in WORKLOADS.items()}  # all drawn: the same with --workload
    workloads = {name: w for name, w in workloads.items() if not only or name in only}
    settings = [("tuner", *DEFAULT, True)] + [(f"static {b}x{s}", b, s, False) for b, s in plan.sweep]
    table = home / "scheduler.toml"
    scheduler_table(table, *settings[0][1:])
    runs: list[Run] = []
    by_name = {setting: (budget, seqs, tuner) for setting, budget, seqs, tuner in settings}
    salt = 0
    async with booted(home, table) as client:
        await warm_up(client)
        # Workload by workload, every setting in turn (each with a fresh
        # scheduler): a machine whose load drifts (others' work) biases one
        # workload's comparison less than a whole setting run apart.
        first = True
        for name, workload in workloads.items():
            got: dict[str, list[list[Outcome]]] = {setting: [] for setting in by_name}
            changes: dict[str, int] = {}
            limits: dict[str, tuple[int, int]] = {}
            for setting in arm_order(list(by_name), plan.rounds_of(name)):
                budget, seqs, tuner = by_name[setting]
                if not first:
                    scheduler_table(table, budget, seqs, tuner)
                    await restart_scheduler(client, budget, tuner)
                first = False
                salt += 1
                outcomes, n = await serve_arm(client, workload, salt)
                st = await client.scheduler_stats()
                got[setting].append(outcomes)
                changes[setting] = changes.get(setting, 0) + n
                limits[setting] = (st.token_budget, st.max_num_seqs)
                met = sum(o.met for o in outcomes)
                print(f"  {setting:>14} {name:>7}: {met}/{len(outcomes)} met, {sum(o.refused for o in outcomes)} "
                      f"refused, {sum(o.gave_up for o in outcomes)} gave up, limits at the end "
                      f"{st.token_budget}x{st.max_num_seqs}", file=sys.stderr, flush=True)
            for setting in by_name:
                runs.append(summarize(plan, setting, name, workload, got[setting], limits[setting], changes[setting]))
    return runs, figures(runs)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0] if __doc__ else "tuning")
    ap.add_argument("--home", type=Path, help="LLMOS_HOME for the runs (default: $LLMOS_HOME/bench/tuning)")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS),
                    help="serve only this workload (repeat for more; default: all three)")
    args = ap.parse_args(argv)
    home = (args.home or llmos_home() / "bench" / "tuning").resolve()
    home.mkdir(parents=True, exist_ok=True)
    print(f"tuning bench ({'quick' if args.quick else 'full'}), home {home}", file=sys.stderr)
    began = time.monotonic()
    runs, figs = anyio.run(main_async, home, args.quick, args.workload, backend="asyncio",
                           backend_options={"use_uvloop": True})
    took = time.monotonic() - began
    rows = [("setting", "workload", "met/requests", "refused", "gave up", "goodput/s", "TTFT p50 ms",
             "TPOT p50 ms", "budget x cap (end)")]
    for r in runs:
        rows.append((r.setting, r.workload, f"{r.met}/{r.requests}", str(r.refused), str(r.gave_up),
                     f"{r.goodput_rps:.2f}", f"{r.ttft_p50_ms:.0f}", f"{r.tpot_p50_ms:.1f}",
                     f"{r.token_budget}x{r.max_num_seqs}"))
    chat, doc = OBJECTIVES[CHAT], OBJECTIVES[DOC]
    print_table(f"goodput: chat TTFT <= {chat.ttft_ms:.0f} ms, documents <= {doc.ttft_ms:.0f} ms; "
                f"TPOT <= {chat.tpot_ms:.0f} ms", rows)
    fig_rows: list[tuple[str, ...]] = [("workload", "tuner met", "best static (met)", "default met",
                                        "vs best static", "vs default static", "TTFT p50 ratio", "TPOT p50 ratio",
                                        "chats: TTFT, TPOT p50 ratio")]
    default = f"static {DEFAULT[0]}x{DEFAULT[1]}"
    for w in served(runs):
        tuner = next(r for r in runs if r.workload == w and r.setting == "tuner")
        base = next(r for r in runs if r.workload == w and r.setting == default)
        best = best_static(runs, w)
        fig_rows.append((w, f"{tuner.met}/{tuner.requests}", f"{best.setting[len('static '):]} ({best.met})",
                         f"{base.met}/{base.requests}",
                         *(f"{figs[f'{w}.{k}']:.2f}" for k in ("goodput_ratio_vs_best_static",
                                                               "goodput_ratio_vs_default_static",
                                                               "ttft_p50_ratio", "tpot_p50_ratio")),
                         f"{figs[f'{w}.chat_ttft_p50_ratio']:.2f}, {figs[f'{w}.chat_tpot_p50_ratio']:.2f}"))
    print_table("the tuner against static settings (goodput ratios; medians tuner / default static; targets "
                ">= 0.95 vs best, >= 1.3 vs default on bursty, medians <= 1.10)", fig_rows)
    print(f"\n{took:.0f} s", file=sys.stderr)
    write_result(args.json, "tuning", figs, {"quick": args.quick, "seconds": round(took),
                                             "runs": [asdict(r) for r in runs],
                                             "objectives": {str(k): msgspec.to_builtins(o)
                                                            for k, o in OBJECTIVES.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
