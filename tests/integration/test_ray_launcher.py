"""The Ray launcher (kernel/ray_launcher.py) on a one-host Ray cluster: null
drivers placed by Ray on two simulated nodes generate what the local
launcher generates, and every request finishes exactly once, with the same
tokens, through a SIGKILLed driver, a SIGSTOPped (hung) one and a node lost
mid-generation; a remote peer with a replaced incarnation's or a forged boot
secret, or malformed frames, is refused and audited; over a tcp:// back
socket each remote child registers under the CURVE key handed to it. One
cluster for the module (it takes seconds to start)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
import zmq.auth

from common.curvekeys import curve_dir
from common.home import back_endpoint
from drivers.null import continuation
from ipc import codec
from ipc.envelope import PROTOCOL_VERSION, Header, Kind
from ipc.protocol import kernel as kp
from ipc.protocol.kernel import ChildState
from kernel.config import ChildSpec, KernelConfig
from ipc.protocol.scheduler import FinishReason
from sdk.client import AsyncClient
from tests.helpers.audit import wait_audit
from tests.helpers.net import free_port
from tests.helpers.ray_cluster import gone
from tests.helpers.raw_peer import RawPeer
from tests.helpers.stacks import null_children
from text.tokenizer import ByteTokenizer
from tools.raysim import HEAD_SHARE, launcher, null_children_on_nodes, placements, start_cluster
from tools.testing import RunningLlmos, running_llmos

pytest.importorskip("ray")
# The module's cluster starts within its first test's time (seconds to tens of seconds).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS = ["scale out", "on ray nodes", "two drivers", "one model", "every request", "exactly once"]
N = 160
DRIVER_ARGS = ("--step-ms", "10", "--block-size", "4")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    # Three driver nodes with room for one driver each: two drivers, and a spare
    # node for the one whose node is lost (a node cannot join from a thread).
    c = start_cluster(nodes=3)
    try:
        yield c
    finally:
        c.shutdown()


def expected() -> list[list[int]]:
    tok = ByteTokenizer()
    return [continuation(tok.encode(p), N) for p in PROMPTS]


async def generate_all(c: AsyncClient) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in PROMPTS]

    async def one(i: int) -> None:
        done = await c.generate(PROMPTS[i], max_tokens=N, **GREEDY)
        assert done.finish_reason == FinishReason.LENGTH
        out[i] = done.token_ids
    async with anyio.create_task_group() as tg:
        for i in range(len(PROMPTS)):
            tg.start_soon(one, i)
    return out


async def streams_through(llmos: RunningLlmos, fault: Any) -> list[list[int]]:
    """Stream every prompt; once each has tokens, run `fault()`; return what each stream held."""
    held: list[list[int]] = [[] for _ in PROMPTS]
    finals = [0] * len(PROMPTS)
    progressed = anyio.Event()

    async def run(i: int) -> None:
        async for ch in llmos.client.stream_generate(PROMPTS[i], max_tokens=N, **GREEDY):
            held[i].extend(ch.token_ids)
            if ch.finish_reason is not None:
                finals[i] += 1
            if all(len(h) >= 8 for h in held):
                progressed.set()
    async with anyio.create_task_group() as tg:
        for i in range(len(PROMPTS)):
            tg.start_soon(run, i)
        with anyio.fail_after(60):
            await progressed.wait()
        at_fault = [len(h) for h in held]
        await fault()
    assert all(k < N for k in at_fault), "the fault came after the requests ended"
    assert finals == [1] * len(PROMPTS), "a request did not finish exactly once"
    return held


def drivers(st: Any) -> dict[str, Any]:
    return {i.instance: i for i in st.instances if i.service == "driver"}


async def restarted(llmos: RunningLlmos, instance: str, old_pid: int, timeout: float = 120) -> int:
    st = await llmos.wait_for(lambda s: llmos.instance(s, instance).pid not in (0, old_pid)
                              and llmos.instance(s, instance).state == ChildState.READY, timeout,
                              f"{instance} restarted")
    return llmos.instance(st, instance).pid


async def test_two_nodes_generate_like_local_through_a_kill_and_a_hang(home: Path, cluster: Any) -> None:
    want = expected()
    async with running_llmos(home / "local", null_children(*DRIVER_ARGS)) as local:
        assert await generate_all(local.client) == want
    async with running_llmos(home / "ray", null_children_on_nodes(2, *DRIVER_ARGS), launcher=launcher(cluster),
                             ready_timeout=180) as llmos:
        assert await generate_all(llmos.client) == want
        pids = {name: i.pid for name, i in drivers(await llmos.status()).items()}
        where = await anyio.to_thread.run_sync(placements, llmos.home)
        # One driver on each simulated node, each a real process the chaos tester can signal.
        assert len({where[pid] for pid in pids.values()}) == 2
        assert {where[pid] for pid in pids.values()} <= {n.node_id for n in cluster.list_all_nodes()}

        async def sigkill() -> None:
            os.kill(pids["null-0"], signal.SIGKILL)
            await restarted(llmos, "null-0", pids["null-0"])
        assert await streams_through(llmos, sigkill) == want

        async def sigstop() -> None:  # a hang: only the kernel's heartbeats catch it
            os.kill(pids["null-1"], signal.SIGSTOP)
            await restarted(llmos, "null-1", pids["null-1"])
        assert await streams_through(llmos, sigstop) == want
        assert await anyio.to_thread.run_sync(gone, pids["null-1"])
        st = drivers(await llmos.status())
        assert st["null-0"].restarts == 1 and st["null-1"].restarts == 1


async def test_node_lost_mid_generation(home: Path, cluster: Any) -> None:
    want = expected()
    async with running_llmos(home, null_children_on_nodes(2, *DRIVER_ARGS), launcher=launcher(cluster),
                             ready_timeout=180) as llmos:
        pids = {name: i.pid for name, i in drivers(await llmos.status()).items()}
        where = await anyio.to_thread.run_sync(placements, llmos.home)
        node = next(n for n in cluster.list_all_nodes() if n.node_id == where[pids["null-1"]])

        async def lose_node() -> None:
            await anyio.to_thread.run_sync(lambda: cluster.remove_node(node, allow_graceful=False))
            await restarted(llmos, "null-1", pids["null-1"], timeout=180)
        assert await streams_through(llmos, lose_node) == want
        # Its process went with its node, and the restart landed on another one.
        assert await anyio.to_thread.run_sync(gone, pids["null-1"])
        new_pid = drivers(await llmos.status())["null-1"].pid
        where = await anyio.to_thread.run_sync(placements, llmos.home)
        assert where[new_pid] != node.node_id
        assert drivers(await llmos.status())["null-0"].pid == pids["null-0"]


async def test_a_child_no_node_can_take_is_refused_by_name(home: Path, cluster: Any) -> None:
    """A driver asking for a resource no node offers: each start fails after
    the placement timeout naming what it asked for, and past the child's
    intensity the kernel stops with that reason."""
    children = [ChildSpec("memory", "services.memory", resources=HEAD_SHARE),
                ChildSpec("null", "drivers", service="driver", args=["null"], intensity=1, period_s=600,
                          resources={"llmos_tpu_pod": 1})]
    # Long enough for a Ray worker to start on a loaded machine (memory's must).
    cfg = msgspec.structs.replace(launcher(cluster), placement_timeout_s=10.0)
    async with running_llmos(home, children, launcher=cfg, expect_exit=True, ready_timeout=180) as llmos:
        rc = await anyio.to_thread.run_sync(lambda: llmos.kernel.wait(120))
    assert rc == 1
    err = (home / "kernel.stderr").read_text()
    assert "null restarted more than 1 times" in err
    assert "Ray placed no actor for null within 10s" in err and "llmos_tpu_pod" in err


def environ_of(pid: int) -> dict[bytes, bytes]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def boot_secret_of(pid: int) -> str:
    return environ_of(pid)[b"LLMOS_BOOT_SECRET"].decode()


def attack(endpoint: str, name: str, stale: str) -> list[tuple[str, str]]:
    """From a peer of our own on the back socket: a replaced incarnation's
    secret, a forged one, malformed frames and an unregistered request.
    The (code, message) of each refusal."""
    peer = RawPeer(endpoint)
    ready = Header(PROTOCOL_VERSION, Kind.READY)
    try:
        for secret in (stale, "forged-secret"):
            peer.send(ready, codec.encode(kp.Ready("driver", name, os.getpid(), secret, ["Step"])))
        peer.send(ready)                                     # READY without a body
        peer.send(ready, b"\xc1 not msgpack")                # a body that does not decode
        peer.send_raw([b"", b"\x93\xff garbage header"])     # a header that does not decode
        peer.send(Header(PROTOCOL_VERSION, Kind.REQUEST, dst="memory", op="MemoryStats"), b"\x80")
        return [(err.code, err.message) for _, err in (peer.recv() for _ in range(6))]
    finally:
        peer.close()


async def test_an_unauthorised_or_malformed_remote_peer_is_refused_and_audited(home: Path, cluster: Any) -> None:
    children = [ChildSpec("security", "services.security", resources=HEAD_SHARE),
                *null_children_on_nodes(1, *DRIVER_ARGS)]
    async with running_llmos(home, children, auth=True, launcher=launcher(cluster), ready_timeout=180) as llmos:
        name, old = next((n, i.pid) for n, i in drivers(await llmos.status()).items())
        stale = await anyio.to_thread.run_sync(boot_secret_of, old)
        os.kill(old, signal.SIGKILL)
        new = await restarted(llmos, name, old)
        refusals = await anyio.to_thread.run_sync(attack, back_endpoint(home), name, stale)
        codes = [code for code, _ in refusals]
        assert codes == ["unauthorized", "unauthorized", "bad_request", "bad_request", "bad_request",
                         "unauthorized"], refusals
        assert all("boot secret" in msg for _, msg in refusals[:2]) and "not registered" in refusals[5][1]
        # Each refusal is in the audit log, with the peer it came from.
        for code, msg in refusals:
            await wait_audit(home, lambda r, code=code, msg=msg: (  # type: ignore[misc]
                r["action"] == "access" and r["result"] == code and r["detail"].get("reason") == msg
                and str(r["detail"].get("source", "")).startswith("back:")), msg)
        # Nothing registered in the honest driver's place; honest requests still finish.
        st = llmos.instance(await llmos.status(), name)
        assert st.pid == new and st.state == ChildState.READY and st.restarts == 1
        assert await generate_all(llmos.client) == expected()


async def test_remote_children_register_over_curve_with_the_keys_handed_to_them(home: Path, cluster: Any) -> None:
    """A tcp:// back socket: each child placed by Ray gets a CURVE keypair of
    its own in its start call (not Ray's options) and registers under it;
    no child has the shared service keypair; a replacement gets a new one."""
    back = f"tcp://127.0.0.1:{free_port()}"
    async with running_llmos(home, null_children_on_nodes(1, *DRIVER_ARGS), launcher=launcher(cluster),
                             kernel=KernelConfig(back=back), ready_timeout=180) as llmos:
        keys = {i.instance: environ_of(i.pid).get(b"LLMOS_CURVE_PUBLIC") for i in (await llmos.status()).instances}
        assert all(keys.values()) and len(set(keys.values())) == len(keys), keys
        shared, _ = zmq.auth.load_certificate(curve_dir(home) / "service.key")
        assert shared not in keys.values()
        assert await generate_all(llmos.client) == expected()
        name, old = next((n, i.pid) for n, i in drivers(await llmos.status()).items())
        os.kill(old, signal.SIGKILL)
        new = await restarted(llmos, name, old)
        assert environ_of(new).get(b"LLMOS_CURVE_PUBLIC") not in (None, keys[name])
        assert await generate_all(llmos.client) == expected()
