"""`python -m drivers.cuda`: the CUDA driver (dtype auto: bf16 from compute capability 8.0,
else fp16; bf16 asked for on an older device is refused at start-up; same model code)."""

from __future__ import annotations

from drivers.base import Driver


class CudaDriver(Driver):
    device = "cuda"

    def device_name(self) -> str:
        return f"cuda:{self.args.device_index}"


if __name__ == "__main__":
    CudaDriver.main()
