"""Rotary position embeddings (RoPE), with Llama 3 and linear scaling.

The frequencies follow transformers' formulas operation for operation, so
the cos/sin tables match its float32 values bit for bit.
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


class Rope:
    """cos/sin tables for every position below `max_len`, looked up once per
    step and applied in place to the query and key heads of every layer."""

    def __init__(self, config: ModelConfig, max_len: int, *, device: torch.device, dtype: torch.dtype):
        positions = torch.arange(max_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_frequencies(config)[None, :]
        self.cos = freqs.cos().to(device=device, dtype=dtype)
        self.sin = freqs.sin().to(device=device, dtype=dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each token, shaped [tokens, 1, head_dim / 2] to
        broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate `x` [tokens, heads, head_dim] in place (the "rotate half"
        convention of Llama checkpoints)."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        r1 = x1 * cos - x2 * sin
        x2.mul_(cos).addcmul_(x1, sin)
        x1.copy_(r1)
