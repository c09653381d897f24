"""A client killed mid-generation: the kernel cancels its request at the
scheduler, which stops generating and frees the KV blocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ipc.protocol import memory as mp
from tools.testing import REPO_ROOT, running_llmos
from tests.helpers.stacks import children
from tests.helpers.model_fixtures import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    # a long context: the victim must still be generating when its silence is noticed (3 s)
    make_checkpoint(d, "llama", sharp=True, max_position_embeddings=4096)
    return d


async def test_killed_client_cancels_its_generation(home: Path, checkpoint: Path) -> None:
    async with running_llmos(home, children(checkpoint)) as llmos:
        c = llmos.client
        code = ("from sdk.client import Client; "
                f"c = Client.connect(home={str(home)!r}); "
                "c.generate('tell me a long story', max_tokens=3500, temperature=0.0, ignore_eos=True, "
                "request_id='victim')")
        victim = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT)
        try:
            async def running() -> bool:
                try:
                    return (await c.request_status("victim")).generated > 0
                except Exception:
                    return False
            await llmos.wait_for(lambda st: True, what="boot")
            import anyio
            with anyio.fail_after(60):
                while not await running():
                    await anyio.sleep(0.05)
            victim.kill()
            victim.wait()
            with anyio.fail_after(30):
                while (info := await c.request_status("victim")).state != "finished":
                    await anyio.sleep(0.05)
        finally:
            if victim.poll() is None:
                victim.kill()
        assert info.finish_reason == "cancelled" and info.generated < 3500
        stats = await c.call("memory", mp.MemoryStats())
        assert stats.pools[0].used == 0
        assert (await llmos.status()).counters.cancelled >= 1
