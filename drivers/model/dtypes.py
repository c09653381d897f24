"""Which dtype a runner computes in, chosen from what the hardware does fast.

`auto` (the default) is bfloat16 where the device multiplies it natively —
a CPU with AMX or AVX-512 BF16, a CUDA device of compute capability 8.0 or
later — and otherwise float32 on a CPU (elsewhere bf16 runs through
reference kernels, 10–20× slower than float32) or float16 on a CUDA device.
Weights and the KV cache use the chosen dtype; norms, softmax and sampling
compute in float32 whatever it is (llama.py, attention.py, sampling.py).

A dtype the device cannot run usefully is refused (`BadRequest`) rather
than loaded: float16 on a CPU without native fp16 arithmetic (AVX-512 FP16
or AMX-FP16; there it is slower than float32 and its 65,504 range
overflows in some checkpoints' activations), bfloat16 on a CUDA device
without it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ipc.errors import BadRequest

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"

# /proc/cpuinfo flags that mean native 16-bit matrix arithmetic.
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
FP16_FLAGS = frozenset({"amx_fp16", "avx512_fp16"})
# The flags the driver bench records beside its figures.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_bf16", "amx_fp16", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo has none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool((cpu_flags() if flags is None else flags) & BF16_FLAGS)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in TORCH_DTYPES.items() if v == dtype)


def resolve_dtype(name: str, device: torch.device, *, flags: frozenset[str] | None = None) -> torch.dtype:
    """The torch dtype for `name` ("auto", "" meaning auto, or a dtype name)
    on `device`; `BadRequest` for a name the device cannot run."""
    flags = cpu_flags() if flags is None else flags
    if name in ("", AUTO):
        if device.type == "cuda":
            return torch.bfloat16 if _cuda_bf16(device) else torch.float16
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_fast_bf16(flags) else torch.float32
        return torch.float32
    if name not in TORCH_DTYPES:
        raise BadRequest(f"dtype must be one of {AUTO}, {', '.join(TORCH_DTYPES)}; got {name!r}")
    dtype = TORCH_DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16 and not flags & FP16_FLAGS:
        raise BadRequest("dtype float16 is not supported on this CPU (no AVX-512 FP16 or AMX-FP16: "
                         "it would run slower than float32); use auto, float32 or bfloat16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not _cuda_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise BadRequest(f"dtype bfloat16 is not supported on {torch.cuda.get_device_name(device)} "
                         f"(compute capability {major}.{minor}; bf16 needs 8.0); use auto or float16")
    return dtype


def _cuda_bf16(device: torch.device) -> bool:
    # is_bf16_supported() also says yes to emulated bf16 on older devices;
    # native bf16 matmul starts with Ampere (8.0).
    return torch.cuda.get_device_capability(device)[0] >= 8
