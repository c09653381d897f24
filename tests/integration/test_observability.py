"""`llmos top --once` and `llmos logs --request` against a running system."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tools.testing import REPO_ROOT, running_llmos
from tests.helpers.stacks import children
from tests.helpers.model_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(d, "llama")
    return d


def llmos(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", "--home", str(home), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "160"})


async def test_top_and_logs_follow_a_request(home: Path, checkpoint: Path) -> None:
    async with running_llmos(home, children(checkpoint)) as sysm:
        done = await sysm.client.generate("Hello", max_tokens=5, temperature=0.0, request_id="trace-me-1")
        assert done.request_id == "trace-me-1"
        top = await anyio.to_thread.run_sync(llmos, home, "top", "--once")
        assert top.returncode == 0, top.stderr
        for needle in ("kernel", "scheduler", "memory", "KV cache", "TOKENS/S", "ROUTED"):
            assert needle in top.stdout
        out = await anyio.to_thread.run_sync(llmos, home, "logs", "--request", "trace-me-1", "--json")
        assert out.returncode == 0, out.stderr
        recs = [json.loads(line) for line in out.stdout.splitlines()]
        events = [r["event"] for r in recs]
        assert "scheduler.submitted" in events and "scheduler.finished" in events
        assert all("trace-me-1" in (r.get("request_id"), r.get("trace_id")) for r in recs)
        finished = next(r for r in recs if r["event"] == "scheduler.finished")
        assert finished["tokens"] == 5 and finished["trace_id"] == "trace-me-1"
        none = await anyio.to_thread.run_sync(llmos, home, "logs", "--request", "no-such-request")
        assert none.returncode == 1 and none.stdout == ""
