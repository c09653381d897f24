"""`python -m drivers.cuda`: the CUDA driver (bf16/fp16 by the checkpoint; same model code)."""

from __future__ import annotations

from drivers.base import Driver


class CudaDriver(Driver):
    device = "cuda"

    def device_name(self) -> str:
        return f"cuda:{self.args.device_index}"


if __name__ == "__main__":
    CudaDriver.main()
