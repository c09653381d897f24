"""`python -m drivers.cpu`: the CPU driver (fp32; torch threads from --threads)."""

from __future__ import annotations

from drivers.base import Driver


class CpuDriver(Driver):
    device = "cpu"


if __name__ == "__main__":
    CpuDriver.main()
