"""`llmos up / ps / kill / down` as a user types them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kernel.config import ChildSpec, Config
from sdk.testing import REPO_ROOT, leftover_sockets, write_config

LLMOS = [sys.executable, "-m", "tools.cli"]


def llmos(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LLMOS, "--home", str(home), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def ps(home: Path) -> dict:  # type: ignore[type-arg]
    out = llmos(home, "ps", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_ps(home: Path, pred, what: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    end = time.monotonic() + 60
    while True:
        try:
            snap = ps(home)
            if pred(snap):
                return snap
        except AssertionError:
            pass
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_up_ps_kill_down(home: Path) -> None:
    # security and echo only: the default set would boot the demo model too
    cfg = write_config(home / "llmos.toml", Config(children=[ChildSpec("security", "services.security"),
                                                             ChildSpec("echo", "services.echo")]))
    up = subprocess.Popen([*LLMOS, "--home", str(home), "up", "--quiet", "--config", str(cfg)], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The default config runs with auth on: `ps` works once the security server has
        # written admin.key (the local operator's key), which the CLI then uses.
        snap = wait_ps(home, lambda s: all(i["state"] == "ready" for i in s["instances"]), "all ready")
        echo = next(i for i in snap["instances"] if i["service"] == "echo")
        assert snap["kernel"]["pid"] == up.pid and echo["restarts"] == 0 and echo["pid"] > 0

        table = llmos(home, "ps")
        assert table.returncode == 0
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["SERVICE", "INSTANCE", "PID", "STATE", "RESTARTS", "UPTIME", "LAST", "EXIT"]
        assert any(line.startswith("kernel") for line in lines) and any(line.startswith("echo") for line in lines)

        killed = llmos(home, "kill", "echo")
        assert killed.returncode == 0 and "SIGKILL to echo" in killed.stdout
        snap = wait_ps(home, lambda s: any(i["restarts"] == 1 and i["state"] == "ready" for i in s["instances"]),
                       "echo restarted")
        again = next(i for i in snap["instances"] if i["service"] == "echo")
        assert again["pid"] != echo["pid"] and again["last_exit"] == "killed by SIGKILL"

        bad = llmos(home, "kill", "nope")
        assert bad.returncode == 1 and "no supervised service or instance named 'nope'" in bad.stderr

        down = llmos(home, "down")
        assert down.returncode == 0
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert leftover_sockets(home) == []


def test_ps_without_a_running_llmos_says_so(home: Path) -> None:
    out = llmos(home, "ps")
    assert out.returncode == 1 and "no llmos kernel is running" in out.stderr
