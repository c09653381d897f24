"""What `llmos up` shows in its terminal: a few readable lines, not JSON.

Services starting, ready, exited and why, restarting; the endpoints and where
the logs are; why llmos stopped. Fed by the supervisor in the kernel's own
process: exits through its exit callback (with the reason, as they happen),
states by watching `Supervisor.describe()` — the supervisor has no change
feed, and a look every 0.1 s over a handful of children costs nothing. The
JSON logs go on to LLMOS_HOME/logs either way (`llmos logs`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import anyio

from ipc.protocol.kernel import ChildState

if TYPE_CHECKING:
    from kernel.registry import Registry
    from kernel.supervisor import Supervisor

WATCH_EVERY_S = 0.1
_NAME_WIDTH = 10


def printable(s: str, limit: int = 200) -> str:
    """`s` with control characters escaped (`\\x1b`) and cut: a name or
    reason never beeps or repaints the operator's terminal."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return out if len(out) <= limit else out[:limit] + "…"


class Console:
    """Writes to `out`; `out=None` is silent (`--quiet`, `--log-format json`)
    except `failed`, which always reaches `errors` — one line saying why."""

    def __init__(self, out: TextIO | None, errors: TextIO | None = None):
        self.out = out
        self.errors = errors
        self._seen: dict[str, tuple[ChildState, int]] = {}  # instance → (state, pid)
        self._all_ready = False
        self._stopping = False

    def line(self, who: str, text: str) -> None:
        if self.out is None:
            return
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp}  {printable(who, 40).ljust(_NAME_WIDTH)}  {printable(text, 400)}", file=self.out,
              flush=True)

    def banner(self, home: Path, front: str, logs: Path, admin_key: Path | None, pid: int) -> None:
        if self.out is None:
            return
        for label, value in (("home", str(home)), ("kernel", f"pid {pid}"), ("SDK", front),
                             ("logs", f"{logs} (JSON; read them with `llmos logs`)"),
                             *((("admin key", f"{admin_key} (0600)"),) if admin_key else ())):
            print(f"llmos {label.ljust(9)} {printable(value, 400)}", file=self.out, flush=True)

    def exited(self, instance: str, reason: str) -> None:
        """The supervisor's exit callback: every exit, with its reason."""
        if self._stopping:
            return
        self.line(instance, f"exited: {reason}")

    def stopping(self, reason: str) -> None:
        self._stopping = True
        self.line("llmos", f"stopping ({reason})")

    def stopped(self, rc: int, reason: str) -> None:
        if rc == 0:
            self.line("llmos", "stopped")
        else:
            self.failed(reason)

    def failed(self, reason: str) -> None:
        stream = self.out or self.errors
        if stream is not None:
            print(f"llmos: stopped: {printable(reason, 400)}", file=stream, flush=True)

    async def watch(self, supervisor: "Supervisor", registry: "Registry") -> None:
        """Report state changes until cancelled."""
        while True:
            self.look(supervisor, registry)
            await anyio.sleep(WATCH_EVERY_S)

    def look(self, supervisor: "Supervisor", registry: "Registry") -> None:
        if self.out is None or self._stopping:
            return
        infos = supervisor.describe()
        for info in infos:
            before = self._seen.get(info.instance)
            now = (info.state, info.pid)
            if before == now:
                continue
            self._seen[info.instance] = now
            if info.state == ChildState.STARTING and (before is None or before[0] != ChildState.STARTING):
                self.line(info.instance, f"restarting (restart {info.restarts})" if info.restarts else "starting")
            elif info.state == ChildState.READY:
                inst = registry.by_name.get(info.instance)
                http = inst.meta.get("http") if inst is not None else None
                self.line(info.instance, f"ready (pid {info.pid})" + (f"; HTTP API at {http}" if http else ""))
            elif info.state == ChildState.DEAD:
                self.line(info.instance, f"given up: {info.last_exit}")
        if not self._all_ready and infos and all(i.state == ChildState.READY for i in infos):
            self._all_ready = True
            self.line("llmos", f"ready: {len(infos)} services up; stop with Ctrl-C or `llmos down`")
