"""`llmos demo`: boot llmos on the built-in demo model, show it serving and
surviving a crash, shut down.

Until the scheduler service lands, the demo drives the CPU driver's `Execute`
steps itself (one sequence, greedy), the way the scheduler will: block table,
prefill, then one decode step per token. Midway it SIGKILLs the driver; the
supervisor restarts it, and the demo recomputes the sequence's KV (prompt +
tokens so far) on the new process and continues. Greedy decoding is
deterministic, so the recovered text must equal an uninterrupted run — the
demo checks that and says so.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import anyio

from drivers.model.catalog import open_tokenizer
from ipc.errors import LlmosError
from ipc.home import llmos_home
from ipc.protocol import driver as dp
from ipc.protocol.echo import Echo
from ipc.protocol.sampling import SamplingParams
from kernel.config import ChildSpec
from sdk.testing import RunningLlmos, running_llmos

PROMPT = "Hello, llmos! Tell me about operating systems."
TOKENS = 48
KILL_AT = 20
GREEDY = SamplingParams(temperature=0.0)


def say(msg: str = "") -> None:
    print(msg, flush=True)


async def generate(llmos: RunningLlmos, prompt: list[int], n: int, kill_at: int | None,
                   on_token: Callable[[int], None]) -> tuple[list[int], float]:
    out: list[int] = []
    block_size = 16
    table = list(range((len(prompt) + n) // block_size + 1))
    began = time.perf_counter()
    recompute = True
    while len(out) < n:
        if recompute:
            # Prefill: the prompt and everything generated so far (after a crash, this
            # rebuilds the KV cache the dead driver held).
            ids, start = prompt + out, 0
            recompute = False
        else:
            ids, start = [out[-1]], len(prompt) + len(out) - 1
        if kill_at is not None and len(out) == kill_at:
            kill_at = None
            pid = next(i.pid for i in (await llmos.status()).instances if i.service == "driver")
            say(f"\n\n  ✗ SIGKILL driver (pid {pid}) after {len(out)} tokens")
            os.kill(pid, signal.SIGKILL)
            st = await llmos.wait_for(lambda s: any(i.service == "driver" and i.state == "ready" and i.pid != pid
                                                    for i in s.instances), 120, "driver back")
            new = next(i for i in st.instances if i.service == "driver")
            say(f"  ✓ supervisor restarted it (pid {new.pid}, restarts {new.restarts}); "
                f"recomputing {len(prompt) + len(out)} tokens of KV and continuing\n")
            recompute = True
            continue
        reply = await llmos.client.call("driver", dp.Execute([dp.StepSeq(1, ids, start, table, params=GREEDY)]),
                                        timeout=120)
        o = reply.outputs[0]
        if o.error:
            raise LlmosError(o.error)
        out.append(o.token)
        on_token(o.token)
    return out, time.perf_counter() - began


async def demo(home: Path) -> int:
    spec = [ChildSpec("echo", "services.echo"),
            ChildSpec("cpu", "drivers.cpu", service="driver",
                      args=["--model", "demo", "--kv-cache-mb", "64", "--threads", str(os.cpu_count() or 1)])]
    say(f"llmos demo — LLMOS_HOME {home}")
    say("  booting the kernel, echo and the CPU driver (the demo model is generated on first use)…")
    async with running_llmos(home, spec, ready_timeout=600) as llmos:
        st = await llmos.status()
        say(f"  kernel pid {st.pid}; clients connect to {llmos.client.connection.endpoint}\n")
        say(f"  {'SERVICE':8} {'INSTANCE':9} {'PID':>7}  STATE")
        for i in st.instances:
            say(f"  {i.service:8} {i.instance:9} {i.pid:>7}  {i.state}")

        t = time.perf_counter()
        for _ in range(200):
            await llmos.client.call("echo", Echo(b"ping"))
        say(f"\n  echo: 200 round trips through the kernel, {(time.perf_counter() - t) / 200 * 1e6:.0f} µs each")

        desc = await llmos.client.call("driver", dp.DescribeModel())
        say(f"  model: {desc.name} ({desc.architecture}, {desc.num_params / 1e6:.0f}M params, {desc.dtype}), "
            f"{desc.num_blocks} KV blocks of {desc.block_size} tokens")
        tok = open_tokenizer("demo", home)
        prompt = tok.encode(PROMPT)
        say(f"\n  prompt: {PROMPT!r}  (the demo model has random weights: expect noise, not prose)\n  ")
        det = tok.detokenizer(prompt)

        def show(t: int) -> None:
            sys.stdout.write(det.feed(t))
            sys.stdout.flush()

        faulted, secs = await generate(llmos, prompt, TOKENS, KILL_AT, show)
        say(det.flush())
        say(f"\n  {TOKENS} tokens in {secs:.2f}s, including the crash and the recompute")
        det = tok.detokenizer(prompt)
        clean, secs = await generate(llmos, prompt, TOKENS, None, lambda t: None)
        say(f"  reference run without a fault: {TOKENS / secs:.1f} tokens/s at batch 1")
        same = faulted == clean
        say(f"  recovered output {'equals' if same else 'DIFFERS FROM'} the fault-free run "
            f"({sum(a == b for a, b in zip(faulted, clean))}/{TOKENS} tokens match)")
        st = await llmos.status()
        say(f"  kernel counters: routed {st.counters.routed}, resent {st.counters.resent}, "
            f"rejected {st.counters.rejected}")
        say("\n  shutting down (reverse start order)…")
    say("  done: no process left behind.")
    return 0 if same else 1


def run_demo(args: argparse.Namespace) -> int:
    home = llmos_home(args.home)
    from ipc.home import front_endpoint

    sock = Path(front_endpoint(home)[len("ipc://"):])
    if sock.exists():
        print(f"llmos: a kernel is already running under {home}; stop it with `llmos down` or use --home",
              file=sys.stderr)
        return 1
    return anyio.run(demo, home, backend="asyncio", backend_options={"use_uvloop": True})
