"""The tuning benchmark's workloads, verdicts and figures (no timing asserted)."""

from __future__ import annotations

import hashlib
import math
import random

import pytest

from tools.bench._serve_load import Req, Timing
from tools.bench._tuning_client import OBJECTIVES, Calibration, Outcome, salted
from tools.bench._tuning_workloads import (CHAT, DOC, FULL, MAX_BURST, QUICK, REFERENCE_PREFILL_TPS, burst_prefill_s,
                                           bursty, ramp, sized_bursty, steady)
from tools.bench.tuning import Run, arm_order, draw, figures, ratio, sized_workload, summarize


def test_the_three_workloads_have_their_shapes() -> None:
    for plan in (QUICK, FULL):
        chat = steady(plan, random.Random(1))
        assert all(0 <= r.at < plan.seconds and 32 <= len(r.prompt) <= 256 for r in chat)
        burst = bursty(plan, random.Random(1))
        longs = [r for r in burst if len(r.prompt) >= 900]
        assert len(longs) >= plan.burst_size * 2 and all(r.max_tokens <= 16 and r.priority == DOC for r in longs)
        assert all(r.priority == CHAT for r in burst if r not in longs)
        assert [r.index for r in burst] == list(range(len(burst))) and burst == sorted(burst, key=lambda r: r.at)
        up = ramp(plan, random.Random(1))
        first = sum(1 for r in up if r.at < plan.seconds / 2)
        assert len(up) - first > 1.5 * first  # the rate climbs: most arrivals come late (2.6x expected)


def test_a_request_meets_its_objectives_only_when_served_in_time() -> None:
    fast = Outcome(Timing(submitted=0.0, first=0.5, last=0.5 + 9 * 0.05, tokens=10))
    slow_start = Outcome(Timing(submitted=0.0, first=1.5, last=1.58, tokens=2))
    slow_stream = Outcome(Timing(submitted=0.0, first=0.2, last=0.2 + 9 * 0.2, tokens=10))
    assert fast.met and not slow_start.met and not slow_stream.met
    assert not Outcome(fast.timing, refused=True).met and not Outcome(fast.timing, gave_up=True).met
    assert not Outcome().met
    # A document's first token may take 10 s.
    assert Outcome(slow_start.timing, OBJECTIVES[DOC]).met


def run(setting: str, workload: str, goodput: float, ttft: float = 100.0, tpot: float = 20.0) -> Run:
    return Run(setting, workload, 10, int(goodput * 10), 0, 0, goodput, ttft, tpot, 512, 64, 0)


def test_figures_pick_the_best_static_setting_per_workload_with_hindsight() -> None:
    runs = []
    for w, best in (("steady", "static 128x16"), ("bursty", "static 512x64"), ("ramp", "static 128x16")):
        runs += [run("tuner", w, 0.9, ttft=110.0, tpot=18.0), run("static 512x64", w, 0.5),
                 run("static 128x16", w, 0.5)]
        next(r for r in runs[-2:] if r.setting == best).goodput_rps = 1.0
    for r in runs:
        r.chat_ttft_p50_ms, r.chat_tpot_p50_ms = (60.0, 30.0) if r.setting == "tuner" else (50.0, 40.0)
    figs = figures(runs)
    assert figs["bursty.chat_ttft_p50_ratio"] == 1.2 and figs["bursty.chat_tpot_p50_ratio"] == 0.75
    assert figs["steady.goodput_ratio_vs_best_static"] == 0.9
    assert figs["steady.goodput_ratio_vs_default_static"] == 0.9 / 0.5
    assert figs["bursty.goodput_ratio_vs_default_static"] == 0.9
    assert math.isclose(figs["ramp.ttft_p50_ratio"], 1.1) and math.isclose(figs["ramp.tpot_p50_ratio"], 0.9)
    assert ratio(0.0, 0.0) == 1.0 and ratio(1.0, 0.0) == math.inf


def test_each_arm_gets_prompts_no_earlier_arm_cached() -> None:
    work = bursty(QUICK, random.Random(1))
    one, two = salted(work, 1), salted(work, 2)
    assert all(a.prompt[0] == 1 and b.prompt[0] == 2 and a.prompt[1:] == b.prompt[1:] == r.prompt[1:]
               and (a.at, a.max_tokens, a.priority) == (r.at, r.max_tokens, r.priority)
               for a, b, r in zip(one, two, work))


def test_arms_in_rounds_alternate_their_order_and_count_every_round() -> None:
    assert arm_order(["tuner", "a", "b"], 2) == ["tuner", "a", "b", "b", "a", "tuner"]
    assert arm_order(["tuner", "a"], 1) == ["tuner", "a"] and QUICK.rounds_of("bursty") == 2
    assert QUICK.rounds_of("steady") == FULL.rounds_of("bursty") == 1
    work = bursty(QUICK, random.Random(1))[:3]
    met = Outcome(Timing(submitted=0.0, first=0.5, last=0.5 + 9 * 0.05, tokens=10))
    late = Outcome(Timing(submitted=0.0, first=1.5, last=1.58, tokens=2))
    r = summarize(QUICK, "tuner", "bursty", work, [[met, late, Outcome(gave_up=True)], [met, met, met]], (512, 64), 3)
    assert (r.requests, r.met, r.gave_up, r.rounds) == (6, 4, 1, 2)
    assert r.goodput_rps == 4 / (2 * QUICK.seconds)  # per second of both rounds' arrival windows


def test_a_faster_machine_gets_a_proportionally_larger_burst_within_bounds() -> None:
    ref = sized_bursty(QUICK, REFERENCE_PREFILL_TPS)
    assert ref == QUICK  # the reference machine serves the fixed workload
    assert sized_bursty(QUICK, 2 * REFERENCE_PREFILL_TPS).burst_size == 2 * QUICK.burst_size
    assert sized_bursty(QUICK, 3 * REFERENCE_PREFILL_TPS).burst_size == 3 * QUICK.burst_size
    assert sized_bursty(QUICK, REFERENCE_PREFILL_TPS / 3).burst_size == 1
    assert sized_bursty(QUICK, REFERENCE_PREFILL_TPS / 100).burst_size == 1  # never an empty burst
    assert sized_bursty(QUICK, 100 * REFERENCE_PREFILL_TPS).burst_size == MAX_BURST
    # A burst's prefill takes the reference's seconds, whatever the machine (to a whole document).
    for speed in (1.0, 1.4, 2.0, 2.5, 3.3):
        tps = speed * REFERENCE_PREFILL_TPS
        sized = sized_bursty(QUICK, tps)
        assert abs(burst_prefill_s(sized, tps) - burst_prefill_s(QUICK, REFERENCE_PREFILL_TPS)) <= (
            0.5 * sum(QUICK.doc_tokens) / 2 / tps + 1e-9)
        # Only the burst's size moves: the documents, their spacing and the chats stay.
        assert (sized.doc_tokens, sized.burst_every_s, sized.chat_rate, sized.seconds, sized.rounds) == (
            QUICK.doc_tokens, QUICK.burst_every_s, QUICK.chat_rate, QUICK.seconds, QUICK.rounds)
    assert math.isclose(burst_prefill_s(QUICK, REFERENCE_PREFILL_TPS), 1.75)
    # Documents stay within the demo model's context (2,048 positions) with their replies.
    work = bursty(sized_bursty(QUICK, 2 * REFERENCE_PREFILL_TPS), random.Random(1))
    docs = [r for r in work if r.priority == DOC]
    assert len(docs) == 3 * 2 * QUICK.burst_size and all(len(r.prompt) + r.max_tokens <= 2048 for r in docs)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="prefill_tps"):
            sized_bursty(QUICK, bad)


def test_the_fixed_workloads_are_unchanged_and_the_sized_bursty_keeps_the_fixed_chats() -> None:
    workloads, before_bursty = draw(QUICK)
    assert {n: (len(w), digest(w)) for n, w in workloads.items()} == {
        "steady": (24, "e08fd1f6e835d5ab"), "bursty": (35, "98e94ff90c7d49ae"), "ramp": (79, "2168bfaca065fd5f")}
    cal = Calibration(2.5 * REFERENCE_PREFILL_TPS, [], 20.0)
    sized = sized_workload(QUICK, before_bursty, cal)
    assert cal.burst_size == 8 and math.isclose(cal.burst_prefill_s, 8 * 1400 / (2.5 * REFERENCE_PREFILL_TPS))
    chats = [(r.prompt, r.max_tokens, r.at) for r in sized if r.priority == CHAT]
    assert chats == [(r.prompt, r.max_tokens, r.at) for r in workloads["bursty"] if r.priority == CHAT]
    assert sum(r.priority == DOC for r in sized) == 3 * 8  # three bursts in the 16 s window
    assert [r.index for r in sized] == list(range(len(sized))) and sized == sorted(sized, key=lambda r: r.at)


def digest(work: list[Req]) -> str:
    return hashlib.sha256(repr([(r.index, r.prompt, r.max_tokens, r.at, r.priority) for r in work]).encode()
                          ).hexdigest()[:16]
