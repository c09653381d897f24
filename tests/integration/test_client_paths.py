"""A client's paths to a remote llmos (issue 13 #7-#10), over one kernel with
auth on and its front on tcp:// (CURVE): a generation across token expiries,
a stream abandoned early, a revoked key at Login, a refused CURVE key, and
the CLI driven with --endpoint / --api-key / LLMOS_API_KEY."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import zmq.auth

from common import capability as cap
from common.curvekeys import curve_dir
from ipc.errors import LlmosError, Unauthorized
from common.home import admin_key_path
from ipc.protocol import kernel as kp
from ipc.protocol import security as sp
from kernel.config import Config, KernelConfig
from sdk.client import AsyncClient, Client
from tools.testing import REPO_ROOT, write_config
from tests.helpers.net import free_port
from tests.helpers.stacks import secured_children

LLMOS = [sys.executable, "-m", "tools.cli"]
# What a terminal would act on: C0 controls but newline and tab, DEL, C1 controls.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class Served:
    def __init__(self, home: Path, endpoint: str):
        self.home = home
        self.endpoint = endpoint

    async def client(self, api_key: str | None = None, ttl_s: int = 0) -> AsyncClient:
        return await AsyncClient.connect(self.endpoint, home=self.home, api_key=api_key, token_ttl_s=ttl_s)

    async def new_key(self, tenant: str, rights: list[str]) -> sp.KeyCreated:
        async with await self.client() as admin:
            made: sp.KeyCreated = await admin.call(sp.SECURITY, sp.CreateKey(tenant, rights))
        return made

    def cli(self, *args: str, env: dict[str, str] | None = None,
            home: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LLMOS, "--home", str(home or self.home), *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[Served]:
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    children = secured_children(checkpoint)
    cfg = write_config(home / "llmos.toml", Config(kernel=KernelConfig(front=endpoint, auth=True), children=children))
    log = open(home / "kernel.stderr", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "kernel", "--home", str(home), "--config", str(cfg)],
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=log, stderr=log)
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (home / "kernel.stderr").read_text()[-3000:]
            assert time.monotonic() < end, "llmos never became ready"
            if admin_key_path(home).exists() and (curve_dir(home) / "local.key_secret").exists():
                try:
                    with Client.connect(endpoint, home=home, timeout=2) as c:
                        st = c.status()
                    if len(st.instances) == 4 and all(i.state == "ready" for i in st.instances):
                        break
                except LlmosError:
                    pass
            time.sleep(0.1)
        yield Served(home, endpoint)
        with Client.connect(endpoint, home=home) as c:
            c.shutdown("test done")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if not os.environ.get("LLMOS_KEEP_TEST_HOME"):
            shutil.rmtree(home, ignore_errors=True)


# #9: one request path, through the token refresh

async def test_a_client_that_only_generates_keeps_working_across_token_expiries(served: Served) -> None:
    """A 2 s token: before, the first generate after it expired was
    `Unauthorized` (generate skipped the refresh that call does)."""
    made = await served.new_key("gen-only", ["generate"])
    async with await served.client(made.api_key, ttl_s=2) as c:
        first = cap.inspect(c.connection.token)
        tokens = {first.token_id}
        done = 0
        with anyio.fail_after(60):
            # Until the clock is past two lifetimes of the first token, nothing but generations.
            while time.time() < first.expires_at + 2.5:
                if done % 2:
                    out = await c.generate("tick", max_tokens=2, temperature=0.0)
                    assert len(out.token_ids) == 2
                else:
                    async with c.stream_generate("tock", max_tokens=2, temperature=0.0) as s:
                        assert [ch.finish_reason async for ch in s][-1] is not None
                done += 1
                tokens.add(cap.inspect(c.connection.token).token_id)
        assert len(tokens) >= 2  # it logged in again, from the generation path alone


# #9: a stream abandoned early is cancelled

async def _wait_cancelled(c: AsyncClient, request_id: str) -> int:
    with anyio.fail_after(30):
        while (info := await c.request_status(request_id)).state != "finished":
            await anyio.sleep(0.05)
    assert info.finish_reason == "cancelled"
    return info.generated


async def test_a_stream_abandoned_after_three_tokens_is_cancelled(served: Served) -> None:
    made = await served.new_key("quitter", ["generate"])
    async with await served.client(made.api_key) as c:
        # the `async with` form
        seen = 0
        async with c.stream_generate("a long story", max_tokens=500, ignore_eos=True, request_id="left-1") as s:
            async for ch in s:
                seen += len(ch.token_ids)
                if seen >= 3:
                    break
        assert await _wait_cancelled(c, "left-1") < 500

        # `break`, then `aclose()` on the stream
        stream = c.stream_generate("another story", max_tokens=500, ignore_eos=True, request_id="left-2")
        seen = 0
        async for ch in stream:
            seen += len(ch.token_ids)
            if seen >= 3:
                break
        await stream.aclose()
        assert await _wait_cancelled(c, "left-2") < 500

        # a stream read to its end has nothing to cancel
        async with c.stream_generate("short", max_tokens=3, request_id="whole") as s:
            assert [ch.finish_reason async for ch in s][-1] == "length"
        assert (await c.request_status("whole")).finish_reason == "length"
    async with await served.client() as admin:
        assert (await admin.scheduler_stats()).running == 0  # nothing generates for a reader who left


def test_the_sync_client_offers_the_async_clients_methods(served: Served) -> None:
    with Client.connect(served.endpoint, home=served.home) as c:
        assert isinstance(c.call(kp.KERNEL, kp.Status()), kp.StatusReply)
        events = c.subscribe(kp.SERVICES_TOPIC)  # no sync twin had it
        assert next(events) == kp.Subscribed(kp.SERVICES_TOPIC)
        events.close()
        job = c.jobs.submit("a job", max_tokens=2, job_id="sync-job")
        assert c.jobs.get(job.job_id).job_id == "sync-job"
        c.generate("hello", max_tokens=2, session="sync-chat")
        assert c.sessions.get("sync-chat").session == "sync-chat"


def test_the_sync_client_cancels_a_stream_left_by_break(served: Served) -> None:
    with Client.connect(served.endpoint, home=served.home) as c:
        for n, _ in enumerate(c.stream_generate("sync story", max_tokens=500, ignore_eos=True, request_id="left-3")):
            if n >= 2:
                break  # the generator is closed here, which cancels the request
        end = time.monotonic() + 30
        while (info := c.request_status("left-3")).state != "finished":
            assert time.monotonic() < end, f"left-3 still {info.state}: never cancelled"
            time.sleep(0.05)
        assert info.finish_reason == "cancelled" and info.generated < 500


# #10: a revoked key says so, to its holder only

async def test_a_revoked_key_is_told_it_was_revoked_and_only_its_holder_is(served: Served) -> None:
    made = await served.new_key("gone", ["generate"])
    async with await served.client() as admin:
        await admin.call(sp.SECURITY, sp.Revoke(sp.RevokeKind.KEY, made.key_id))
    with pytest.raises(Unauthorized, match=f"API key {made.key_id} was revoked") as ei:
        await served.client(made.api_key)
    assert not ei.value.detail
    # the same key id with a wrong secret learns nothing, not even that the key exists
    with pytest.raises(Unauthorized) as ei:
        await served.client(f"llmos.{made.key_id}.not-the-secret")
    assert ei.value.message == "invalid API key" and not ei.value.detail

    tenant = await served.new_key("banned", ["generate"])
    async with await served.client() as admin:
        await admin.call(sp.SECURITY, sp.Revoke(sp.RevokeKind.PRINCIPAL, "banned"))
    with pytest.raises(Unauthorized, match=f"API key {tenant.key_id} belongs to a revoked tenant"):
        await served.client(tenant.api_key)


# #8: the CLI against a remote kernel

def remote_home(served: Served, authorised: bool) -> Path:
    """Another machine's LLMOS_HOME: the kernel's public key and a client
    keypair (the kernel's authorised local one, or a stranger's), nothing else."""
    other = Path(tempfile.mkdtemp(prefix="llmos-remote-", dir="/tmp"))
    d = curve_dir(other)
    d.mkdir(parents=True)
    shutil.copyfile(curve_dir(served.home) / "kernel.key", d / "kernel.key")
    if authorised:
        shutil.copyfile(curve_dir(served.home) / "local.key_secret", d / "local.key_secret")
    else:
        zmq.auth.create_certificates(d, "local")
    return other


def test_the_cli_talks_to_a_remote_kernel_with_an_api_key(served: Served) -> None:
    other = remote_home(served, authorised=True)
    try:
        admin_key = admin_key_path(served.home).read_text().strip()
        # no admin.key over there: without a key the kernel refuses, naming what is missing
        anon = served.cli("--endpoint", served.endpoint, "ps", home=other, env={"LLMOS_API_KEY": ""})
        assert anon.returncode == 1 and "capability token" in anon.stderr
        ps = served.cli("--endpoint", served.endpoint, "ps", "--json", home=other, env={"LLMOS_API_KEY": admin_key})
        assert ps.returncode == 0, ps.stderr
        assert {i["service"] for i in json.loads(ps.stdout)["instances"]} >= {"scheduler", "security"}
        top = served.cli("--endpoint", served.endpoint, "--api-key", admin_key, "top", "--once", home=other)
        assert top.returncode == 0 and "scheduler" in top.stdout, top.stderr
        keys = served.cli("--endpoint", served.endpoint, "--api-key", admin_key, "keys", "list", home=other)
        assert keys.returncode == 0 and keys.stdout.startswith("KEY"), keys.stderr
        jobs = served.cli("--endpoint", served.endpoint, "--api-key", admin_key, "jobs", "list", home=other)
        assert jobs.returncode == 0, jobs.stderr
        bad = served.cli("--endpoint", served.endpoint, "--api-key", "llmos.000000000000.nope", "ps", home=other)
        assert bad.returncode == 1 and "invalid API key" in bad.stderr
        local = served.cli("--endpoint", served.endpoint, "logs", home=other)
        assert local.returncode == 2 and "--endpoint does not apply to `llmos logs`" in local.stderr
        wrong = served.cli("--endpoint", "http://example.com", "ps", home=other)
        assert wrong.returncode == 1 and "want tcp://HOST:PORT or ipc://PATH" in wrong.stderr
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_a_client_key_the_kernel_does_not_authorise_is_told_so(served: Served) -> None:
    """Before: "the kernel at tcp://… stopped answering", after the liveness timeout."""
    other = remote_home(served, authorised=False)
    try:
        admin_key = admin_key_path(served.home).read_text().strip()
        out = served.cli("--endpoint", served.endpoint, "--api-key", admin_key, "ps", home=other)
        assert out.returncode == 1
        assert "refused: this client's key is not authorised" in out.stderr, out.stderr
        assert "stopped answering" not in out.stderr
    finally:
        shutil.rmtree(other, ignore_errors=True)


# #7: text a terminal can show

async def test_the_cli_shows_a_models_control_characters_escaped(served: Served) -> None:
    """A tiny random model writes any byte; before, the CLI wrote them raw."""
    async with await served.client() as c:
        for seed in range(40):
            out = await c.generate("x", max_tokens=48, temperature=1.0, seed=seed)
            if RAW_CONTROL.search(out.text):
                break
        else:
            pytest.skip("no control character in 40 samples of this checkpoint")
    for extra in ((), ("--stream",)):
        shown = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [*LLMOS, "--home", str(served.home), "--endpoint", served.endpoint, "generate", "x",
             "--max-tokens", "48", "--temperature", "1", "--seed", str(seed), *extra],
            cwd=REPO_ROOT, capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}))
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout.decode()
        assert not RAW_CONTROL.search(text), repr(text)
        control = RAW_CONTROL.search(out.text)
        assert control is not None
        c0 = control.group()
        assert (f"\\x{ord(c0):02x}" if c0 != "\r" else "\\r") in text
