"""`DriverService`: the torch-free half of every driver, the Service a driver
registers as (``"driver"``), its flags over the `[driver]` table and its CPU
pinning. `drivers.base.Driver` adds a model runner (torch) on top;
`drivers.null.NullDriver` runs no model and stays torch-free, so the
registry, `python -m drivers` and the null driver never load torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, ClassVar, NoReturn

from common.config.driver import DriverConfig, load_driver_config
from ipc.errors import ConfigError
from sdk.service import Service


class _Flags(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # A bad flag is the same on every restart: ConfigError exits EX_CONFIG
        # with this line (sdk/service.py), and `llmos up` refuses it first.
        raise ConfigError(f"{self.prog}: {message}")


def driver_parser(prog: str = "driver") -> argparse.ArgumentParser:
    """Flags over the `[driver]` table (common/config/driver.py); not given: the table's."""
    ap = _Flags(prog=prog)
    ap.add_argument("--config", help="TOML file; its [driver] table is read (default: the kernel's)")
    ap.add_argument("--model", help="'demo' or a local Hugging Face directory")
    ap.add_argument("--kv-cache-mb", type=float, help="device memory for KV blocks")
    ap.add_argument("--block-size", type=int)
    ap.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (drivers/model/dtypes.py)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (CPU; default one per CPU of --cpus)")
    ap.add_argument("--cpus", type=cpu_list, help="pin to these CPUs, e.g. 0-7 or 0,2,4 (default: as started)")
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--host-slots", type=int, help="blocks in the host swap tier")
    ap.add_argument("--swap-mb", type=float, help="host swap tier size in MiB (instead of --host-slots)")
    ap.add_argument("--device-index", type=int, default=0)
    return ap


def driver_args(argv: list[str]) -> argparse.Namespace:
    return driver_parser().parse_args(argv)


def cpu_list(text: str) -> set[int]:
    """"0-3,8" -> {0, 1, 2, 3, 8}."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list like 0-7 or 0,2,4: {text!r}") from None
    if not cpus:
        raise argparse.ArgumentTypeError(f"no CPUs in {text!r}")
    return cpus


def pin(cpus: set[int]) -> None:
    """Run every thread of this process, and any it starts later, on `cpus`."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass            # a thread that has just ended


def driver_config(args: argparse.Namespace) -> DriverConfig:
    return load_driver_config(args.config, model=args.model, kv_cache_mb=args.kv_cache_mb,
                              block_size=args.block_size, dtype=args.dtype, threads=args.threads,
                              max_model_len=args.max_model_len, host_slots=args.host_slots, swap_mb=args.swap_mb)


class DriverService(Service):
    """What every driver is to the rest of llmos: service ``"driver"``, its
    flags parsed (`parser` adds a driver's own), the `[driver]` table read,
    pinned to --cpus before anything starts threads. A subclass serves
    Execute, SwapBlocksOut/In, DescribeModel and DriverHealth."""

    name = "driver"
    device: ClassVar[str] = "cpu"

    def __init__(self, argv: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.args = self.parser().parse_args(sys.argv[1:] if argv is None else argv)
        self.config = driver_config(self.args)
        if self.args.cpus is not None:
            # Before torch (or anything else) starts a thread pool sized from the affinity.
            try:
                pin(self.args.cpus)
            except OSError as exc:
                raise ConfigError(f"--cpus {sorted(self.args.cpus)}: {exc.strerror}") from None

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        return driver_parser(f"driver {cls.device}")
