"""What the serving benchmark measures: llmos through the SDK, the same
engine in-process with no IPC, and transformers' static-batch `generate`.

All three run greedy with EOS ignored, so every request generates exactly
its `max_tokens` and the three do the same work.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import torch

from drivers.model.runner import ModelRunner
from drivers.seq_table import SeqTable
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol.base import Message
from ipc.protocol.sampling import SamplingParams
from ipc.protocol.scheduler import Submit, TokenDelta, Usage
from kernel.config import ChildSpec, default_children
from sdk.client import AsyncClient
from tools.testing import running_llmos
from services.memory import MemoryManager
from common.config.scheduler import SchedulerConfig
from services.scheduler.engine import Engine, Model
from tools.bench._serve_load import Req, Timing
from tools.bench.driver import _Clock

GREEDY = SamplingParams(temperature=0.0)
POOL = "cpu"


class OsTarget:
    """llmos as a user runs it: kernel, memory server, CPU driver and
    scheduler as processes; requests through the SDK."""

    def __init__(self, client: AsyncClient):
        self.client = client
        self.request_ids: list[str] = []  # of every request served, in submission order
        # By `Req.index`, of the last request served with it: what came back.
        self.token_ids: dict[int, list[int]] = {}
        self.usage: dict[int, Usage] = {}

    async def serve(self, req: Req, timing: Timing) -> None:
        rid = uuid.uuid4().hex
        self.request_ids.append(rid)
        ids = self.token_ids[req.index] = []
        async for chunk in self.client.stream_generate(req.prompt, max_tokens=req.max_tokens, params=GREEDY,
                                                       ignore_eos=True, priority=req.priority, request_id=rid):
            timing.got(len(chunk.token_ids))
            ids.extend(chunk.token_ids)
            if chunk.usage is not None:
                self.usage[req.index] = chunk.usage

    async def cancel(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            await self.client.cancel(rid)


def scheduler_args(config: SchedulerConfig) -> list[str]:
    return ["--policy", config.policy.name.value, "--token-budget", str(config.token_budget),
            "--max-seqs", str(config.max_num_seqs), "--prefill-chunk", str(config.prefill_chunk),
            "--max-waiting", str(config.max_waiting), "--max-waiting-tokens", str(config.max_waiting_tokens),
            "--preemption", config.preemption.value]


@asynccontextmanager
async def booted_os(home: Path, config: SchedulerConfig, kv_cache_mb: int,
                    swap_mb: float = 0.0) -> AsyncIterator[OsTarget]:
    """`llmos up`'s children (auth off: no security server), the scheduler
    configured as `config`; swap_mb: the driver's host swap tier (0: none)."""
    children: list[ChildSpec] = []
    for c in default_children("demo", {"cpu": 1}, kv_cache_mb=kv_cache_mb, swap_mb=swap_mb):
        if c.name in ("security", "echo"):
            continue
        if c.name == "scheduler":
            c = msgspec.structs.replace(c, args=scheduler_args(config))
        children.append(c)
    async with running_llmos(home, children, ready_timeout=300.0, scheduler=config) as llmos:  # its [scheduler.tuner]
        yield OsTarget(llmos.client)


class RunnerBackend:
    """The engine's `Backend` with the memory manager and a `ModelRunner` in
    this process: the driver's `Execute` handler without the wire."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.seqs = SeqTable()  # each running sequence as the engine last sent it
        self._step_lock = anyio.Lock()  # steps one at a time, in arrival order, as a driver runs them
        self.memory = MemoryManager()
        info = runner.info
        self.memory.register_pool(mp.RegisterPool(POOL, info.num_blocks, info.block_size))

    async def reserve(self, req: mp.Reserve) -> mp.ReserveReply:
        return self.memory.reserve(req)

    async def release(self, req: mp.Release) -> mp.ReleaseReply:
        return self.memory.release(req)

    async def reregister(self, req: mp.Reregister) -> mp.ReregisterReply:
        return self.memory.reregister(req)

    async def execute(self, instance: str, req: dp.Execute) -> dp.Executed:
        async with self._step_lock:  # (a step sent ahead, async steps, waits for the one before)
            began = time.perf_counter()
            # As the driver does (drivers/base.py): deltas made whole from what it keeps.
            steps, trust, resend = self.seqs.expand_trusted(req)

            def run() -> list[dp.SeqOutput]:
                if req.copies:
                    self.runner.copy_blocks(req.copies)
                results = self.runner.execute(steps, trust)
                self.seqs.record(steps, [r.error for r in results], [r.token for r in results])
                return [dp.SeqOutput(r.seq_id, -1 if r.token is None else r.token, r.logprob or 0.0,
                                     list(r.top_logprobs), r.error or "") for r in results]

            outputs = await anyio.to_thread.run_sync(run)
            return dp.Executed(outputs + resend, time.perf_counter() - began)


    async def swap_out(self, req: mp.SwapOut) -> mp.SwapOutReply:
        return self.memory.swap_out(req)

    async def swap_in(self, req: mp.SwapIn) -> mp.SwapInReply:
        return self.memory.swap_in(req)

    async def fork(self, req: mp.Fork) -> mp.ForkReply:
        return self.memory.fork(req)

    async def swap_blocks(self, instance: str, req: dp.SwapBlocksOut | dp.SwapBlocksIn) -> dp.Swapped:
        if isinstance(req, dp.SwapBlocksOut):
            await anyio.to_thread.run_sync(self.runner.swap_out_to_host, req.block_ids, req.slots)
            return dp.Swapped(len(req.block_ids))
        await anyio.to_thread.run_sync(self.runner.swap_in_from_host, req.slots, req.block_ids)
        return dp.Swapped(len(req.block_ids))


class InProcTarget:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def serve(self, req: Req, timing: Timing) -> None:
        def emit(msg: Message) -> None:
            if isinstance(msg, TokenDelta):
                timing.got(len(msg.token_ids))

        sink = self.engine.submit(Submit(prompt_ids=req.prompt, params=GREEDY, max_tokens=req.max_tokens,
                                         ignore_eos=True, priority=req.priority), "", emit)
        done = await sink.wait()
        timing.got(len(done.token_ids))


@asynccontextmanager
async def inproc_engine(home: Path, config: SchedulerConfig, kv_cache_mb: int) -> AsyncIterator[InProcTarget]:
    """The scheduler's engine loop with the memory manager and the model
    runner in this process: no kernel, no sockets, no serialisation."""
    runner = await anyio.to_thread.run_sync(
        lambda: ModelRunner.load("demo", kv_cache_bytes=kv_cache_mb * 2**20, home=home))
    try:
        engine = Engine(config, RunnerBackend(runner))
        info = runner.info
        engine.driver_up(POOL, {"num_blocks": info.num_blocks, "block_size": info.block_size, "device": info.device})
        engine.set_model(Model(runner.tokenizer, frozenset(info.eos_token_ids), info.max_model_len))
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            yield InProcTarget(engine)
            tg.cancel_scope.cancel()
    finally:
        runner.close()


def hf_static(model_dir: Path, workload: Sequence[Req], batch: int = 32) -> tuple[list[Timing], float]:
    """transformers `generate` over the workload's prompts in static batches
    (left-padded), each run to its longest output; only the tokens each
    request asked for count. Offline: arrival times are ignored, and a
    request's TTFT is measured from its batch's start. Blocking: run it in a
    thread."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    timings: list[Timing] = []
    began = time.perf_counter()
    for i in range(0, len(workload), batch):
        group = workload[i:i + batch]
        width = max(len(r.prompt) for r in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(group):
            ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[row, width - len(r.prompt):] = 1
        steps = max(r.max_tokens for r in group)
        clock = _Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=0, streamer=clock)
        # puts[0] is the prompt; puts[k] the k-th generated token of every row.
        for r in group:
            timings.append(Timing(start, clock.puts[1], clock.puts[r.max_tokens], r.max_tokens))
    return timings, time.perf_counter() - began
