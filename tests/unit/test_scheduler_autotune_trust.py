"""The tuner's trust in its model (issue 19, sixth pass): the budget cut and
the batch cap bind only while the last steps run within 1.25x of what the
model predicts; a model fitted on a slower machine (or rescaled by a reset)
leaves the configured limits alone until the steps bear it out."""

from __future__ import annotations

import random

from services.scheduler.autotune import AutoTuner, Knobs, LatencyModel, StepShape
from tests.helpers.tuner_sim import Device, Sim, bench_chat, fresh, goodput, median

CEILING = Knobs(512, 64, 512)  # today's default static setting


def test_a_model_fitted_on_a_slower_machine_binds_nothing_until_the_steps_bear_it_out() -> None:
    # Issue 19's quiet-machine ramp: no arm ever overloaded, yet the tuner
    # capped the batch at 3 on a model that over-predicted (the next log line:
    # "the last steps ran 0.64x the time the model predicted: refitted") and
    # its medians rose 1.6-1.8x. Here: a model sure of a machine 8x slower
    # (light steps, 1-3 decodes), then the bench's ramp up to 5 chats a
    # second on the synthetic machine, which every static setting serves
    # within its objectives. The tuner cut the budget or capped the batch
    # for 11 steps on each draw before the drift reset caught up; now the
    # cut and the cap wait for the last steps to run within 1.25x of the
    # model.
    for seed in range(4):
        work = bench_chat(seed, (0.5, 5.0), (32, 64))
        tuner, rng, slow = AutoTuner(CEILING), random.Random(seed), Device(speed=8.0)
        for _ in range(64):
            shape = StepShape(rng.randint(1, 3), rng.choice([0, 0, 0, 64, 128]), rng.randint(100, 600))
            tuner.observe(shape, slow.step_s(shape, rng))
        assert tuner.model.sure
        sim = Sim(CEILING, tuner, Device(), random.Random(seed))
        tuned = sim.run(fresh(work))
        static = Sim(CEILING, None, Device(), random.Random(seed)).run(fresh(work))
        assert goodput(static) == len(work) and goodput(tuned) == goodput(static), seed
        assert set(sim.trace) == {CEILING}, seed
        for stat in (lambda r: r.first - r.at, lambda r: (r.done_at - r.first) / (r.generated - 1)):
            assert median([stat(r) for r in tuned]) <= 1.1 * median([stat(r) for r in static]), seed


def test_the_model_is_trusted_while_its_last_steps_run_within_a_quarter_of_its_predictions() -> None:
    # Unchecked until 8 steps were predicted; trusted on the machine it
    # was fitted on; not once the machine runs twice as fast (before the
    # drift reset, which takes 12 steps).
    model = LatencyModel(64)
    rng, device = random.Random(4), Device()

    def shape() -> StepShape:
        return StepShape(rng.randint(1, 16), rng.choice([0, 128, 512]), rng.randint(100, 4000))

    for _ in range(16):
        s = shape()
        model.add(s, device.step_s(s, rng))
    model.fit()
    assert model.sure and model.recent_ratio is None and not model.trusted
    for _ in range(8):
        s = shape()
        model.add(s, device.step_s(s, rng))
    assert model.trusted and model.recent_ratio is not None and 0.8 < model.recent_ratio < 1.25
    fast = Device(speed=0.5)
    for _ in range(8):
        s = shape()
        model.add(s, fast.step_s(s, rng))
    assert model.resets == 0 and not model.trusted
    assert model.recent_ratio is not None and model.recent_ratio < 0.8


def test_trust_once_lost_returns_only_when_the_steps_run_close_to_the_model_again() -> None:
    # The quiet-machine bench of 2026-12-01's fourth session, with a fifth of
    # the CPU stolen by the host: the steps ran 0.73-0.79x the model's
    # predictions, either side of the 1.25x edge, and the tuner flipped
    # between capping the batch and the configured limits every second
    # (steady chat: 9 of 24 met where every static setting met 24). Trust
    # lost at the edge now comes back only within 1.15x.
    model = LatencyModel(64)
    rng = random.Random(7)

    def steps(speed: float, n: int = 8) -> None:
        d = Device(speed=speed)
        for _ in range(n):
            s = StepShape(rng.randint(1, 16), rng.choice([0, 128, 512]), rng.randint(100, 4000))
            model.add(s, d.step_s(s, rng))

    steps(1.0, 16)
    model.fit()
    steps(1.0)
    assert model.trusted
    steps(0.75)  # past the edge: trust lost
    assert not model.trusted and model.resets == 0
    steps(0.84)  # back inside 1.25x, not inside 1.15x: still not trusted
    assert model.recent_ratio is not None and 1 / 1.25 < model.recent_ratio < 1 / 1.15
    assert not model.trusted and model.resets == 0
    steps(0.95)
    assert model.trusted
    steps(0.84)  # trusted, it stays so within 1.25x
    assert model.trusted
