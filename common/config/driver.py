"""Every driver's settings, as data: the `[driver]` table of the llmos TOML
config (the same for each driver instance; `python -m drivers NAME` flags
override it). Torch-free: the kernel decodes it before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from common.configfile import load_table
from ipc.errors import BadRequest

# "auto" and drivers/model/dtypes.py TORCH_DTYPES (kept in step by tests/unit/test_config.py)
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The dtype of a run that holds greedy output to another run token for token
# although the two batch the requests differently or recompute them after a
# fault (`llmos demo`, `llmos chaos`, the tests): float32's rounding stays far
# below a model's margins; bfloat16 (`auto` on AMX or AVX-512 BF16) rounds
# per matmul shape, so the same request batched with other neighbours may
# take the other side of a near-tie.
REPRODUCIBLE_DTYPE = "float32"


class DriverConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # "demo" (a small model with random weights: its text is noise) or a
    # local Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    model: str = "demo"
    # Device memory for KV blocks, in MiB (the block pool's size).
    kv_cache_mb: float = 256.0
    # Tokens per KV block.
    block_size: int = 16
    # Weights and KV cache: "auto" = bfloat16 where the device multiplies it
    # natively (AMX / AVX-512 BF16 CPUs, CUDA 8.0+), else float32 on a CPU and
    # float16 on CUDA; or float32, bfloat16, float16 (docs/drivers.md).
    dtype: str = "auto"
    # torch intra-op threads (CPU); 0 = one per CPU the driver may run on.
    threads: int = 0
    # A cap below the model's context window; 0 = the model's.
    max_model_len: int = 0
    # The host swap tier (preempted sequences' KV): its size in MiB, or in blocks.
    swap_mb: float = 0.0
    host_slots: int = 0

    def validate(self) -> "DriverConfig":
        checks = [
            (bool(self.model), "model must not be empty ('demo' or a directory)"),
            (self.kv_cache_mb > 0, "kv_cache_mb must be > 0"),
            (self.block_size >= 1, "block_size must be >= 1"),
            # "": what config files written before "auto" existed hold.
            (self.dtype in ("", *DTYPES), f"dtype must be one of {', '.join(DTYPES)}"),
            (self.threads >= 0, "threads must be >= 0 (0: one per CPU the driver may run on)"),
            (self.max_model_len >= 0, "max_model_len must be >= 0 (0: the model's)"),
            (self.swap_mb >= 0, "swap_mb must be >= 0"),
            (self.host_slots >= 0, "host_slots must be >= 0"),
        ]
        for ok, why in checks:
            if not ok:
                raise BadRequest(why)
        return self


def load_driver_config(path: str | Path | None = None, **overrides: Any) -> DriverConfig:
    """The `[driver]` table (ipc/configfile.py `load_table`), with the flags
    that were given (not None) applied."""
    return load_table(path, "driver", DriverConfig, overrides)
