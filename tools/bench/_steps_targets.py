"""What the steps benchmark drives: the scheduler on the null driver through
the whole OS (kernel with auth on, security, memory server, null driver and
scheduler as processes; requests through the SDK), and the same engine in
this process with the memory manager and the null driver's own handler
(no kernel, sockets or codec). Torch-free, both."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import anyio

from common.config.scheduler import SchedulerConfig, load_scheduler_config
from drivers.null import NullDriver
from ipc.protocol import driver as dp
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from ipc.protocol.base import Message
from ipc.protocol.sampling import SamplingParams
from kernel.config import ChildSpec
from services.memory import MemoryManager
from services.scheduler.engine import Engine, Model
from text.tokenizer import load_tokenizer
from tools.testing import running_llmos

GREEDY = SamplingParams(temperature=0.0)
SCHEDULER_SWITCH_INTERVAL_S = 0.0005
SCHEDULER_GC_THRESHOLD = (10_000, 10, 10)
POOL = "null"


def scheduler_toml(max_seqs: int, async_steps: bool = True) -> str:
    """Room for every sequence at once, one tenant's flood allowed (the bench
    is one tenant), and the online tuner off: the limits stay as set and
    nothing is refused early. `async_steps`: the scheduler's knob."""
    return (f"[scheduler]\ntoken_budget = 8192\nmax_num_seqs = {max_seqs}\nmax_waiting = 2048\n"
            f"async_steps = {'true' if async_steps else 'false'}\n"
            "max_waiting_tokens = 16000000\nmax_waiting_share = 1.0\n\n"
            "[scheduler.tuner]\nenabled = false\nreject_factor = 0.0\n")


def null_args(step_ms: float, num_blocks: int) -> list[str]:
    return ["--step-ms", str(step_ms), "--num-blocks", str(num_blocks), "--max-model-len", "65536"]


class Target(Protocol):
    name: str

    async def stream(self, prompt: list[int] | str, max_tokens: int, rid: str,
                     on_chunk: Callable[[int], None]) -> None:
        """Generate; `on_chunk(tokens)` as each chunk arrives; return at the end."""
        ...

    async def cancel(self, rid: str) -> None: ...

    async def stats(self) -> sp.SchedulerStatsReply: ...

    async def pids(self) -> dict[str, int]:
        """The processes whose CPU the step costs, by role."""
        ...


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of `pid` so far (Linux /proc;
    nan where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OsTarget:
    name = "os"

    def __init__(self, client: Any):
        self.client = client

    async def stream(self, prompt: list[int] | str, max_tokens: int, rid: str,
                     on_chunk: Callable[[int], None]) -> None:
        async for chunk in self.client.stream_generate(prompt, max_tokens=max_tokens, params=GREEDY,
                                                       ignore_eos=True, request_id=rid):
            on_chunk(len(chunk.token_ids))

    async def cancel(self, rid: str) -> None:
        await self.client.cancel(rid)

    async def stats(self) -> sp.SchedulerStatsReply:
        return await self.client.scheduler_stats()  # type: ignore[no-any-return]

    async def pids(self) -> dict[str, int]:
        st = await self.client.status()
        roles = {"scheduler": "scheduler", "memory": "memory", "null": "driver", "security": "security"}
        found = {roles[i.instance]: i.pid for i in st.instances if i.instance in roles}
        return {"kernel": st.pid, **found, "client": os.getpid()}


@asynccontextmanager
async def booted_os(home: Path, step_ms: float, max_seqs: int, num_blocks: int,
                    async_steps: bool = True) -> AsyncIterator[OsTarget]:
    """`llmos up`'s processes with auth on, the null driver simulating
    `step_ms` steps, the scheduler configured by `scheduler_toml`."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "steps-scheduler.toml"
    cfg.write_text(scheduler_toml(max_seqs, async_steps))
    children = [ChildSpec("security", "services.security"), ChildSpec("memory", "services.memory"),
                ChildSpec("null", "drivers", service="driver", args=["null", *null_args(step_ms, num_blocks)]),
                ChildSpec("scheduler", "services.scheduler", args=["--config", str(cfg)])]
    async with running_llmos(home, children, auth=True, ready_timeout=120.0) as llmos:
        target = OsTarget(llmos.client)
        with anyio.fail_after(60):  # until the scheduler has learned the model
            while True:
                try:
                    await target.stream([256, 1, 2], 1, f"probe-{time.monotonic_ns()}", lambda n: None)
                    break
                except Exception:  # noqa: BLE001 - Unavailable until a driver is described
                    await anyio.sleep(0.2)
        yield target


class NullBackend:
    """The engine's backend in this process: the memory manager's calls
    directly, and the null driver's own Execute handler (its checks, its
    tokens, its simulated step time) without the wire."""

    def __init__(self, driver: NullDriver):
        self.driver = driver
        self.memory = MemoryManager()
        lim = driver.limits
        self.memory.register_pool(mp.RegisterPool(POOL, lim.num_blocks, lim.block_size, 0))

    def __getattr__(self, op: str) -> Callable[[Message], Any]:
        # reserve, release, reregister, swap_out, swap_in, fork, ...: whatever
        # the engine's Backend asks the memory server, the manager answers.
        method = getattr(self.memory, op)

        async def call(req: Message) -> Any:
            return method(req)
        return call

    async def execute(self, instance: str, req: dp.Execute) -> dp.Executed:
        return await self.driver.execute(req, None)  # type: ignore[arg-type]

    async def swap_blocks(self, instance: str, req: dp.SwapBlocksOut | dp.SwapBlocksIn) -> dp.Swapped:
        return dp.Swapped(len(req.block_ids))


class InProcTarget:
    name = "inproc"

    def __init__(self, engine: Engine):
        self.engine = engine

    async def stream(self, prompt: list[int] | str, max_tokens: int, rid: str,
                     on_chunk: Callable[[int], None]) -> None:
        # Called from the engine's step, as the OS path's scheduler emits
        # (no queue: the client side costs next to nothing here).
        def emit(msg: Message) -> None:
            if isinstance(msg, sp.TokenDelta):
                on_chunk(len(msg.token_ids))

        submit = sp.Submit(prompt=prompt if isinstance(prompt, str) else "",
                           prompt_ids=prompt if isinstance(prompt, list) else [], params=GREEDY,
                           max_tokens=max_tokens, ignore_eos=True, request_id=rid)
        # As the service does: text is tokenized in a worker thread.
        ids = await anyio.to_thread.run_sync(self.engine.tokenize, submit)
        sink = self.engine.submit(submit, "", emit, ids)
        done = await sink.wait()
        on_chunk(len(done.token_ids))

    async def cancel(self, rid: str) -> None:
        self.engine.cancel("", rid)

    async def stats(self) -> sp.SchedulerStatsReply:
        return self.engine.stats()

    async def pids(self) -> dict[str, int]:
        return {"inproc": os.getpid()}


@asynccontextmanager
async def inproc_engine(home: Path, step_ms: float, max_seqs: int, num_blocks: int,
                        async_steps: bool = True) -> AsyncIterator[InProcTarget]:
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "steps-scheduler.toml"
    cfg.write_text(scheduler_toml(max_seqs, async_steps))
    config: SchedulerConfig = load_scheduler_config(cfg)
    driver = NullDriver(null_args(step_ms, num_blocks), instance=POOL, home=str(home))
    await driver.on_start()
    engine = Engine(config, NullBackend(driver))  # type: ignore[arg-type]
    engine.driver_up(POOL, driver.ready_meta())
    tok = load_tokenizer(driver.model_dir)
    engine.set_model(Model(tok, frozenset(tok.eos_token_ids), driver.limits.max_model_len))
    interval, threshold = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(SCHEDULER_SWITCH_INTERVAL_S)  # as services/scheduler/__main__.py sets them
    gc.set_threshold(*SCHEDULER_GC_THRESHOLD)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run)
            yield InProcTarget(engine)
            tg.cancel_scope.cancel()
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*threshold)


__all__ = ["InProcTarget", "OsTarget", "Target", "booted_os", "cpu_seconds", "inproc_engine"]
