"""The host's view of a process, as the kernel reads it to tell a hung
instance from a starved one: real processes in each state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from kernel.procstat import ProcSample, sample

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")

Start = Callable[[str], "subprocess.Popen[bytes]"]  # starts a child python running the code given


def _until(pid: int, ok: Callable[[ProcSample], bool], what: str) -> ProcSample:
    for _ in range(2000):  # a bound, not a pace: each wait is on the child's own progress
        s = sample(pid)
        assert s is not None, f"process {pid} is gone while waiting until it is {what}"
        if ok(s):
            return s
        os.sched_yield()
        subprocess.run(["true"], check=True)  # a few ms off the CPU, without sleep()
    raise AssertionError(f"process {pid} never became {what}: {sample(pid)}")


@pytest.fixture
def child() -> Iterator[Start]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(code: str) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen([sys.executable, "-c", code]))
        return procs[-1]

    yield start
    for p in procs:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()


def test_this_process_is_running_and_has_used_cpu() -> None:
    me = sample(os.getpid())
    assert me is not None and me.runnable and me.cpu_s > 0


def test_a_sleeping_child_is_not_runnable_and_a_stopped_one_says_so(child: Start) -> None:
    p = child("import time; time.sleep(600)")
    asleep = _until(p.pid, lambda s: s.state == "S", "asleep")
    assert not asleep.runnable
    p.send_signal(signal.SIGSTOP)
    assert _until(p.pid, lambda s: s.state == "T", "stopped").state == "T"


def test_a_spinning_child_is_runnable_and_its_cpu_time_grows(child: Start) -> None:
    p = child("while True: pass")
    first = _until(p.pid, lambda s: s.cpu_s > 0.05, "on the CPU")
    later = _until(p.pid, lambda s: s.cpu_s > first.cpu_s + 0.05, "using more CPU")
    assert later.runnable


def test_a_reaped_process_has_no_sample(child: Start) -> None:
    p = child("pass")
    p.wait()
    assert sample(p.pid) is None
