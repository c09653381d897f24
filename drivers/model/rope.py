"""Rotary position embeddings (RoPE), with Llama 3 and linear scaling.

Checkpoints rotate dimension i of a head together with i + head_dim/2 (the
"rotate half" convention). The loader reorders the q and k projections so
those partners sit next to each other (`interleave_heads`); a head is then
head_dim/2 complex numbers and the rotation is one in-place complex
multiply per step instead of six elementwise passes. Attention only ever
takes dot products of queries with keys, which a shared reordering of their
dimensions leaves unchanged.

The frequencies follow transformers' formulas operation for operation, so
the tables match its float32 values.
"""

from __future__ import annotations

import math

import torch

from drivers.model.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    factor = scaling.factor
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, and the
    # band between them interpolated smoothly.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def interleave_heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows (or bias entries) of a q/k projection so each
    head's dimension i and i + head_dim/2 become neighbours 2i and 2i + 1."""
    rest = weight.shape[1:]
    dim = weight.shape[0] // heads
    return weight.reshape(heads, 2, dim // 2, *rest).transpose(1, 2).reshape(heads * dim, *rest)


class Rope:
    """Rotation tables for every position below `max_len`, looked up once per
    step and applied in place to the (interleaved) query and key heads of
    every layer."""

    def __init__(self, config: ModelConfig, max_len: int, *, device: torch.device, dtype: torch.dtype):
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_frequencies(config)[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        # Complex multiply for float32; half-precision types have no complex
        # counterpart here, so they rotate with real arithmetic.
        self.complex = dtype == torch.float32
        if self.complex:
            self.cis = torch.complex(cos, sin).to(device)
        else:
            self.cos = cos.to(device=device, dtype=dtype)
            self.sin = sin.to(device=device, dtype=dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This step's rotations, shaped [tokens, 1, head_dim / 2] to
        broadcast over heads."""
        if self.complex:
            return (self.cis[positions].unsqueeze(1),)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply_(self, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> None:
        """Rotate `x` [tokens, heads, head_dim] (interleaved) in place."""
        pairs = x.unflatten(-1, (-1, 2))
        if self.complex:
            torch.view_as_complex(pairs).mul_(tables[0])
            return
        cos, sin = tables
        x1, x2 = pairs[..., 0], pairs[..., 1]
        r1 = x1 * cos - x2 * sin
        x2.mul_(cos).addcmul_(x1, sin)
        x1.copy_(r1)
