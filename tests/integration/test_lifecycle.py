"""One kernel per home, `llmos down` that waits, and the console of `llmos up`,
as an operator meets them (issue 13 #1, #2, #6): real `llmos` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipc.errors import LlmosError
from ipc.protocol import kernel as kp
from kernel.config import ChildSpec, Config, KernelConfig
from sdk.client import Client
from tools.testing import REPO_ROOT, leftover_sockets, write_config
from tests.helpers.procs import pid_alive
from tests.helpers.cli import LLMOS, llmos, wait_ps

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def start_up(home: Path, out: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:
        return subprocess.Popen([*LLMOS, "--home", str(home), "up", *args], cwd=REPO_ROOT, env=ENV,
                                stdout=f, stderr=subprocess.STDOUT)


def all_ready(snap: dict) -> bool:  # type: ignore[type-arg]
    return bool(snap["instances"]) and all(i["state"] == "ready" for i in snap["instances"])


def serving(home: Path, what: str) -> kp.StatusReply:
    """The kernel's status once every child is READY (through the SDK: an
    `llmos ps` per poll costs an interpreter start each)."""
    end = time.monotonic() + 60
    while True:
        try:
            with Client.connect(home=home) as c:
                st = c.status()
            if st.instances and all(i.state == "ready" for i in st.instances):
                return st
        except LlmosError:
            pass
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def stop(up: subprocess.Popen[bytes]) -> None:
    if up.poll() is None:
        up.kill()
        up.wait()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Path, subprocess.Popen[bytes], Path]]:
    """One `llmos up` in the foreground (auth on: security and echo), its
    terminal captured in HOME/terminal."""
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    cfg = write_config(home / "llmos.toml", Config(children=[ChildSpec("security", "services.security"),
                                                             ChildSpec("echo", "services.echo")]))
    up = start_up(home, home / "terminal", "--config", str(cfg))
    try:
        wait_ps(home, all_ready, "all ready")
        yield home, up, cfg
        down = llmos(home, "down")
        assert down.returncode == 0, down.stderr
        assert up.poll() == 0  # `down` returned once the kernel had exited
        assert leftover_sockets(home) == []
    finally:
        stop(up)
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_a_second_up_on_the_same_home_is_refused_and_the_first_keeps_serving(
        served: tuple[Path, subprocess.Popen[bytes], Path]) -> None:
    home, first, cfg = served
    sockets = leftover_sockets(home)
    assert sockets == ["back.sock", "front.sock"]
    for argv in ([*LLMOS, "--home", str(home), "up", "--config", str(cfg)],
                 [sys.executable, "-m", "kernel", "--home", str(home), "--config", str(cfg)]):
        second = subprocess.run(argv, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"another llmos kernel (pid {first.pid}) is running on {home}" in second.stderr
    # A kernel of another home pointed at this one's socket path is refused too (a live socket).
    other = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    front = f"ipc://{home / 'run' / 'front.sock'}"
    third = subprocess.run([sys.executable, "-m", "kernel", "--home", str(other), "--config", str(cfg)], cwd=REPO_ROOT,
                           env={**ENV, "LLMOS_FRONT": front}, capture_output=True, text=True, timeout=60)
    subprocess.run(["rm", "-rf", str(other)], check=False)
    assert third.returncode == 1 and f"{front} is in use by another process" in third.stderr, third.stderr
    # Their exits took nothing of the first's: same sockets, same kernel answering.
    assert leftover_sockets(home) == sockets
    assert first.poll() is None
    snap = wait_ps(home, all_ready, "the first kernel still serving")
    assert snap["kernel"]["pid"] == first.pid
    assert (home / "run" / "kernel.lock").read_text().strip() == str(first.pid)


def test_the_console_is_readable_and_says_why_a_service_restarted(
        served: tuple[Path, subprocess.Popen[bytes], Path]) -> None:
    home, _, _ = served
    pid = next(i["pid"] for i in wait_ps(home, all_ready, "all ready")["instances"] if i["service"] == "echo")
    assert llmos(home, "kill", "echo").returncode == 0
    wait_ps(home, lambda s: all_ready(s) and any(i["service"] == "echo" and i["pid"] != pid
                                                 for i in s["instances"]), "echo restarted")
    terminal = home / "terminal"
    end = time.monotonic() + 30
    while "echo        ready (pid" not in terminal.read_text().split("exited: killed by SIGKILL")[-1]:
        assert time.monotonic() < end, terminal.read_text()
        time.sleep(0.05)
    lines = terminal.read_text().splitlines()
    assert lines and not any(line.lstrip().startswith("{") for line in lines), lines  # no JSON
    text = "\n".join(lines)
    for shown in (f"llmos logs      {home / 'logs'}", f"llmos SDK       ipc://{home / 'run' / 'front.sock'}",
                  "security    ready (pid", "llmos       ready: 2 services up",
                  "echo        exited: killed by SIGKILL", "echo        restarting (restart 1)"):
        assert shown in text, text
    # The JSON lines went to the log files instead.
    logged = [json.loads(line) for line in (home / "logs" / "kernel.log").read_text().splitlines()]
    assert any(r["event"] == "supervisor.exited" and r["reason"] == "killed by SIGKILL" for r in logged)


@pytest.mark.slow  # about 45 s: ten kernel boots
def test_down_then_up_at_once_ten_times(home: Path) -> None:
    cfg = write_config(home / "llmos.toml", Config(kernel=KernelConfig(auth=False),
                                                   children=[ChildSpec("echo", "services.echo")]))
    for n in range(10):
        # One round shows every process's JSON lines in the terminal; the others are --quiet.
        out = home / f"terminal.{n}"
        up = start_up(home, out, "--config", str(cfg), *(["--log-format", "json"] if n == 0 else ["--quiet"]))
        try:
            st = serving(home, f"round {n}: serving")
            assert st.pid == up.pid
            down = llmos(home, "down")
            assert down.returncode == 0 and "llmos: stopped" in down.stdout, down.stderr
            assert up.poll() == 0, f"round {n}: `down` returned before the kernel exited"
            assert leftover_sockets(home) == []
            assert not any(pid_alive(i.pid) for i in st.instances)
        finally:
            stop(up)
        if n == 0:
            records = [json.loads(line) for line in out.read_text().splitlines()]
            assert {r["service"] for r in records} >= {"kernel", "echo"}
        else:
            assert out.read_bytes() == b"", out.read_text()  # --quiet: not a line, not even a child's


def test_down_names_what_would_not_stop(home: Path) -> None:
    cfg = write_config(home / "llmos.toml", Config(
        kernel=KernelConfig(auth=False),
        children=[ChildSpec("echo", "services.echo"),
                  ChildSpec("stubborn", "tests.helpers.stubborn", shutdown_timeout_s=3)]))
    up = start_up(home, home / "terminal", "--config", str(cfg), "--quiet")
    try:
        snap = wait_ps(home, lambda s: any(i["service"] == "stubborn" and i["pid"] > 0 for i in s["instances"]),
                       "stubborn started")
        pid = next(i["pid"] for i in snap["instances"] if i["service"] == "stubborn")
        down = llmos(home, "down", "--timeout", "0.5")
        assert down.returncode == 1
        assert "still running 0.5s after the shutdown request" in down.stderr
        assert f"stubborn (pid {pid})" in down.stderr and f"kernel (pid {up.pid})" in down.stderr
        assert up.wait(60) == 0  # the kernel killed it after its shutdown timeout
        assert leftover_sockets(home) == []
        for bad in ("0", "-1", "nan", "inf"):
            refused = llmos(home, "down", "--timeout", bad)
            assert refused.returncode == 1 and f"--timeout wants seconds in (0, 86400], got {bad}" in refused.stderr
    finally:
        stop(up)
