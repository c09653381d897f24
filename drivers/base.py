"""`Driver`: a driver that runs a model (drivers/model) on a torch device
(drivers/service.py `DriverService` is the torch-free part every driver shares).

A driver loads a model (`on_start`), reports its KV capacity in READY (the
memory server builds a block pool from it), and serves `Execute` steps. Torch
work runs in a worker thread so heartbeats keep flowing during a long step;
steps run one at a time, in arrival order.

A new device is one subclass that says how to load (`device`, `default_dtype`)
and registers under the ``llmos.drivers`` entry-point group (docs/drivers.md).
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from drivers.model.runner import ModelRunner
from drivers.seq_table import SeqTable
from drivers.service import DriverService, cpu_list, driver_args, driver_config, pin
from ipc.errors import BadRequest, ConfigError
from ipc.protocol import driver as dp
from sdk.service import Context, handler
from text.shipped import read_tokenizer_files

__all__ = ["Driver", "cpu_list", "driver_args", "driver_config", "pin"]


class Driver(DriverService):
    """A driver that runs a model (drivers/model) on a torch device."""

    def __init__(self, argv: list[str] | None = None, **kwargs: Any):
        super().__init__(argv, **kwargs)
        self.runner: ModelRunner | None = None
        self._step_lock = anyio.Lock()
        self.seqs = SeqTable()  # each running sequence as the scheduler last sent it
        self._busy = False
        self._tokenizer_files: dict[str, str] = {}

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
            # Read with the weights: the scheduler and gateway get them over the wire.
            self._tokenizer_files = await anyio.to_thread.run_sync(read_tokenizer_files, self.runner.info.path)
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
            # Deltas made whole from what this driver keeps (seq_table.py).
            steps, trust, resend = self.seqs.expand_trusted(msg)
            try:
                if msg.copies:
                    await anyio.to_thread.run_sync(runner.copy_blocks, msg.copies)
                results = await anyio.to_thread.run_sync(runner.execute, steps, trust)
            except BaseException:
                self.seqs.record(steps, ["the step failed"] * len(steps))
                raise
            finally:
                self._busy = False
            self.seqs.record(steps, [r.error for r in results], [r.token for r in results])
        outputs = [dp.SeqOutput(r.seq_id, -1 if r.token is None else r.token, r.logprob or 0.0,
                                list(r.top_logprobs), r.error or "") for r in results]
        return dp.Executed(outputs + resend, time.perf_counter() - began)

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
                                   i.bos_token_id, i.dtype, i.device, i.num_params, i.host_slots,
                                   tokenizer_files=self._tokenizer_files)

    @handler(idempotent=True)
    async def health(self, msg: dp.DriverHealth, ctx: Context) -> dp.DriverHealthReply:
        # The runner never waits for a running step: this answers during one.
        h = self._runner().health()
        return dp.DriverHealthReply(h.ok, self._busy, h.steps, h.tokens, h.last_step_s, h.detail)
