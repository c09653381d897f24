"""`llmos down`: ask the kernel to stop, then wait until it has.

Returning at the request left the old kernel stopping while the operator's
next `up` started; the old one then deleted the new one's sockets (issue 13
#2). Now `down` returns once the kernel and every child it reported have
exited and the home's sockets are gone, or says, naming them, what would not
stop. A kernel on another machine (a tcp:// endpoint) is only asked.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from common.home import back_endpoint, front_endpoint
from kernel.homelock import holder_pid

POLL_S = 0.05


def _started(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if it is gone
    or a zombie: with the pid, it tells the process from a later one reusing
    its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _socket_paths(home: Path) -> list[Path]:
    return [Path(ep[len("ipc://"):]) for ep in (front_endpoint(home), back_endpoint(home)) if ep.startswith("ipc://")]


def run_down(client: Any, home: Path, timeout_s: float) -> int:
    """`client`: a connected `sdk.client.Client` (closed here)."""
    with client as c:
        st = c.status()
        local = st.pid == holder_pid(home) and _started(st.pid) is not None
        watched = {f"kernel (pid {st.pid})": (st.pid, _started(st.pid))} if local else {}
        for i in st.instances if local else ():
            if i.pid > 0:
                watched[f"{i.instance} (pid {i.pid})"] = (i.pid, _started(i.pid))
        c.shutdown("llmos down")
    if not local:
        print(f"llmos: shutdown requested of kernel pid {st.pid} (not this home's local kernel: not waited for)")
        return 0
    print(f"llmos: stopping kernel pid {st.pid} and {len(watched) - 1} services …", flush=True)
    deadline = time.monotonic() + timeout_s
    sockets = _socket_paths(home)
    while True:
        running = [name for name, (pid, start) in watched.items() if start is not None and _started(pid) == start]
        left = [str(p) for p in sockets if p.exists()]
        if not running:
            break
        if time.monotonic() > deadline:
            print(f"llmos: still running {timeout_s:g}s after the shutdown request: {', '.join(running)}"
                  + (f"; sockets left: {', '.join(left)}" if left else "")
                  + ". Look at `llmos logs`; stop them with `kill -KILL PID`.", file=sys.stderr)
            return 1
        time.sleep(POLL_S)
    if left:
        # Every process is gone: these are a killed kernel's leftovers; the next `up` clears them.
        print(f"llmos: stopped; stale sockets left by the kernel: {', '.join(left)} (the next `llmos up` removes them)")
        return 0
    print("llmos: stopped")
    return 0
