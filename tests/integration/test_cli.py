"""`llmos up / ps / kill / down`, `llmos jobs …` and `llmos sessions …` as a user types them."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kernel.config import ChildSpec, Config
from tools.testing import REPO_ROOT, leftover_sockets, write_config
from tests.helpers.cli import LLMOS, llmos, wait_ps

@contextmanager
def llmos_up(home: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`llmos up ARGS` in the background (its output in HOME/up.log). The body
    ends with `llmos down`, which returns once the kernel has exited; if it
    did not, the process is killed. No socket may be left behind either way."""
    with open(home / "up.log", "wb") as log:
        up = subprocess.Popen([*LLMOS, "--home", str(home), "up", "--quiet", *args], cwd=REPO_ROOT,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=log, stderr=log)
        try:
            yield up
            assert llmos(home, "down").returncode == 0
            assert up.poll() == 0  # `down` returns once the kernel has exited
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    assert leftover_sockets(home) == []


def test_up_ps_kill_down(home: Path) -> None:
    # security and echo only: the default set would boot the demo model too
    cfg = write_config(home / "llmos.toml", Config(children=[ChildSpec("security", "services.security"),
                                                             ChildSpec("echo", "services.echo")]))
    with llmos_up(home, "--config", str(cfg)) as up:
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


def test_ps_without_a_running_llmos_says_so(home: Path) -> None:
    out = llmos(home, "ps")
    assert out.returncode == 1 and "no llmos kernel is running" in out.stderr


def poll(fn: Callable[[], Any], pred: Callable[[Any], bool], what: str, timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while not pred(value := fn()):
        assert time.monotonic() < end, f"timed out waiting for {what}; last: {value}"
        time.sleep(0.1)
    return value


def as_json(out: subprocess.CompletedProcess[str]) -> Any:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def served() -> Iterator[Path]:
    """One `llmos up` (the defaults: auth on, the demo model, a small swap tier)
    shared by the jobs and sessions tests."""
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    with llmos_up(home, "--swap-mb", "8"):
        wait_ps(home, lambda s: any(i["service"] == "scheduler" for i in s["instances"])
                and all(i["state"] == "ready" for i in s["instances"]), "the scheduler ready")
        yield home
    if not os.environ.get("LLMOS_KEEP_TEST_HOME"):
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_jobs_submit_list_show_cancel(served: Path) -> None:
    job = as_json(llmos(served, "jobs", "submit", "Hello", "--every", "0.5", "--max-tokens", "3",
                        "--temperature", "0", "--id", "tick", "--json"))
    assert job["job_id"] == "tick" and job["every_s"] == 0.5 and job["state"] in ("scheduled", "running")
    later = llmos(served, "jobs", "submit", "Later", "--at", "2099-01-31T09:00:00")
    assert later.returncode == 0 and "once" in later.stdout and "next run 2099-01-31 09:00:00" in later.stdout
    later_id = later.stdout.split()[0]

    info = poll(lambda: as_json(llmos(served, "jobs", "show", "tick", "--json")),
                lambda j: len(j["results"]) >= 2, "two runs of the job")
    assert [r["run"] for r in info["results"]] == list(range(1, len(info["results"]) + 1))
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 3 for r in info["results"])
    shown = llmos(served, "jobs", "show", "tick", "--last", "2")
    assert shown.returncode == 0 and shown.stdout.count("\nrun ") == 2 and "every 0.5s" in shown.stdout

    table = llmos(served, "jobs", "list")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "SCHEDULE", "RUNS", "NEXT", "RUN", "LAST", "RESULT"]
    assert any(line.startswith("tick ") and "every 0.5s" in line for line in lines)
    assert any(line.startswith(later_id) and "scheduled" in line and "2099-01-31 09:00:00" in line
               for line in lines)

    cancelled = llmos(served, "jobs", "cancel", "tick")
    assert cancelled.returncode == 0 and "cancel" in cancelled.stdout  # "cancelling" while a run ends
    poll(lambda: as_json(llmos(served, "jobs", "show", "tick", "--json")), lambda j: j["state"] == "cancelled",
         "the job cancelled")
    listed = {j["job_id"]: j for j in as_json(llmos(served, "jobs", "list", "--json"))}
    assert listed["tick"]["state"] == "cancelled" and listed[later_id]["state"] == "scheduled"

    for args in (("show", "nope"), ("cancel", "nope")):
        bad = llmos(served, "jobs", *args)
        assert bad.returncode == 1 and "no job 'nope'" in bad.stderr
    bad = llmos(served, "jobs", "submit", "x", "--at", "tomorrow")
    assert bad.returncode == 1 and "--at" in bad.stderr and "'tomorrow'" in bad.stderr
    assert llmos(served, "jobs", "submit").returncode == 2  # no prompt: argparse's usage error


def test_sessions_show_suspend_resume_close(served: Path) -> None:
    gen = llmos(served, "generate", "Hi there", "--session", "chat", "--max-tokens", "4", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr

    def show() -> Any:
        return as_json(llmos(served, "sessions", "show", "chat", "--json"))["info"]

    # the turn ended, and its pin holds the whole history's KV (the last token's by its epilogue)
    idle = poll(show, lambda s: s["state"] == "idle" and s["kv_tokens"] == s["history_tokens"], "the turn to end")
    assert idle["kv_where"] == "device" and idle["kv_tokens"] > 0  # kept for the next turn
    table = llmos(served, "sessions", "show", "chat")
    assert table.returncode == 0 and "on the device" in table.stdout

    suspended = llmos(served, "sessions", "suspend", "chat")
    assert suspended.returncode == 0 and "suspended" in suspended.stdout
    swapped = poll(show, lambda s: s["kv_where"] == "swap", "its KV in the swap tier")
    assert swapped["state"] == "suspended" and swapped["kv_tokens"] == idle["kv_tokens"]

    resumed = as_json(llmos(served, "sessions", "resume", "chat", "--json"))
    assert resumed["state"] in ("active", "idle")
    back = poll(show, lambda s: s["kv_where"] == "device", "its KV back on the device")
    assert back["state"] == "idle" and back["kv_tokens"] == idle["kv_tokens"]
    closed = llmos(served, "sessions", "close", "chat")
    assert closed.returncode == 0 and "none held" in closed.stdout

    for name in ("chat", "ghost"):  # closed and idle: forgotten; never existed
        bad = llmos(served, "sessions", "show", name)
        assert bad.returncode == 1 and f"no session {name!r}" in bad.stderr


def test_a_three_turn_conversation_from_the_command_line_sends_only_the_new_text(served: Path) -> None:
    total = 0  # tokens of the conversation so far
    for text in ("Hi there.", " How are you?", " Tell me more."):
        out = llmos(served, "generate", text, "--session", "talk", "--max-tokens", "5", "--temperature", "0",
                    "--json")
        assert out.returncode == 0, out.stderr
        u = as_json(out)["usage"]
        assert u["history_tokens"] == total and u["prompt_tokens"] > total
        assert u["cached_tokens"] == total  # the history's KV, its last token's too (the turn's epilogue)
        total = u["prompt_tokens"] + u["completion_tokens"]
    shown = as_json(llmos(served, "sessions", "show", "talk", "--json"))
    assert [t["turn"] for t in shown["turns"]] == [1, 2, 3] and shown["info"]["history_tokens"] == total
    assert shown["turns"][1]["prompt_text"] == " How are you?"
    table = llmos(served, "sessions", "show", "talk")
    assert table.returncode == 0 and "turn 3" in table.stdout and "> How are you?" in table.stdout.replace("  ", " ")
    listed = as_json(llmos(served, "sessions", "list", "--json"))
    assert {s["session"]: s["turns"] for s in listed["sessions"]}["talk"] == 3
    assert llmos(served, "sessions", "close", "talk").returncode == 0
    assert llmos(served, "sessions", "show", "talk").returncode == 1
