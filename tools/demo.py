"""`llmos demo`: the first run. Boot llmos on the built-in demo model, show
where everything is, serve a mixed streaming workload from two tenants at
several priorities, SIGKILL the CPU driver in the middle, and show that every
request still finished exactly once — then shut down cleanly.

The demo model has random weights (no download, ever): its text is noise
(random bytes, shown with their control characters escaped); what the demo
shows is the operating system around it. A real checkpoint is served with
`llmos up --model DIR` (a local Hugging Face directory).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ipc.errors import LlmosError
from common.config.driver import REPRODUCIBLE_DTYPE
from common.home import admin_key_path, front_endpoint, llmos_home
from ipc.protocol import security as sec
from ipc.protocol.kernel import ChildState
from kernel.config import default_children
from sdk.client import AsyncClient
from tools.testing import RunningLlmos, running_llmos
from tools.bench.common import percentile
from tools.terminal import printable

SAMPLES = 3
SAMPLE_CHARS = 100
PROMPTS = ["Once upon a time", "The kernel routes messages", "Paged attention stores keys",
           "A supervisor restarts", "Tokens per second", "Hello, llmos!"]
REQUESTS = 24
MAX_TOKENS = 40


@dataclass
class Outcome:
    tenant: str
    priority: int
    greedy: bool
    prompt: str
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finished: int = 0  # how many final chunks arrived (exactly one, or the contract broke)
    reason: str = ""
    error: str = ""
    ttft_s: float = 0.0
    faulted: bool = False  # the driver died while it was running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _one(client: AsyncClient, o: Outcome, i: int, max_tokens: int, progress: Progress, task: TaskID,
               kill_window: list[bool]) -> None:
    began = time.monotonic()
    try:
        async for chunk in client.stream_generate(o.prompt, max_tokens=max_tokens, priority=o.priority,
                                                  temperature=0.0 if o.greedy else 0.8, seed=i,
                                                  ignore_eos=True, timeout=300):
            if not o.token_ids and chunk.token_ids:
                o.ttft_s = time.monotonic() - began
            o.token_ids.extend(chunk.token_ids)
            o.text.append(chunk.text)
            progress.advance(task, len(chunk.token_ids))  # type: ignore[arg-type]
            if kill_window[0]:
                o.faulted = True
            if chunk.finish_reason is not None:
                o.finished += 1
                o.reason = str(chunk.finish_reason)
    except LlmosError as exc:
        o.error = str(exc)


async def _kill_driver_midway(llmos: RunningLlmos, progress: Progress, task: TaskID, total: int,
                              console: Console, kill_window: list[bool], report: dict[str, float]) -> None:
    while progress.tasks[0].completed < total * 0.4:
        await anyio.sleep(0.05)
    st = await llmos.status()
    cpu = next(i for i in st.instances if i.service == "driver")
    console.print(f"  [bold red]✗ SIGKILL[/] driver {cpu.instance} (pid {cpu.pid}) with requests in flight")
    kill_window[0] = True
    killed_at = time.monotonic()
    os.kill(cpu.pid, signal.SIGKILL)
    st = await llmos.wait_for(lambda s: any(i.service == "driver" and i.state == ChildState.READY and i.pid != cpu.pid
                                            for i in s.instances), 300, "driver back")
    report["driver_ready_s"] = time.monotonic() - killed_at
    new = next(i for i in st.instances if i.service == "driver")
    console.print(f"  [bold green]✓[/] supervisor restarted it as pid {new.pid} in "
                  f"{report['driver_ready_s']:.1f}s; its sequences are recomputed, not lost")
    kill_window[0] = False


async def demo(home: Path, requests: int = REQUESTS, max_tokens: int = MAX_TOKENS) -> int:
    console = Console()
    port = _free_port()
    console.print(f"[bold]llmos demo[/] — LLMOS_HOME {home}")
    console.print("  [yellow]the demo model has random weights: what it generates is noise[/] (random bytes, "
                  "control characters shown escaped); the demo is about the OS around it. To serve a real "
                  "model: [bold]llmos up --model DIR[/] (a local Hugging Face checkpoint)")
    console.print("  booting: security, echo, memory, cpu driver (demo model, generated on first use; float32, "
                  "so the greedy reruns below compare token for token), scheduler, HTTP gateway…")
    children = default_children("demo", {"cpu": 1}, f"127.0.0.1:{port}", kv_cache_mb=64,
                                driver_args=["--dtype", REPRODUCIBLE_DTYPE])
    async with running_llmos(home, children, auth=True, ready_timeout=900) as llmos:
        st = await llmos.status()
        console.print(f"  kernel pid {st.pid}; SDK endpoint {front_endpoint(home)}")
        console.print(f"  OpenAI-compatible HTTP: http://127.0.0.1:{port}/v1  (metrics: /metrics)")
        console.print(f"  admin API key: {admin_key_path(home)} (mode 0600)\n")
        ps = Table("service", "instance", "pid", "state", box=None, pad_edge=False)
        for inst in st.instances:
            ps.add_row(inst.service, inst.instance, str(inst.pid), inst.state)
        console.print(ps)

        admin = llmos.client
        keys = {t: (await admin.call(sec.SECURITY, sec.CreateKey(t, ["generate"], note="demo"))).api_key
                for t in ("alice", "bob")}
        clients = {t: await AsyncClient.connect(home=home, api_key=k) for t, k in keys.items()}
        console.print(f"\n  two tenants with their own API keys: {', '.join(clients)}; "
                      f"{requests} streaming requests at priorities 0–2, half greedy\n")
        outcomes = [Outcome("alice" if i % 2 else "bob", i % 3, i % 2 == 0, PROMPTS[i % len(PROMPTS)])
                    for i in range(requests)]
        total = requests * max_tokens
        report: dict[str, float] = {}
        kill_window = [False]
        began = time.monotonic()
        with Progress(TextColumn("  tokens"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("tokens", total=total)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_kill_driver_midway, llmos, progress, task, total, console, kill_window, report)
                async with anyio.create_task_group() as work:
                    for i, o in enumerate(outcomes):
                        work.start_soon(_one, clients[o.tenant], o, i, max_tokens, progress, task, kill_window)
                tg.cancel_scope.cancel()
        elapsed = time.monotonic() - began

        # Greedy answers must not depend on the crash: rerun them without one.
        greedy = [o for o in outcomes if o.greedy and not o.error]
        matches: list[bool] = []

        async def rerun(o: Outcome) -> None:
            ref = await clients[o.tenant].generate(o.prompt, max_tokens=max_tokens, temperature=0.0,
                                                   ignore_eos=True, timeout=300)
            matches.append(ref.token_ids == o.token_ids)
        with console.status("  rerunning the greedy requests without a fault…"):
            async with anyio.create_task_group() as tg:
                for o in greedy:
                    tg.start_soon(rerun, o)
        same = sum(matches)
        st = await llmos.status()
        ok = [o for o in outcomes if o.finished == 1 and not o.error]
        failed = [o for o in outcomes if o.error]
        dup = [o for o in outcomes if o.finished > 1]
        tokens = sum(len(o.token_ids) for o in outcomes)
        ttfts = [o.ttft_s * 1000 for o in ok]
        summary = Table(title="summary", box=None, pad_edge=False, show_header=False)
        summary.add_row("requests finished exactly once", f"{len(ok)}/{requests}")
        summary.add_row("failed / duplicated", f"{len(failed)} / {len(dup)}")
        summary.add_row("tokens generated", f"{tokens} in {elapsed:.1f}s ({tokens / elapsed:.0f} tokens/s, "
                                            "crash and recompute included)")
        summary.add_row("TTFT p50 / p99", f"{percentile(ttfts, 50):.0f} ms / {percentile(ttfts, 99):.0f} ms")
        summary.add_row("driver back after SIGKILL", f"{report.get('driver_ready_s', float('nan')):.1f}s")
        summary.add_row("greedy requests equal to a fault-free rerun", f"{same}/{len(greedy)}")
        summary.add_row("restarts", ", ".join(f"{i.instance}={i.restarts}" for i in st.instances))
        console.print()
        console.print(summary)
        console.print("\n  a few of the generated texts (random weights: noise, as promised):")
        for o in [o for o in outcomes if o.text and not o.error][:SAMPLES]:
            text = printable("".join(o.text), newlines=False)
            shown = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS - 1] + "…"
            console.print(Text(f"    {o.prompt!r} → {shown}"))  # Text: the model's brackets are not markup
        for o in failed:
            console.print(f"  [red]failed[/] {o.tenant} p{o.priority}: {o.error}")
        for c in clients.values():
            await c.aclose()
        console.print("\n  shutting down (reverse start order)…")
    console.print("  done: every service stopped, no process or socket left behind.")
    return 0 if len(ok) == requests and same == len(greedy) else 1


def run_demo(args: argparse.Namespace) -> int:
    home = llmos_home(args.home)
    sock = Path(front_endpoint(home)[len("ipc://"):])
    if sock.exists():
        print(f"llmos: a kernel is already running under {home}; stop it with `llmos down` or use --home",
              file=sys.stderr)
        return 1
    return int(anyio.run(demo, home, args.requests, args.max_tokens, backend="asyncio",
                         backend_options={"use_uvloop": True}))
