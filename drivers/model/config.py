"""The shape of a llama-family model, read from a Hugging Face config.json.

Torch-free on purpose: the scheduler and gateway import this to learn a
model's context window and special tokens without paying for torch.

Supported architectures: LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM (Qwen2 has a bias on q, k and v; Llama may via
`attention_bias`). Sliding-window attention is not implemented: a window that
is null, switched off (`use_sliding_window: false`) or at least the context
length changes nothing; a smaller one caps `max_model_len` at the window, so
every answer stays exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import msgspec

from drivers.model.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DTYPES = ("float32", "bfloat16", "float16")


class RopeScaling(msgspec.Struct, frozen=True):
    """How rotary frequencies are stretched for long contexts.

    kind "llama3": Llama 3.1's frequency-dependent scaling; "linear":
    positions divided by `factor`.
    """

    kind: Literal["llama3", "linear"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class ModelConfig(msgspec.Struct, frozen=True):
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    sliding_window: int | None = None

    @property
    def max_model_len(self) -> int:
        """The longest sequence (prompt + generated) the model serves."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Translate a config.json dict; `source` names the file in errors."""
        return _from_hf(raw, source)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that `from_hf` (and transformers) read back."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.architecture],
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids),
            "torch_dtype": self.torch_dtype,
        }
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            out["rope_scaling"] = {
                "rope_type": rs.kind, "factor": rs.factor,
                "low_freq_factor": rs.low_freq_factor, "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
            }
        return out


_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2"}


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `model_dir/config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a model directory needs config.json)",
                              detail={"file": str(path)})
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc})", detail={"file": str(path)}) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object", detail={"file": str(path)})
    return ModelConfig.from_hf(raw, str(path))


def _from_hf(raw: dict[str, Any], source: str) -> ModelConfig:
    archs = raw.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: unsupported architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            detail={"file": source, "architecture": str(arch)})
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (only 'silu')",
                              detail={"file": source})

    def need_int(key: str) -> int:
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}",
                                  detail={"file": source, "field": key})
        return value

    hidden = need_int("hidden_size")
    heads = need_int("num_attention_heads")
    kv_heads = raw.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise CheckpointError(
            f"{source}: num_key_value_heads {kv_heads!r} must divide num_attention_heads {heads}",
            detail={"file": source, "field": "num_key_value_heads"})
    head_dim = raw.get("head_dim") or hidden // heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise CheckpointError(f"{source}: head_dim {head_dim!r} must be a positive even integer",
                              detail={"file": source, "field": "head_dim"})

    # transformers >= 5 writes rope_parameters; older files write rope_theta
    # and rope_scaling at the top level.
    rope = raw.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = _rope_scaling(raw.get("rope_scaling") or rope, source)

    qkv_bias = arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False))
    window = raw.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
        window = None
    max_pos = need_int("max_position_embeddings")
    if window is not None and (not isinstance(window, int) or window >= max_pos):
        window = None

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
    if dtype not in DTYPES:
        raise CheckpointError(f"{source}: torch_dtype {dtype!r} is not one of {', '.join(DTYPES)}",
                              detail={"file": source, "field": "torch_dtype"})
    try:
        return ModelConfig(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_hidden_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=need_int("vocab_size"),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            torch_dtype=dtype,
            sliding_window=window,
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: malformed field ({exc})", detail={"file": source}) from None


def _rope_scaling(spec: dict[str, Any], source: str) -> RopeScaling | None:
    kind = spec.get("rope_type") or spec.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise CheckpointError(
            f"{source}: rope scaling type {kind!r} is not supported (only llama3, linear)",
            detail={"file": source, "field": "rope_scaling"})
    factor = float(spec.get("factor", 1.0))
    if factor <= 0:
        raise CheckpointError(f"{source}: rope scaling factor must be > 0, got {factor}",
                              detail={"file": source, "field": "rope_scaling"})
    if kind == "linear":
        return RopeScaling("linear", factor)
    return RopeScaling(
        "llama3", factor,
        low_freq_factor=float(spec.get("low_freq_factor", 1.0)),
        high_freq_factor=float(spec.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(spec.get("original_max_position_embeddings", 8192)),
    )
