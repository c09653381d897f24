"""The llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) in plain torch.

One forward pass takes the flattened new tokens of every sequence in a step
(decodes and prefill chunks together, no padding between sequences): the
projections and the MLP see one [tokens, hidden] matrix, attention is paged
(attention.py). Weights are stored [in, out] so every projection is `x @ W`
(on CPU, MKL runs the small-batch decode shapes about twice as fast as with
the [out, in] layout of checkpoints), with q/k/v fused into one matrix and
gate/up into another. Activations live in a workspace that grows to the
largest step seen and is reused, so a step allocates no large temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drivers.model.attention import AttentionPlan, PagedAttention
from drivers.model.config import ModelConfig
from drivers.model.kv_cache import KVCache
from drivers.model.rope import Rope


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor         # [hidden]
    qkv: torch.Tensor                # [hidden, q + 2 kv]
    qkv_bias: torch.Tensor | None    # [q + 2 kv]
    o: torch.Tensor                  # [q, hidden]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor          # [hidden]
    gate_up: torch.Tensor            # [hidden, 2 intermediate]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor               # [intermediate, hidden]
    down_bias: torch.Tensor | None


@dataclass(slots=True)
class Weights:
    embed: torch.Tensor              # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor               # [hidden]
    lm_head: torch.Tensor            # [hidden, vocab]

    def num_params(self) -> int:
        tensors = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            tensors += [t for t in (layer.input_norm, layer.qkv, layer.qkv_bias, layer.o,
                                    layer.o_bias, layer.post_norm, layer.gate_up,
                                    layer.gate_up_bias, layer.down, layer.down_bias)
                        if t is not None]
        return sum(t.numel() for t in tensors)


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    """One step's flattened tokens, ready for the device."""

    tokens: torch.Tensor             # [n] token ids
    positions: torch.Tensor          # [n]
    kv_slots: tuple[torch.Tensor, torch.Tensor]   # KVCache.slots of the new tokens
    attention: AttentionPlan
    logit_rows: torch.Tensor         # [s] rows whose next-token logits are wanted


class _Workspace:
    """Activation buffers for up to `capacity` tokens, regrown (doubling)
    only when a step is larger than any before it."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        self.config, self.dtype, self.device = config, dtype, device
        self.capacity = 0

    def ensure(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        cap = max(tokens, 2 * self.capacity, 64)
        c = self.config

        def buf(cols: int) -> torch.Tensor:
            return torch.empty(cap, cols, dtype=self.dtype, device=self.device)

        self.x = buf(c.hidden_size)
        self.qkv = buf(c.q_size + 2 * c.kv_size)
        self.attn = buf(c.q_size)
        self.gate_up = buf(2 * c.intermediate_size)
        self.capacity = cap


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: Weights, cache: KVCache, *,
                 max_len: int, decode_kernel: str = "bag"):
        self.config = config
        self.weights = weights
        self.cache = cache
        dtype, device = weights.embed.dtype, weights.embed.device
        self.rope = Rope(config, max_len, device=device, dtype=dtype)
        self.attention = PagedAttention(cache, config.num_attention_heads, decode_kernel)  # type: ignore[arg-type]
        self._ws = _Workspace(config, dtype, device)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run every layer over the step's tokens, writing their keys and
        values into the cache; return float32 logits [len(logit_rows), vocab]."""
        c, w = self.config, self.weights
        n = batch.tokens.numel()
        self._ws.ensure(n)
        ws = self._ws
        x, qkv, attn, gate_up = ws.x[:n], ws.qkv[:n], ws.attn[:n], ws.gate_up[:n]
        q_size, kv_size, inter, eps = c.q_size, c.kv_size, c.intermediate_size, c.rms_norm_eps
        heads, kv_heads, dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        rotations = self.rope.tables(batch.positions)

        torch.index_select(w.embed, 0, batch.tokens, out=x)
        for i, layer in enumerate(w.layers):
            h = _rms_norm(x, layer.input_norm, eps)
            _linear(h, layer.qkv, layer.qkv_bias, out=qkv)
            # q and k are adjacent columns: rotate both heads at once.
            self.rope.apply_(qkv[:, :q_size + kv_size].view(n, heads + kv_heads, dim), rotations)
            k = qkv[:, q_size:q_size + kv_size].view(n, kv_heads, dim)
            v = qkv[:, q_size + kv_size:].view(n, kv_heads, dim)
            self.cache.write(i, batch.kv_slots, k, v)
            self.attention.forward(i, batch.attention, qkv[:, :q_size], attn)
            _linear_acc(x, attn, layer.o, layer.o_bias)

            h = _rms_norm(x, layer.post_norm, eps)
            _linear(h, layer.gate_up, layer.gate_up_bias, out=gate_up)
            gate, up = gate_up[:, :inter], gate_up[:, inter:]
            F.silu(gate, inplace=True)
            gate.mul_(up)
            _linear_acc(x, gate, layer.down, layer.down_bias)

        last = _rms_norm(x.index_select(0, batch.logit_rows), w.norm, eps)
        return (last @ w.lm_head).float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)       # one fused pass
    # Statistics in float32 whatever the model dtype, as transformers does.
    x32 = x.float()
    var = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(var + eps)).to(x.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
            out: torch.Tensor) -> None:
    if bias is None:
        torch.mm(x, weight, out=out)
    else:
        torch.addmm(bias, x, weight, out=out)


def _linear_acc(acc: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> None:
    """acc += x @ weight (+ bias): the residual add fused into the matmul."""
    acc.addmm_(x, weight)
    if bias is not None:
        acc.add_(bias)
