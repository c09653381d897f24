"""Load a local Hugging Face llama-family directory into `Weights`.

Reads config.json, the *.safetensors shards (through
model.safetensors.index.json when there is one) and the tokenizer. Every
failure names the file, and the tensor where one is at fault: a missing
file, an unsupported architecture, a missing tensor, a tensor of the wrong
shape or of a non-floating dtype.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from drivers.model.config import ModelConfig, load_config
from drivers.model.errors import CheckpointError
from drivers.model.llama import LayerWeights, Weights
from drivers.model.rope import interleave_heads
from text.tokenizer import Tokenizer, load_tokenizer

INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load_checkpoint(model_dir: str | Path, *, dtype: torch.dtype, device: torch.device,
                    ) -> tuple[ModelConfig, Weights, Tokenizer]:
    root = Path(model_dir)
    config = load_config(root)
    tokenizer = load_tokenizer(root, eos_token_ids=config.eos_token_ids,
                               bos_token_id=config.bos_token_id)
    with ExitStack() as stack:
        handles = {name: stack.enter_context(safe_open(str(path), framework="pt"))
                   for name, path in _shard_files(root).items()}
        reader = _Reader(root, handles, dtype, device)
        weights = _read_weights(config, reader)
    return config, weights, tokenizer


def _shard_files(root: Path) -> dict[str, Path]:
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r})",
                                  detail={"file": str(index)}) from None
        files = {n: root / n for n in names}
        for path in files.values():
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (listed in {INDEX_FILE})",
                                      detail={"file": str(path)})
    else:
        files = {p.name: p for p in sorted(root.glob("*.safetensors"))}
        if not files:
            raise CheckpointError(f"{root}: no *.safetensors file (model.safetensors expected)",
                                  detail={"file": str(root / "model.safetensors")})
    return files


class _Reader:
    """Finds each tensor in whichever shard holds it and checks it."""

    def __init__(self, root: Path, handles: dict[str, Any], dtype: torch.dtype,
                 device: torch.device):
        self.root, self.dtype, self.device = root, dtype, device
        self.where: dict[str, str] = {}
        self.handles = handles
        for file, handle in handles.items():
            for key in handle.keys():
                self.where.setdefault(key, file)

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        file = self.where.get(name)
        if file is None:
            shards = ", ".join(sorted(self.handles))
            raise CheckpointError(f"{self.root}: tensor {name} is missing (searched {shards})",
                                  detail={"file": str(self.root), "tensor": name})
        tensor = self.handles[file].get_tensor(name)
        where = self.root / file
        if tensor.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where}: tensor {name} has dtype {tensor.dtype}, expected a "
                                  f"floating type (float32, bfloat16 or float16)",
                                  detail={"file": str(where), "tensor": name})
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {list(tensor.shape)}, "
                                  f"expected {list(shape)} from config.json",
                                  detail={"file": str(where), "tensor": name})
        return tensor.to(device=self.device, dtype=self.dtype)


def _read_weights(c: ModelConfig, r: _Reader) -> Weights:
    hidden, inter, vocab, q, kv = (c.hidden_size, c.intermediate_size, c.vocab_size,
                                   c.q_size, c.kv_size)
    # Llama's attention_bias covers o_proj too; Qwen2 biases only q, k, v.
    o_bias = c.qkv_bias and c.architecture != "Qwen2ForCausalLM"
    layers = []
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        # q and k rows are reordered for the complex-multiply rotation (rope.py).
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
        qkv = torch.cat([interleave_heads(r.get(a + "q_proj.weight", (q, hidden)), heads).T,
                         interleave_heads(r.get(a + "k_proj.weight", (kv, hidden)), kv_heads).T,
                         r.get(a + "v_proj.weight", (kv, hidden)).T], dim=1).contiguous()
        qkv_bias = None
        if c.qkv_bias:
            qkv_bias = torch.cat([interleave_heads(r.get(a + "q_proj.bias", (q,)), heads),
                                  interleave_heads(r.get(a + "k_proj.bias", (kv,)), kv_heads),
                                  r.get(a + "v_proj.bias", (kv,))])
        gate_up = torch.cat([r.get(m + "gate_proj.weight", (inter, hidden)).T,
                             r.get(m + "up_proj.weight", (inter, hidden)).T], dim=1).contiguous()
        layers.append(LayerWeights(
            input_norm=r.get(p + "input_layernorm.weight", (hidden,)),
            qkv=qkv,
            qkv_bias=qkv_bias,
            o=r.get(a + "o_proj.weight", (hidden, q)).T.contiguous(),
            o_bias=r.get(a + "o_proj.bias", (hidden,)) if o_bias else None,
            post_norm=r.get(p + "post_attention_layernorm.weight", (hidden,)),
            gate_up=gate_up,
            gate_up_bias=torch.cat([r.get(m + "gate_proj.bias", (inter,)),
                                    r.get(m + "up_proj.bias", (inter,))]) if c.mlp_bias else None,
            down=r.get(m + "down_proj.weight", (hidden, inter)).T.contiguous(),
            down_bias=r.get(m + "down_proj.bias", (hidden,)) if c.mlp_bias else None,
        ))
    embed = r.get("model.embed_tokens.weight", (vocab, hidden))
    # Tied checkpoints may still carry a copy of lm_head; the embedding wins.
    head = embed if c.tie_word_embeddings else r.get("lm_head.weight", (vocab, hidden))
    return Weights(embed=embed, layers=layers, norm=r.get("model.norm.weight", (hidden,)),
                   lm_head=head.T.contiguous())
