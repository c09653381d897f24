"""Loading checkpoints: shards, and errors that name the file and tensor;
the built-in demo model and its cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drivers.model import demo
from drivers.model.dtypes import dtype_name, resolve_dtype
from drivers.model.errors import CheckpointError
from drivers.model.runner import ModelRunner
from ipc.errors import BadRequest
from ipc.protocol.driver import StepSeq
from ipc.protocol.sampling import SamplingParams
from tests.helpers.stacks import EXACT_DTYPE
from tests.helpers.model_fixtures import hf_logits, make_checkpoint, recording

GREEDY = SamplingParams(temperature=0.0)


def load(path: Path) -> ModelRunner:
    return ModelRunner.load(str(path), kv_cache_bytes=1 << 20, block_size=4, dtype=EXACT_DTYPE)


def prompt_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    rec = recording(runner)
    runner.execute([StepSeq(1, ids, 0, list(range(8)), params=GREEDY)])
    return rec.logits[0]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    make_checkpoint(tmp_path, "llama")
    return tmp_path


def rewrite(ckpt: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def test_sharded_checkpoint_with_index_loads_the_same_model(ckpt: Path, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    single = prompt_logits(load(ckpt), [3, 1, 4, 1, 5])
    tensors = load_file(str(ckpt / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    (ckpt / "model.safetensors").unlink()
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(ckpt / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.testing.assert_close(prompt_logits(load(ckpt), [3, 1, 4, 1, 5]), single, atol=0, rtol=0)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: missing"):
        load(ckpt)


def test_missing_config_names_the_file(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing") as err:
        load(ckpt)
    assert err.value.detail["file"] == str(ckpt / "config.json")


def test_missing_weights_file_is_named(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors file"):
        load(ckpt)


def test_missing_tokenizer_is_named(ckpt: Path) -> None:
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        load(ckpt)


def test_unsupported_architecture_is_named(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load(ckpt)


def test_missing_tensor_is_named(ckpt: Path) -> None:
    rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing") as err:
        load(ckpt)
    assert err.value.detail["tensor"] == "model.layers.1.mlp.up_proj.weight"


def test_wrong_shape_names_file_tensor_and_shapes(ckpt: Path) -> None:
    def shrink(t: dict) -> None:  # type: ignore[type-arg]
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    rewrite(ckpt, shrink)
    with pytest.raises(CheckpointError) as err:
        load(ckpt)
    msg = err.value.message
    assert "model.safetensors" in msg and "model.layers.0.self_attn.k_proj.weight" in msg
    assert "[16, 64]" in msg and "[32, 64]" in msg


def test_non_float_tensor_is_named(ckpt: Path) -> None:
    def to_int(t: dict) -> None:  # type: ignore[type-arg]
        t["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    rewrite(ckpt, to_int)
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has dtype torch\.int32"):
        load(ckpt)


def test_checkpoint_errors_are_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="no such model directory"):
        load(tmp_path / "nowhere")


def test_tied_checkpoint_without_lm_head_loads(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    rewrite(tmp_path, lambda t: t.pop("lm_head.weight", None))
    torch.testing.assert_close(prompt_logits(load(tmp_path), [9, 8, 7]),
                               hf_logits(model, [9, 8, 7])[-1], atol=1e-4, rtol=0)


def test_demo_is_generated_once_then_read_from_the_cache(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    first = ModelRunner.load("demo", kv_cache_bytes=8 << 20)
    where = tmp_path / "home" / "models" / "demo"
    assert first.info.path == str(where)
    assert {p.name for p in where.iterdir()} == {"config.json", "model.safetensors",
                                                 "llmos_tokenizer.json"}
    info = first.info
    assert (info.vocab_size, info.sampleable_vocab, info.max_model_len) == (32000, 258, 2048)
    # what `auto` picks here: bfloat16 on a CPU with AMX or AVX-512 BF16, else float32
    assert 55e6 < info.num_params < 57e6 and info.dtype == dtype_name(resolve_dtype("auto", torch.device("cpu")))
    assert info.num_blocks == (8 << 20) // info.block_nbytes

    def no_regeneration(*_: object) -> None:
        raise AssertionError("the demo weights were generated again")

    monkeypatch.setattr(demo, "demo_weights", no_regeneration)
    second = ModelRunner.load("demo", kv_cache_bytes=8 << 20)
    prompt = first.tokenizer.encode("Once upon a time")
    rec = recording(first)
    outs = []
    for runner in (first, second):
        table = list(range(4))
        res = runner.execute([StepSeq(1, prompt, 0, table, params=GREEDY)])[0]
        tokens = [res.token]
        for pos in range(len(prompt), len(prompt) + 12):
            res = runner.execute([StepSeq(1, [tokens[-1]], pos, table, params=GREEDY)])[0]
            tokens.append(res.token)
        outs.append(tokens)
    assert outs[0] == outs[1]
    assert len(set(outs[0])) > 6
    assert all(t is not None and t < 258 for t in outs[0])
    # Far from flat: a clear winner at each step.
    top2 = torch.stack(rec.logits)[:, :258].topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.1


def test_stale_demo_cache_is_rebuilt(tmp_path: Path) -> None:
    where = tmp_path / "models" / "demo"
    where.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "llmos_tokenizer.json"):
        (where / name).write_text("{}")          # an older (or broken) cache
    assert demo.ensure_demo(tmp_path) == where
    stored = json.loads((where / "config.json").read_text())
    assert stored["llmos_demo_version"] == demo.DEMO_VERSION
    assert (where / "model.safetensors").stat().st_size > 200e6
    assert not [p for p in where.parent.iterdir() if p.name != "demo"]   # no temp dirs left
