"""The built-in `demo` model: `catalog.DEMO_CONFIG` with seeded random
weights and the byte tokenizer, written once as an ordinary Hugging Face
directory under `$LLMOS_HOME/models/demo/` and from then on loaded through
the same loader as any checkpoint.

The weights are scaled so the logits are far from flat: greedy decoding is
deterministic (clear margins between the top tokens) and does not collapse
onto one token.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from drivers.model.catalog import DEMO_CONFIG, demo_dir
from drivers.model.config import ModelConfig
from text.tokenizer import BYTE_TOKENIZER_FILE

DEMO_SEED = 20240611
# Bumped whenever the generated weights change, so stale caches are rebuilt.
DEMO_VERSION = 2
_FILES = ("config.json", "model.safetensors", BYTE_TOKENIZER_FILE)


def ensure_demo(home: str | Path | None = None) -> Path:
    """The demo model's directory, generating it on first use. Safe against
    concurrent first uses: the directory appears complete or not at all."""
    target = demo_dir(home)
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_checkpoint(tmp, DEMO_CONFIG, demo_weights(DEMO_CONFIG),
                         extra={"llmos_demo_version": DEMO_VERSION})
        (tmp / BYTE_TOKENIZER_FILE).write_text(json.dumps(
            {"type": "byte", "bos_token_id": DEMO_CONFIG.bos_token_id,
             "eos_token_id": DEMO_CONFIG.eos_token_ids[0]}))
        if target.exists():
            if _complete(target):       # another process just finished it
                return target
            shutil.rmtree(target)       # an older version
        try:
            os.rename(tmp, target)
        except OSError:
            if not _complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_weights(config: ModelConfig, seed: int = DEMO_SEED) -> dict[str, torch.Tensor]:
    """Hugging Face-named float32 tensors ([out, in] layout), deterministic in
    `seed`.

    Projections are variance preserving (std 1/sqrt(fan_in)), with q and k
    doubled so attention is sharp and the next token depends on context, not
    only on the current token (with plain init a random model soon maps each
    token to a fixed successor and loops). Small embeddings (std 0.3) keep the
    current token from dominating the residual stream; the output head (std
    6/sqrt(hidden)) gives logits of std about 6 after the final norm, so the
    top choices are well apart."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * std

    out = {"model.embed_tokens.weight": normal(config.vocab_size, hidden, 0.3)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = torch.ones(hidden)
        out[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        out[p + "self_attn.q_proj.weight"] = normal(config.q_size, hidden, 2 * hidden ** -0.5)
        out[p + "self_attn.k_proj.weight"] = normal(config.kv_size, hidden, 2 * hidden ** -0.5)
        out[p + "self_attn.v_proj.weight"] = normal(config.kv_size, hidden, hidden ** -0.5)
        out[p + "self_attn.o_proj.weight"] = normal(hidden, config.q_size, config.q_size ** -0.5)
        out[p + "mlp.gate_proj.weight"] = normal(inter, hidden, hidden ** -0.5)
        out[p + "mlp.up_proj.weight"] = normal(inter, hidden, hidden ** -0.5)
        out[p + "mlp.down_proj.weight"] = normal(hidden, inter, inter ** -0.5)
    out["model.norm.weight"] = torch.ones(hidden)
    out["lm_head.weight"] = normal(config.vocab_size, hidden, 6.0 * hidden ** -0.5)
    return out


def _complete(directory: Path) -> bool:
    if not all((directory / f).is_file() for f in _FILES):
        return False
    try:
        stored = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and stored.get("llmos_demo_version") == DEMO_VERSION


def write_checkpoint(directory: Path, config: ModelConfig, tensors: dict[str, torch.Tensor],
                     extra: dict[str, object] | None = None) -> None:
    """config.json (plus `extra` keys) + model.safetensors, as
    `save_pretrained` would write them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**config.to_hf(), **(extra or {})}, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
