"""The driver's health check reports the model runner's real state: a step
whose forward pass failed, logits non-finite for every sequence, a device
that no longer computes; and it recovers with the next good step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from drivers.cpu import CpuDriver
from drivers.model.runner import ModelRunner
from ipc.errors import Internal
from ipc.protocol import driver as dp
from ipc.protocol.sampling import SamplingParams
from tests.helpers.stacks import EXACT_DTYPE

GREEDY = SamplingParams(temperature=0.0)


def load(path: Path) -> ModelRunner:
    return ModelRunner.load(str(path), kv_cache_bytes=1 << 20, block_size=4, dtype=EXACT_DTYPE)


def step(runner: ModelRunner, seq_id: int = 1) -> list[Any]:
    return runner.execute([dp.StepSeq(seq_id, [1, 2, 3], 0, [seq_id], params=GREEDY)])


def test_a_failed_forward_pass_is_unhealthy_until_a_step_succeeds(checkpoint: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    runner = load(checkpoint)
    assert runner.health().ok and runner.health().detail == "ok"
    forward = runner.model.forward

    def broken(batch: Any) -> torch.Tensor:
        raise RuntimeError("device-side assert triggered")

    monkeypatch.setattr(runner.model, "forward", broken)
    with pytest.raises(Internal):
        step(runner)
    h = runner.health()
    assert not h.ok and "forward pass failed: device-side assert triggered" in h.detail
    monkeypatch.setattr(runner.model, "forward", forward)
    assert step(runner)[0].token is not None
    assert runner.health().ok


def test_non_finite_logits_for_every_sequence_are_unhealthy(checkpoint: Path) -> None:
    runner = load(checkpoint)
    lm_head = runner.model.weights.lm_head.clone()
    runner.model.weights.lm_head.fill_(float("nan"))
    out = runner.execute([dp.StepSeq(1, [1, 2], 0, [1], params=GREEDY),
                          dp.StepSeq(2, [3, 4], 0, [2], params=GREEDY)])
    assert all(r.error and "non-finite" in r.error for r in out)
    h = runner.health()
    assert not h.ok and "non-finite for all 2 sequences" in h.detail
    runner.model.weights.lm_head.copy_(lm_head)
    assert step(runner, 3)[0].token is not None and runner.health().ok


def test_a_device_that_stops_computing_is_unhealthy(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = load(checkpoint)

    def lost(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("CUDA error: device not ready")

    monkeypatch.setattr(torch, "ones", lost)
    h = runner.health()
    assert not h.ok and "device error: CUDA error" in h.detail


async def test_driver_health_answers_with_the_runner_state(checkpoint: Path, tmp_path: Path) -> None:
    driver = CpuDriver(["--model", str(checkpoint), "--kv-cache-mb", "1"], home=str(tmp_path))
    await driver.on_start()
    ctx: Any = None
    ok = await driver.health(dp.DriverHealth(), ctx)
    assert ok.ok and not ok.busy and ok.detail == "ok"
    executed = await driver.execute(dp.Execute([dp.StepSeq(1, [1, 2, 3], 0, [0], params=GREEDY)]), ctx)
    assert executed.outputs[0].token >= 0
    runner = driver._runner()
    runner.model.weights.lm_head.fill_(float("nan"))
    await driver.execute(dp.Execute([dp.StepSeq(2, [1, 2, 3], 0, [1], params=GREEDY)]), ctx)
    bad = await driver.health(dp.DriverHealth(), ctx)
    assert not bad.ok and "non-finite" in bad.detail
    assert (bad.steps, bad.tokens) == (2, 6)
    await driver.on_stop()
