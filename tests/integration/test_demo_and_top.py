"""The first-run experience: `llmos demo` end to end (short workload) and
`llmos top` in a pseudo-terminal."""

from __future__ import annotations

import os
import re
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.testing import REPO_ROOT, leftover_sockets, running_llmos

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "120"}


def test_llmos_demo_runs_end_to_end(home: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "tools.cli", "--home", str(home), "demo", "--requests", "6",
                          "--max-tokens", "12"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "SIGKILL" in text and "supervisor restarted it" in text
    assert "6/6" in text  # every request finished exactly once
    assert "3/3" in text  # the greedy ones equal a fault-free rerun
    assert "no process or socket left behind" in text
    # issue 13 #7: it says the text is noise and how to serve a real model, and shows some, escaped
    assert "random weights" in text and "llmos up --model DIR" in text
    assert "a few of the generated texts" in text
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", text.replace("\x1b[", "")), "raw control characters"
    assert leftover_sockets(home) == []
    assert (home / "models" / "demo" / "model.safetensors").exists()  # generated locally, cached


def _drain_until_exit(pid: int, fd: int) -> None:
    """Wait for the child while reading its terminal, as a terminal does: a
    pty nobody reads fills up, and top's next frame would block it forever."""
    while os.waitpid(pid, os.WNOHANG)[0] == 0:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                os.read(fd, 65536)
            except OSError:
                pass


@pytest.mark.loop_block()  # reads `llmos top` off a pty with select(), on purpose
async def test_llmos_top_refreshes_in_a_terminal(home: Path) -> None:
    async with running_llmos(home):
        pid, fd = pty.fork()
        if pid == 0:  # the child: llmos top on a real terminal
            os.chdir(REPO_ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "tools.cli", "--home", str(home), "top"], ENV)
        screen = b""
        try:
            end = time.monotonic() + 60
            # Two frames: the header line appears once per refresh.
            while screen.count(b"ROUTED") < 2:
                assert time.monotonic() < end, f"no second frame; screen so far: {screen[-2000:]!r}"
                ready, _, _ = select.select([fd], [], [], 1.0)
                if ready:
                    try:
                        screen += os.read(fd, 65536)
                    except OSError:
                        break
        finally:
            os.kill(pid, 2)  # ^C
            _drain_until_exit(pid, fd)
            os.close(fd)
        assert b"echo" in screen and b"kernel" in screen and screen.count(b"ROUTED") >= 2
