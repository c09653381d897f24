"""The child lists integration tests boot: a driver on a checkpoint, the
serving stack (memory, driver, scheduler), and that stack with security."""

from __future__ import annotations

from pathlib import Path

from common.config.driver import REPRODUCIBLE_DTYPE
from kernel.config import ChildSpec

# The dtype of every test that compares tokens across compute paths (a batch
# against each sequence alone, a recompute after a kill against the
# undisturbed run, llmos against the model run here): common/config/driver.py.
# Tests of bf16 itself ask for it by name.
EXACT_DTYPE = REPRODUCIBLE_DTYPE
DRIVER_DTYPE_ARGS = ["--dtype", EXACT_DTYPE]


def driver_spec(ckpt: Path) -> ChildSpec:
    # through the entry point, as a third-party driver would be started
    return ChildSpec("cpu", "drivers", service="driver",
                     args=["cpu", "--model", str(ckpt), "--kv-cache-mb", "2", "--threads", "1", *DRIVER_DTYPE_ARGS])


def children(ckpt: Path, *scheduler_args: str) -> list[ChildSpec]:
    """Memory server, a CPU driver on `ckpt` and the scheduler (with `scheduler_args`)."""
    return [ChildSpec("memory", "services.memory"), driver_spec(ckpt),
            ChildSpec("scheduler", "services.scheduler", args=list(scheduler_args))]


def secured_children(ckpt: Path) -> list[ChildSpec]:
    """A whole llmos on `ckpt` with the security server: what tests with auth on boot."""
    return [ChildSpec("security", "services.security"), ChildSpec("memory", "services.memory"),
            driver_spec(ckpt), ChildSpec("scheduler", "services.scheduler")]


def gateway_children(ckpt: Path, port: int) -> list[ChildSpec]:
    """`secured_children` and one gateway instance on 127.0.0.1:`port`."""
    return [*secured_children(ckpt), ChildSpec("gateway", "services.gateway", args=["--listen", f"127.0.0.1:{port}"])]


def null_children(*driver_args: str, scheduler_args: tuple[str, ...] = ()) -> list[ChildSpec]:
    """Memory server, the null driver (drivers/null.py, no model, with
    `driver_args` such as --step-ms) and the scheduler."""
    return [ChildSpec("memory", "services.memory"),
            ChildSpec("null", "drivers", service="driver", args=["null", *driver_args]),
            ChildSpec("scheduler", "services.scheduler", args=list(scheduler_args))]
