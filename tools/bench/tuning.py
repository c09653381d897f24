"""Tuning: the online tuner (on by default) against static settings, on SLO goodput, through the
OS path.

    python -m tools.bench.tuning [--quick] [--json PATH] [--workload steady|bursty|ramp ...] [--sized]

The demo model, greedy, EOS ignored, requests streamed through the SDK to
`llmos up`'s processes (kernel, memory server, CPU driver, scheduler; auth
off). Three workloads, each replayed against every setting:

* steady    - interactive chat: Poisson arrivals, prompts of 32-192 tokens,
              replies of 32-96;
* bursty    - streaming chats (about one a second, replies of 48-128
              tokens) into which a burst of documents (prompts of
              1,200-1,600 tokens, replies of 8-16) lands every 6 s: three
              documents a burst (~4,200 prompt tokens; until 2026-12-01 two
              documents of 900-1,200 tokens every 5 s: the default met
              11/11, so the workload told no setting apart); `--sized`:
              as many documents as make a burst 1.75 s of prefill on this
              machine (below, experimental);
* ramp      - chat whose arrival rate climbs linearly from light to well
              past what a 2-core machine serves (overload).

The chat rates are sized for a quiet 2-core CPU machine (about 330
generated tokens/s at saturation through the OS path: docs/benchmarks.md,
Serve).

Sizing (`--sized`, issue 19, fourth session; not the default). A fixed burst measures the machine (and
the tree), not the tuner: on the AMD EPYC (float32) the workload was built
on the default static setting met 4 of 18, on an AMX Xeon (bf16) 57-60 of
70. So after the warm-up, with the default static setting (512 x 64, tuner
off) and nothing else running, the bench times CALIBRATION_DOCS documents
of CALIBRATION_DOC_TOKENS tokens alone (to their first token) and one lone
chat: prefill tokens/s is the documents' median, the decode step the chat's
mean time per output token; both are printed and recorded in the JSON
(`calibration`). The burst then holds 3 x measured / reference documents
(REFERENCE_PREFILL_TPS, 2,400 tokens/s, the EPYC's; rounded, 1 to
MAX_BURST), so its prefill takes the seconds the reference's three did (a
chat arriving in a burst waits those seconds for its first token at the
default); the documents' lengths, the bursts' spacing and the chats are
unchanged (tools/bench/_tuning_workloads.py, `sized_bursty`). A machine the
measurement finds loaded gets a smaller burst: the overload is sized to the
machine as it is during the run. The decode step is recorded, not used: the
chats' per-token misses depend on it too (docs/benchmarks.md, issue 19's
sized bursty). Why it is not the default: on the quiet AMX Xeon the
calibration read 1,608 and 3,218 tokens/s in two runs minutes apart (2 and
4 documents a burst), and at 4 every arm collapsed (0-12 of 38 met, the
default 0-1): a burst sized by prefill alone is not the same overload on
another machine, and the figure moved with the calibration's noise.
Steady and ramp are not sized: steady is the light load where nothing should
be at risk (what it tests is that the tuner's middle does not pay), and the
ramp's overload is a rate climbing to 8 chats a second, decode-bound, which
a prefill figure does not size (on the quiet AMX Xeon every static arm met
79/79 of it: a decode-sized ramp is left to its own change).

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
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import msgspec

import drivers  # noqa: F401  (first: OpenMP waits passively in this process too, as in a driver)
from common.home import llmos_home
from tools.bench._tuning_client import (OBJECTIVES, Calibration, Outcome, booted, calibrate, restart_scheduler,
                                        scheduler_table, serve_arm, warm_up)
from tools.bench._serve_load import Req
from tools.bench._tuning_workloads import (CHAT, DEFAULT, DOC, FULL, MAX_BURST, QUICK, REFERENCE_PREFILL_TPS,
                                           WORKLOADS, Plan, burst_prefill_s, bursty, sized_bursty)
from tools.bench.common import parser, percentile, print_table, write_result


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


def draw(plan: Plan) -> tuple[dict[str, list[Req]], tuple[object, ...]]:
    """The three workloads, drawn in order from one seed (the same with --workload), and the seed's state
    before bursty's draw (a sized bursty is drawn from it: the same chats)."""
    rng = random.Random(19)
    workloads, before_bursty = {}, rng.getstate()
    for name, make in WORKLOADS.items():
        if name == "bursty":
            before_bursty = rng.getstate()
        workloads[name] = make(plan, rng)
    return workloads, before_bursty


def sized_workload(plan: Plan, before_bursty: tuple[object, ...], cal: Calibration) -> list[Req]:
    """Bursty sized to the calibrated machine (`sized_bursty`), its chats those of the fixed draw; notes
    the burst in `cal`."""
    sized = sized_bursty(plan, cal.prefill_tps)
    cal.burst_size, cal.burst_prefill_s = sized.burst_size, burst_prefill_s(sized, cal.prefill_tps)
    rng = random.Random()
    rng.setstate(before_bursty)
    return bursty(sized, rng)


async def main_async(home: Path, quick: bool, only: list[str] | None = None,
                     sized: bool = False) -> tuple[list[Run], dict[str, float], Calibration]:
    fixed_load = not sized
    plan = QUICK if quick else FULL
    workloads, before_bursty = draw(plan)
    workloads = {name: w for name, w in workloads.items() if not only or name in only}
    settings = [("tuner", *DEFAULT, True)] + [(f"static {b}x{s}", b, s, False) for b, s in plan.sweep]
    table = home / "scheduler.toml"
    scheduler_table(table, *DEFAULT, False)  # the calibration's setting: every arm restarts the scheduler
    runs: list[Run] = []
    by_name = {setting: (budget, seqs, tuner) for setting, budget, seqs, tuner in settings}
    salt = 0
    async with booted(home, table) as client:
        await warm_up(client)
        cal = await calibrate(client, random.Random(7))
        cal.fixed_load = fixed_load
        cal.reference_burst_prefill_s = burst_prefill_s(plan, REFERENCE_PREFILL_TPS)
        if fixed_load:
            cal.burst_size, cal.burst_prefill_s = plan.burst_size, burst_prefill_s(plan, cal.prefill_tps)
        elif "bursty" in workloads:
            workloads["bursty"] = sized_workload(plan, before_bursty, cal)
        print(f"  this machine, alone, at the default static setting: prefill {cal.prefill_tps:.0f} tokens/s "
              f"(runs {', '.join(f'{x:.0f}' for x in cal.prefill_runs_tps)}; the reference "
              f"{REFERENCE_PREFILL_TPS:.0f}), decode step {cal.decode_step_ms:.1f} ms; bursty: "
              f"{cal.burst_size} documents a burst{'' if fixed_load else ' (--sized)'}, "
              f"{cal.burst_prefill_s:.2f} s of prefill each (the reference's {cal.reference_burst_prefill_s:.2f} s)"
              + (f"; capped at {MAX_BURST}: a burst overloads this machine less than the reference"
                 if not fixed_load and cal.burst_size == MAX_BURST else ""), file=sys.stderr, flush=True)
        # Workload by workload, every setting in turn (each with a fresh
        # scheduler): a machine whose load drifts (others' work) biases one
        # workload's comparison less than a whole setting run apart.
        for name, workload in workloads.items():
            got: dict[str, list[list[Outcome]]] = {setting: [] for setting in by_name}
            changes: dict[str, int] = {}
            limits: dict[str, tuple[int, int]] = {}
            for setting in arm_order(list(by_name), plan.rounds_of(name)):
                budget, seqs, tuner = by_name[setting]
                scheduler_table(table, budget, seqs, tuner)
                await restart_scheduler(client, budget, tuner)
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
    return runs, figures(runs), cal


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0] if __doc__ else "tuning")
    ap.add_argument("--home", type=Path, help="LLMOS_HOME for the runs (default: $LLMOS_HOME/bench/tuning)")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS),
                    help="serve only this workload (repeat for more; default: all three)")
    ap.add_argument("--sized", action="store_true",
                    help="size bursty's bursts to this machine's measured prefill instead of three documents a "
                         "burst (experimental: not the default, see the module's docstring)")
    args = ap.parse_args(argv)
    home = (args.home or llmos_home() / "bench" / "tuning").resolve()
    home.mkdir(parents=True, exist_ok=True)
    print(f"tuning bench ({'quick' if args.quick else 'full'}), home {home}", file=sys.stderr)
    began = time.monotonic()
    runs, figs, cal = anyio.run(main_async, home, args.quick, args.workload, args.sized, backend="asyncio",
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
                                             "calibration": asdict(cal),
                                             "runs": [asdict(r) for r in runs],
                                             "objectives": {str(k): msgspec.to_builtins(o)
                                                            for k, o in OBJECTIVES.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
