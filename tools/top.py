"""`llmos top`: a live view of a running llmos, refreshed once a second —
services (state, pid, restarts, CPU, RSS), the queue and running batch,
goodput and the tuner, KV usage and tokens/s. `--once` prints one frame and exits."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import anyio
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ipc.errors import LlmosError
from ipc.protocol import memory as mp
from ipc.protocol.kernel import ChildState
from ipc.protocol import scheduler as sp
from sdk.client import AsyncClient
from tools.terminal import printable

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_usage(pid: int) -> tuple[float, int] | None:
    """(cpu seconds so far, RSS bytes) of a local process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm") as f:
            rss_pages = int(f.read().split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK, rss_pages * _PAGE


@dataclass
class Sample:
    at: float
    cpu: dict[int, float]
    tokens: int


async def frame(client: AsyncClient, prev: Sample | None, local: bool = True) -> tuple[Group, Sample]:
    """One view; `local`: the kernel runs on this machine, so its processes'
    CPU and RSS are read from /proc (a remote kernel's pids are not ours)."""
    st = await client.status()
    try:
        sched: sp.SchedulerStatsReply | None = await client.call(sp.SCHEDULER, sp.SchedulerStats(), timeout=2)
    except LlmosError:
        sched = None
    try:
        mem: mp.MemoryStatsReply | None = await client.call("memory", mp.MemoryStats(), timeout=2)
    except LlmosError:
        mem = None
    now = time.monotonic()
    cpu: dict[int, float] = {}
    services = Table("SERVICE", "INSTANCE", "PID", "STATE", "RESTARTS", "CPU%", "RSS MB", "LAST EXIT",
                     title=f"llmos — kernel pid {st.pid}, up {st.uptime_s:.0f}s", title_justify="left")
    for pid, name, svc, state, restarts, last in [(st.pid, "kernel", "kernel", ChildState.READY, 0, "")] + [
            (i.pid, i.instance, i.service, i.state, i.restarts, i.last_exit) for i in st.instances]:
        usage = proc_usage(pid) if pid and local else None
        pct, rss = "-", "-"
        if usage is not None:
            cpu[pid] = usage[0]
            if prev is not None and pid in prev.cpu and now > prev.at:
                pct = f"{100 * (usage[0] - prev.cpu[pid]) / (now - prev.at):.0f}"
            rss = f"{usage[1] / 2**20:.0f}"
        # names and exit reasons as text, never markup or raw control characters
        services.add_row(Text(svc), Text(name), str(pid or "-"), Text(state), str(restarts), pct, rss,
                         Text(printable(last, newlines=False)))
    parts: list[Table] = [services]
    tokens = sched.tokens_generated if sched else 0
    if sched is not None:
        rate = "-"
        if prev is not None and now > prev.at:
            rate = f"{(tokens - prev.tokens) / (now - prev.at):.0f}"
        t = Table("POLICY", "WAITING", "RUNNING", "TOKEN BUDGET", "MAX SEQS", "PREEMPTIONS", "SWAPPED OUT/IN",
                  "TOKENS/S", title="scheduler", title_justify="left")
        swapped = f"{sched.swapped_out}/{sched.swapped_in}"  # by preemption (swap mode) and by suspend
        t.add_row(sched.policy, str(sched.waiting), str(sched.running), str(sched.token_budget),
                  str(sched.max_num_seqs), str(sched.preemptions), swapped, rate)
        parts.append(t)
        parts.append(tuner_view(sched))
        if sched.quota_waits or sched.kv_quota_refused:
            parts.append(quota_view(sched))
    if mem is not None:
        t = Table("POOL", "USED", "CACHED", "FREE", "UTIL%", "WASTE%", "HIT RATE", "SWAPPED",
                  title="KV cache", title_justify="left")
        for p in mem.pools:
            t.add_row(p.pool, str(p.used), str(p.cached), str(p.free), f"{100 * p.utilisation:.0f}",
                      f"{p.waste_pct:.1f}", f"{p.hit_rate:.2f}", str(p.swap_used))
        parts.append(t)
    c = st.counters
    counters = Table("ROUTED", "REPLIES", "REJECTED", "DROPPED", "RESENT", "CANCELLED", title="kernel",
                     title_justify="left")
    counters.add_row(*(str(x) for x in (c.routed, c.replies, c.rejected, c.dropped, c.resent, c.cancelled)))
    parts.append(counters)
    return Group(*parts), Sample(now, cpu, tokens)


def tuner_view(sched: sp.SchedulerStatsReply) -> Table:
    """Objectives and the tuner: goodput (requests that met both objectives,
    per second over the last minute), the verdicts so far, and the limits
    the tuner holds (services/scheduler/autotune.py)."""
    t = Table("OBJECTIVE TTFT/TPOT", "GOODPUT/S", "MET", "MISSED", "REFUSED EARLY", "TUNER", "STEP MS",
              "PREFILL CHUNK", "CHANGES", title="objectives and tuning", title_justify="left")
    objective = f"{sched.ttft_objective_ms:.0f}/{sched.tpot_objective_ms:.0f} ms"
    t.add_row(objective, f"{sched.goodput_rps:.2f}", str(sched.slo_met), str(sched.slo_missed),
              str(sched.slo_rejected), sched.tuner or "off", f"{sched.step_ms:.1f}", str(sched.prefill_chunk),
              str(sched.tuner_changes))
    return t


def quota_view(sched: sp.SchedulerStatsReply) -> Table:
    """Why waiting requests wait beyond their turn: per tenant, those held
    back by its KV-block quota (its other requests hold it), and how many
    requests were refused because they could never fit theirs."""
    t = Table("TENANT", "WAITING ON", "REQUESTS", "KV BLOCKS HELD / QUOTA",
              title=f"waiting on quota ({sched.kv_quota_refused} refused: could never fit)", title_justify="left")
    for w in sched.quota_waits:
        t.add_row(Text(w.tenant), "kv_blocks", str(w.requests), f"{w.held}/{w.limit}")  # a name, not markup
    return t


async def top(home: str | None, once: bool, endpoint: str | None = None, api_key: str | None = None) -> int:
    console = Console()
    local = endpoint is None
    async with await AsyncClient.connect(endpoint, home=home, api_key=api_key) as client:
        view, sample = await frame(client, None, local)
        if once:
            console.print(view)
            return 0
        # Ctrl-C / SIGTERM end the view through our own cancel scope (not
        # the event loop's KeyboardInterrupt, which a call in flight could
        # swallow), and the frames are drawn here, not by a refresh thread.
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_stop_on_signal, tg.cancel_scope)
                with Live(view, console=console, auto_refresh=False, screen=False) as live:
                    while True:
                        await anyio.sleep(1.0)
                        view, sample = await frame(client, sample, local)
                        live.update(view, refresh=True)
        except* LlmosError as group:  # e.g. the kernel went away: one clear line, not a traceback
            raise group.exceptions[0] from None
    return 0


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def run_top(home: str | None, once: bool, endpoint: str | None = None, api_key: str | None = None) -> int:
    try:
        return int(anyio.run(top, home, once, endpoint, api_key, backend="asyncio",
                             backend_options={"use_uvloop": True}))
    except KeyboardInterrupt:  # before the handler was installed
        return 0
