"""What an operator sees when the config is wrong or a child cannot start
(issue 13 #4 #5): `llmos up` refuses a bad value at once naming the file,
table and field; a failure restarting cannot fix is reported in one line and
not retried; a crash-looping optional child stops alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipc.protocol.echo import Echo
from kernel.config import ChildSpec, echo_child
from tools.testing import REPO_ROOT, leftover_sockets, running_llmos

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def llmos_up(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", "--home", str(home), "up", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.parametrize("text, names", [
    ("[scheduler.policy]\nname = 'lottery'\n", "[scheduler] policy.name: Invalid enum value 'lottery'"),
    ("[memory]\ndefault_tenant_blocks = 'many'\n", "[memory] default_tenant_blocks: Expected `int`"),
    ("[driver]\ndtype = 'int4'\n", "[driver] dtype must be one of"),
])
def test_a_bad_config_value_stops_llmos_up_before_anything_starts(tmp_path: Path, text: str, names: str) -> None:
    cfg = tmp_path / "llmos.toml"
    cfg.write_text(text)
    home = tmp_path / "home"
    out = llmos_up(home, "--config", str(cfg), timeout=30)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"config file {cfg}" in lines[0] and names in lines[0], out.stderr
    # nothing was started: no kernel socket, no child log
    assert not leftover_sockets(home)
    assert not (home / "logs" / "security.log").exists()


def test_a_bad_flag_is_refused_naming_the_setting(tmp_path: Path) -> None:
    out = llmos_up(tmp_path, "--kv-cache-mb", "-3", timeout=30)
    assert out.returncode != 0 and "llmos up flags: [driver] kv_cache_mb must be > 0" in out.stderr


@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="this machine has CUDA")
def test_drivers_cuda_without_cuda_fails_once_with_a_one_line_reason(tmp_path: Path) -> None:
    out = llmos_up(tmp_path, "--drivers", "cuda=1")
    assert out.returncode != 0
    reason = [line for line in out.stderr.splitlines() if "stopped:" in line]
    assert len(reason) == 1 and "cuda failed and will not be restarted" in reason[0] \
        and "CUDA is not available" in reason[0], out.stderr
    kernel_log = (tmp_path / "logs" / "kernel.log").read_text()
    started = [line for line in kernel_log.splitlines() if '"supervisor.started"' in line and '"cuda"' in line]
    assert len(started) == 1, "the cuda driver was retried"
    assert not leftover_sockets(tmp_path)


async def test_a_crash_looping_optional_child_stops_alone(tmp_path: Path) -> None:
    flaky = ChildSpec("flaky", "tests.helpers.crash", intensity=2, period_s=60.0, significant=False)
    async with running_llmos(tmp_path, children=[echo_child(), flaky], expect_exit=True) as llmos:
        st = await llmos.wait_for(lambda st: llmos.instance(st, "flaky").state == "failed", 60,
                                  "flaky given up")
        flaky_info = llmos.instance(st, "flaky")
        assert flaky_info.restarts == 2 and flaky_info.last_exit == "exit 3"
        # the rest keeps serving
        assert llmos.instance(st, "echo").state == "ready" and llmos.kernel.poll() is None
        reply = await llmos.client.call("echo", Echo(b"still here"))
        assert reply.payload == b"still here"
