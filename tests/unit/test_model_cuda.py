"""The runner on CUDA (skipped without a CUDA device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drivers.model.runner import ModelRunner
from ipc.protocol.driver import StepSeq
from ipc.protocol.sampling import SamplingParams
from tests.helpers.model_fixtures import (
    TOKENIZER_VOCAB, hf_logits, make_checkpoint, prefill_then_decode, recording)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(temperature=0.0, logprobs=3)


def load(path: Path, **kw: object) -> ModelRunner:
    return ModelRunner.load(str(path), device="cuda", kv_cache_bytes=1 << 20, block_size=4,
                            **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("kernel", ["gather", "bag"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_logits_match_transformers(tmp_path: Path, arch: str, kernel: str) -> None:
    model = make_checkpoint(tmp_path, arch)
    runner = load(tmp_path, dtype="float32", decode_kernel=kernel)
    assert runner.info.device.startswith("cuda")
    rec = recording(runner)
    ids = list(range(5, 35))
    prefill_then_decode(runner, 1, ids, 17, list(range(10)), chunk=6, params=GREEDY)
    got = torch.stack(rec.logits).cpu()
    torch.testing.assert_close(got, hf_logits(model, ids)[16:], atol=2e-4, rtol=0)


def test_cuda_mixed_batch_sampling_and_swap(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, "llama", sharp=True)
    runner = load(tmp_path, dtype="bfloat16", host_tier_slots=4)
    seeded = SamplingParams(temperature=0.8, seed=5)
    steps = [StepSeq(1, [1, 2, 3, 4, 5], 0, [0, 1], params=GREEDY),
             StepSeq(2, [9], 0, [2], params=seeded),
             StepSeq(3, [], 0, [3])]
    out = runner.execute(steps)
    assert out[0].token is not None and out[1].token is not None
    assert out[2].error is not None and "empty" in out[2].error
    assert out[0].token < runner.info.sampleable_vocab
    runner.swap_out_to_host([0, 1], [2, 3])
    runner.swap_in_from_host([2, 3], [4, 5])
    a = runner.execute([StepSeq(1, [out[0].token], 5, [0, 1], params=GREEDY)])[0]
    b = runner.execute([StepSeq(4, [out[0].token], 5, [4, 5], params=GREEDY)])[0]
    assert (a.token, a.logprob) == (b.token, b.logprob)
    assert runner.health().ok


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_tracks_float32(tmp_path: Path, dtype: str) -> None:
    """16-bit weights and KV on the device: logits within 1.5x of what
    transformers' own 16-bit run differs from its float32 (as on the CPU,
    tests/unit/test_model_bf16.py), greedy tokens equal on a peaked model."""
    if dtype == "bfloat16" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs compute capability 8.0")
    model = make_checkpoint(tmp_path, "llama", sharp=True)
    ids = list(range(5, 35))
    logits = {}
    for name in ("float32", dtype):
        runner = load(tmp_path, dtype=name)
        assert runner.info.dtype == name and runner.cache.k.dtype == getattr(torch, name)
        rec = recording(runner)
        prefill_then_decode(runner, 1, ids, 17, list(range(10)), chunk=6, params=GREEDY)
        logits[name] = torch.stack(rec.logits).cpu()[:, :TOKENIZER_VOCAB]
    # transformers' reference on the CPU (hf_logits feeds CPU tensors).
    ref32 = hf_logits(model, ids)[16:, :TOKENIZER_VOCAB]
    ref16 = hf_logits(model.to(getattr(torch, dtype)), ids)[16:, :TOKENIZER_VOCAB]
    ours = float((logits[dtype] - logits["float32"]).abs().max())
    theirs = float((ref16 - ref32).abs().max())
    assert ours <= 1.5 * theirs + 1e-3, (ours, theirs)


def test_cuda_auto_picks_a_16_bit_dtype(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, "llama")
    runner = load(tmp_path)
    native_bf16 = torch.cuda.get_device_capability()[0] >= 8
    assert runner.info.dtype == ("bfloat16" if native_bf16 else "float16")
    if not native_bf16:
        from ipc.errors import BadRequest

        with pytest.raises(BadRequest, match="bfloat16 is not supported"):
            load(tmp_path, dtype="bfloat16")
