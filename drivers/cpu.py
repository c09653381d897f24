"""`python -m drivers.cpu`: the CPU driver (dtype auto: bf16 on AMX / AVX-512 BF16, else fp32;
one torch thread per CPU it may run on, or --threads; --cpus pins it)."""

from __future__ import annotations

from drivers.base import Driver


class CpuDriver(Driver):
    device = "cpu"


if __name__ == "__main__":
    CpuDriver.main()
