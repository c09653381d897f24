"""`Driver`: the Service contract every device driver implements.

A driver loads a model (`on_start`), reports its KV capacity in READY (the
memory server builds a block pool from it), and serves `Execute` steps. Torch
work runs in a worker thread so heartbeats keep flowing during a long step;
steps run one at a time, in arrival order.

A new device is one subclass that says how to load (`device`, `default_dtype`)
and registers under the ``llmos.drivers`` entry-point group (docs/drivers.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, ClassVar

import anyio

from common.config.driver import DriverConfig, load_driver_config
from drivers.model.runner import ModelRunner
from ipc.errors import BadRequest, ConfigError
from ipc.protocol import driver as dp
from sdk.service import Context, Service, handler


def driver_args(argv: list[str]) -> argparse.Namespace:
    """Flags over the `[driver]` table (drivers/config.py); not given: the table's."""
    ap = argparse.ArgumentParser(prog="driver")
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
    return ap.parse_args(argv)


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


class Driver(Service):
    name = "driver"
    device: ClassVar[str] = "cpu"

    def __init__(self, argv: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.args = driver_args(sys.argv[1:] if argv is None else argv)
        self.config = driver_config(self.args)
        if self.args.cpus is not None:
            # Before torch starts its thread pool (sized from the affinity).
            try:
                pin(self.args.cpus)
            except OSError as exc:
                raise ConfigError(f"--cpus {sorted(self.args.cpus)}: {exc.strerror}") from None
        self.runner: ModelRunner | None = None
        self._step_lock = anyio.Lock()
        self._busy = False

    def device_name(self) -> str:
        return self.device

    def load_runner(self) -> ModelRunner:
        """Runs in a worker thread. Subclasses adjust dtype, threads, device."""
        a = self.config
        host_path = None
        if a.host_slots or a.swap_mb:
            host_path = self.home / "swap" / f"{self.instance}.swap" if self.device == "cpu" else None
            if host_path is not None:
                host_path.parent.mkdir(parents=True, exist_ok=True)
        return ModelRunner.load(
            a.model, kv_cache_bytes=int(a.kv_cache_mb * 2**20), device=self.device_name(), dtype=a.dtype,
            block_size=a.block_size, num_threads=a.threads or None, home=self.home,
            max_model_len=a.max_model_len or None,
            host_tier_slots=a.host_slots, host_tier_path=host_path, host_tier_bytes=int(a.swap_mb * 2**20))

    async def on_start(self) -> None:
        try:
            self.runner = await anyio.to_thread.run_sync(self.load_runner)
        except BadRequest as exc:
            # No such device, a dtype the device cannot run, a checkpoint that
            # does not load, a pool smaller than one block: the same again on
            # every restart.
            raise ConfigError(f"{self.device_name()} driver: model {self.config.model!r} does not load: "
                              f"{exc.message}") from None

    async def on_stop(self) -> None:
        if self.runner is not None:
            self.runner.close()

    def ready_meta(self) -> dict[str, str | int | float | bool]:
        info = self._runner().info
        return {"model": info.name, "device": info.device, "dtype": info.dtype,
                "threads": info.threads, "num_blocks": info.num_blocks,
                "block_size": info.block_size, "host_slots": info.host_slots,
                "max_model_len": info.max_model_len, "vocab_size": info.vocab_size}

    def _runner(self) -> ModelRunner:
        assert self.runner is not None, "on_start loads the runner before READY"
        return self.runner

    @handler
    async def execute(self, msg: dp.Execute, ctx: Context) -> dp.Executed:
        runner = self._runner()
        n = runner.info.num_blocks
        for src, dst in msg.copies:
            if not (0 <= src < n and 0 <= dst < n):
                raise BadRequest(f"copy ({src}, {dst}) names a block this driver does not own (it has {n})")
        # The runner checks each step and fails a bad one alone (bad tokens,
        # blocks or sampling parameters); the others still run.
        async with self._step_lock:
            self._busy = True
            began = time.perf_counter()
            try:
                if msg.copies:
                    await anyio.to_thread.run_sync(runner.copy_blocks, msg.copies)
                results = await anyio.to_thread.run_sync(runner.execute, msg.steps)
            finally:
                self._busy = False
        outputs = [dp.SeqOutput(r.seq_id, -1 if r.token is None else r.token, r.logprob or 0.0,
                                list(r.top_logprobs), r.error or "") for r in results]
        return dp.Executed(outputs, time.perf_counter() - began)

    @handler
    async def swap_out(self, msg: dp.SwapBlocksOut, ctx: Context) -> dp.Swapped:
        async with self._step_lock:
            await anyio.to_thread.run_sync(self._runner().swap_out_to_host, msg.block_ids, msg.slots)
        return dp.Swapped(len(msg.block_ids))

    @handler
    async def swap_in(self, msg: dp.SwapBlocksIn, ctx: Context) -> dp.Swapped:
        async with self._step_lock:
            await anyio.to_thread.run_sync(self._runner().swap_in_from_host, msg.slots, msg.block_ids)
        return dp.Swapped(len(msg.block_ids))

    @handler(idempotent=True)
    async def describe(self, msg: dp.DescribeModel, ctx: Context) -> dp.ModelDescription:
        i = self._runner().info
        return dp.ModelDescription(i.name, i.architecture, i.path, i.vocab_size, i.sampleable_vocab,
                                   i.max_model_len, i.num_blocks, i.block_size, list(i.eos_token_ids),
                                   i.bos_token_id, i.dtype, i.device, i.num_params, i.host_slots)

    @handler(idempotent=True)
    async def health(self, msg: dp.DriverHealth, ctx: Context) -> dp.DriverHealthReply:
        # The runner never waits for a running step: this answers during one.
        h = self._runner().health()
        return dp.DriverHealthReply(h.ok, self._busy, h.steps, h.tokens, h.last_step_s, h.detail)
