"""ModelConfig from Hugging Face config.json files, old and new formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from drivers.model.catalog import DEMO_CONFIG, open_config, open_tokenizer
from drivers.model.config import ModelConfig, RopeScaling, load_config
from drivers.model.errors import CheckpointError
from text.tokenizer import ByteTokenizer

LLAMA3_8B = {   # as shipped (transformers 4.x format)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
}


def test_llama3_legacy_format() -> None:
    c = ModelConfig.from_hf(LLAMA3_8B)
    assert (c.head_dim, c.q_size, c.kv_size) == (128, 4096, 1024)
    assert c.rope_theta == 500000.0 and c.eos_token_ids == (128001, 128008, 128009)
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert c.torch_dtype == "bfloat16" and c.max_model_len == 131072 and not c.qkv_bias


def test_transformers_5_rope_parameters_format() -> None:
    raw = {k: v for k, v in LLAMA3_8B.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    raw["rope_parameters"] = {**LLAMA3_8B["rope_scaling"], "rope_theta": 500000.0}  # type: ignore[dict-item]
    raw["dtype"] = "bfloat16"
    assert ModelConfig.from_hf(raw) == ModelConfig.from_hf(LLAMA3_8B)


@pytest.mark.parametrize("arch,extra,bias,window", [
    ("Qwen2ForCausalLM", {"sliding_window": 4096, "use_sliding_window": False}, True, None),
    ("Qwen2ForCausalLM", {"sliding_window": 1024, "use_sliding_window": True}, True, 1024),
    ("MistralForCausalLM", {"sliding_window": None}, False, None),
    ("MistralForCausalLM", {"sliding_window": 4096}, False, 4096),
    ("MistralForCausalLM", {"sliding_window": 1 << 20}, False, None),
    ("LlamaForCausalLM", {"attention_bias": True}, True, None),
])
def test_bias_and_sliding_window(arch: str, extra: dict[str, Any], bias: bool,
                                 window: int | None) -> None:
    raw = {**LLAMA3_8B, "architectures": [arch], "max_position_embeddings": 32768, **extra}
    c = ModelConfig.from_hf(raw)
    assert c.qkv_bias is bias and c.sliding_window == window
    # A window narrower than the context caps it, so answers stay exact.
    assert c.max_model_len == (window or 32768)


def test_head_dim_defaults_and_kv_heads_default_to_heads() -> None:
    raw = {k: v for k, v in LLAMA3_8B.items() if k != "num_key_value_heads"}
    c = ModelConfig.from_hf(raw)
    assert c.num_key_value_heads == 32 and c.head_dim == 128
    assert ModelConfig.from_hf({**LLAMA3_8B, "head_dim": 64}).head_dim == 64


@pytest.mark.parametrize("edit,match", [
    ({"architectures": ["FalconForCausalLM"]}, "unsupported architecture 'FalconForCausalLM'"),
    ({"architectures": []}, "unsupported architecture None"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 5}, "must divide num_attention_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"torch_dtype": "int8"}, "torch_dtype 'int8'"),
])
def test_bad_configs_are_refused_naming_the_problem(edit: dict[str, Any], match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as err:
        ModelConfig.from_hf({**LLAMA3_8B, **edit}, "/m/config.json")
    assert err.value.message.startswith("/m/config.json: ")


def test_unreadable_config_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_config(tmp_path)


def test_to_hf_round_trips() -> None:
    c = ModelConfig.from_hf(LLAMA3_8B)
    assert ModelConfig.from_hf(c.to_hf()) == c
    assert ModelConfig.from_hf(DEMO_CONFIG.to_hf()) == DEMO_CONFIG


def test_catalog_serves_the_demo_without_files(tmp_path: Path) -> None:
    assert open_config("demo", tmp_path) == DEMO_CONFIG
    assert isinstance(open_tokenizer("demo", tmp_path), ByteTokenizer)
    assert not (tmp_path / "models").exists()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert open_config(str(tmp_path / "m")).vocab_size == 128256


def test_config_tokenizer_and_catalog_do_not_import_torch() -> None:
    """The scheduler and gateway import these and must start fast."""
    code = ("import sys, drivers.model.config, text.tokenizer, drivers.model.catalog, "
            "ipc.protocol.sampling; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
