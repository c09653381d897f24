"""`llmos restart SERVICE`: a rolling restart, one instance at a time.

Each instance gets SIGTERM through the kernel's Kill op (a gateway instance
drains: it stops accepting and lets its streams finish), and the next one is
touched only once a replacement of this one is READY. A service with two or
more instances (the gateway's default) thus always has one serving: with the
gateway's shared listening socket, not one connection is refused. A service
with one instance is down while it restarts, as with `llmos kill`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ipc.errors import DeadlineExceeded, NotFound
from ipc.protocol.kernel import ChildState, InstanceInfo
from tools.cli_flags import connect
from tools.terminal import printable

POLL_S = 0.2  # a CLI polling the kernel's Status, not a test


def add_commands(sub: Any) -> None:
    p = sub.add_parser("restart", help="restart a service's instances one at a time (a gateway refuses no "
                                       "connection meanwhile)")
    p.add_argument("service", help="a service (every instance) or one instance")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds each instance may take to drain and come back READY (default 120)")
    p.set_defaults(fn=cmd_restart)


def cmd_restart(args: argparse.Namespace) -> int:
    with connect(args) as c:
        targets = [i for i in c.status().instances if args.service in (i.service, i.instance)]
        if not targets:
            raise NotFound(f"no service or instance named {args.service!r}")
        for inst in targets:
            new = roll(c, inst, args.timeout)
            print(f"llmos: {printable(inst.instance)} restarted (pid {inst.pid} -> {new.pid})")
    return 0


def roll(client: Any, inst: InstanceInfo, timeout: float) -> InstanceInfo:
    """SIGTERM `inst`; its replacement once READY (another pid)."""
    client.kill(inst.instance, "SIGTERM")
    deadline = time.monotonic() + timeout
    while True:
        now = next((i for i in client.status().instances if i.instance == inst.instance), None)
        if now is not None and now.pid != inst.pid and now.state == ChildState.READY:
            return now
        if now is not None and now.state in (ChildState.FAILED, ChildState.DEAD):
            raise NotFound(f"{inst.instance} did not come back: {now.last_exit}")
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{inst.instance} was not READY again within {timeout:g} s "
                                   f"(now {now.state if now is not None else 'gone'}); the rest were left alone")
        time.sleep(POLL_S)
