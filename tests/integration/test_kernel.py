"""The kernel, supervisor and SDK over real processes and real ZeroMQ sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from ipc.errors import DeadlineExceeded, NotFound, Unavailable
from ipc.protocol import kernel as kp
from ipc.protocol.echo import Count, CountDone, Counted, Echo, EchoOnce, EchoReply
from kernel.config import ChildSpec, Config, KernelConfig, SupervisorConfig
from sdk.client import AsyncClient
from tools.testing import REPO_ROOT, leftover_sockets, running_llmos, write_config
from tests.helpers.procs import pid_alive


async def test_replies_reach_the_right_client_among_many(home: Path) -> None:
    async with running_llmos(home, [ChildSpec("echo", "services.echo", instances=2)]) as llmos:
        seen_instances: set[str] = set()

        async def one_client(k: int) -> None:
            async with await AsyncClient.connect(home=home) as c:
                async def one(i: int) -> None:
                    payload = f"client{k}-req{i}".encode()
                    reply = await c.call("echo", Echo(payload, delay_s=0.01 * (i % 3)))
                    assert isinstance(reply, EchoReply) and reply.payload == payload
                    seen_instances.add(reply.instance)
                async with anyio.create_task_group() as tg:
                    for i in range(40):
                        tg.start_soon(one, i)

        async with anyio.create_task_group() as tg:
            for k in range(6):
                tg.start_soon(one_client, k)
        # least-outstanding routing spreads concurrent work over both instances
        assert seen_instances == {"echo-0", "echo-1"}
        st = await llmos.status()
        assert st.counters.replies >= 240


async def test_streamed_events_arrive_in_order_then_the_reply(home: Path) -> None:
    async with running_llmos(home) as llmos:
        got = [m async for m in llmos.client.stream("echo", Count(200))]
        assert got[:-1] == [Counted(i) for i in range(200)]
        assert got[-1] == CountDone(200)


async def test_idempotent_request_is_resent_after_sigkill(home: Path) -> None:
    async with running_llmos(home) as llmos:
        old_pid = llmos.instance(await llmos.status(), "echo").pid
        async with anyio.create_task_group() as tg:
            result: list[EchoReply] = []

            async def slow() -> None:
                result.append(await llmos.client.call("echo", Echo(b"survives", delay_s=1.5), timeout=30))
            tg.start_soon(slow)
            await llmos.wait_for(lambda st: llmos.instance(st, "echo").outstanding == 1, what="request in flight")
            os.kill(old_pid, signal.SIGKILL)
        assert result[0].payload == b"survives" and result[0].attempt == 1
        st = await llmos.status()
        assert st.counters.resent == 1
        info = llmos.instance(st, "echo")
        assert info.restarts == 1 and info.pid != old_pid and info.last_exit == "killed by SIGKILL"


async def test_non_idempotent_request_fails_unavailable_when_its_instance_dies(home: Path) -> None:
    async with running_llmos(home) as llmos:
        errors: list[Exception] = []

        async def once() -> None:
            try:
                await llmos.client.call("echo", EchoOnce(b"x", delay_s=2.0), timeout=30)
            except Unavailable as exc:
                errors.append(exc)
        async with anyio.create_task_group() as tg:
            tg.start_soon(once)
            await llmos.wait_for(lambda st: llmos.instance(st, "echo").outstanding == 1, what="request in flight")
            await llmos.client.kill("echo")
        assert len(errors) == 1 and "echo died while handling EchoOnce (killed by SIGKILL)" in str(errors[0])
        # and the service is back for the next request
        assert (await llmos.client.call("echo", EchoOnce(b"y"), timeout=30)).payload == b"y"


async def test_requests_wait_while_a_service_is_down(home: Path) -> None:
    sup = SupervisorConfig(backoff_initial_s=0.5, backoff_max_s=0.5)
    async with running_llmos(home, supervisor=sup) as llmos:
        await llmos.client.kill("echo")
        await llmos.wait_for(lambda st: llmos.instance(st, "echo").state == "backoff", what="echo down")
        replies = [await llmos.client.call("echo", Echo(b"queued"), timeout=30) for _ in range(1)]
        assert replies[0].payload == b"queued"
        st = await llmos.status()
        assert st.counters.queued >= 1 and llmos.instance(st, "echo").restarts == 1


async def test_a_hung_service_is_detected_by_missed_heartbeats_and_replaced(home: Path) -> None:
    async with running_llmos(home) as llmos:
        events = llmos.client.subscribe(kp.SERVICES_TOPIC)
        assert isinstance(await events.__anext__(), kp.Subscribed)
        pid = llmos.instance(await llmos.status(), "echo").pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(20):
                down = await events.__anext__()
                up = await events.__anext__()
        finally:
            await events.aclose()
        assert down == kp.ServiceDown("echo", "echo", "missed heartbeats")
        assert isinstance(up, kp.ServiceUp) and up.pid != pid
        assert not pid_alive(pid)  # the hung process was killed, not left behind
        assert (await llmos.client.call("echo", Echo(b"back"))).payload == b"back"


async def test_restart_intensity_escalation_stops_everything_and_exits_nonzero(home: Path) -> None:
    children = [ChildSpec("echo", "services.echo"),
                ChildSpec("crashy", "tests.helpers.crash", intensity=2, period_s=60)]
    # The kernel alone, not through running_llmos: it may escalate and exit
    # before a client could connect (the harness then saw a dead kernel).
    cfg = write_config(home / "llmos.toml", Config(kernel=KernelConfig(auth=False), children=children))
    with open(home / "kernel.stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kernel", "--home", str(home), "--config", str(cfg)],
                                cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                stdout=err, stderr=err)
        try:
            rc = await anyio.to_thread.run_sync(proc.wait, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc == 1
    log = (home / "kernel.stderr").read_text()
    assert "crashy restarted more than 2 times in 60s (last: exit 3)" in log
    assert leftover_sockets(home) == []


async def test_clean_shutdown_leaves_no_process_or_socket(home: Path) -> None:
    async with running_llmos(home, [ChildSpec("echo", "services.echo", instances=2)]) as llmos:
        pids = [i.pid for i in (await llmos.status()).instances]
        assert len(pids) == 2
    assert llmos.kernel.returncode == 0
    assert [p for p in pids if pid_alive(p)] == []
    assert leftover_sockets(home) == []
    assert not (home / "run" / "kernel.pid").exists()


async def test_unknown_service_is_not_found_and_deadlines_are_enforced(home: Path) -> None:
    async with running_llmos(home) as llmos:
        with pytest.raises(NotFound, match="no service named 'nope'"):
            await llmos.client.call("nope", Echo(b""))
        with pytest.raises(DeadlineExceeded):
            await llmos.client.call("echo", Echo(b"slow", delay_s=5), timeout=0.3)
        assert (await llmos.client.call("echo", Echo(b"ok"))).payload == b"ok"


async def test_connecting_without_a_kernel_is_a_clear_error(home: Path) -> None:
    with pytest.raises(Unavailable, match="no llmos kernel is running"):
        await AsyncClient.connect(home=home)


async def test_requests_of_a_client_that_dies_are_cancelled_at_the_service(home: Path) -> None:
    import subprocess
    import sys

    from tools.testing import REPO_ROOT

    async with running_llmos(home) as llmos:
        code = ("import sys; from sdk.client import Client; from ipc.protocol.echo import Echo; "
                f"c = Client.connect(home={str(home)!r}); c.call('echo', Echo(b'x', delay_s=60))")
        victim = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT)
        try:
            await llmos.wait_for(lambda st: llmos.instance(st, "echo").outstanding == 1, what="request in flight")
            victim.kill()
            victim.wait()
            # silent past the heartbeat expiry: the kernel cancels its request at the service
            st = await llmos.wait_for(lambda st: st.counters.cancelled == 1, what="cancellation")
            assert llmos.instance(st, "echo").outstanding == 0
        finally:
            if victim.poll() is None:
                victim.kill()
        # a client that closes its connection cancels at once, and others are untouched
        other = await AsyncClient.connect(home=home)
        async with anyio.create_task_group() as tg:
            tg.start_soon(other.call, "echo", Echo(b"abandoned", delay_s=60))
            await llmos.wait_for(lambda st: llmos.instance(st, "echo").outstanding == 1, what="second in flight")
            tg.cancel_scope.cancel()
        await other.aclose()
        st = await llmos.wait_for(lambda st: st.counters.cancelled == 2, what="second cancellation")
        assert (await llmos.client.call("echo", Echo(b"alive"))).payload == b"alive"


async def test_requests_to_a_dead_instance_fail_while_the_service_waits(home: Path) -> None:
    sup = SupervisorConfig(backoff_initial_s=1.0, backoff_max_s=1.0)
    async with running_llmos(home, [ChildSpec("echo", "services.echo", instances=2)], supervisor=sup) as llmos:
        await llmos.client.kill("echo-0")
        await llmos.wait_for(lambda st: llmos.instance(st, "echo-0").state == "backoff", what="echo-0 down")
        # addressed to the instance: it is a new incarnation when it returns, so fail now
        with pytest.raises(Unavailable, match="instance 'echo-0' is not running"):
            await llmos.client.call("echo-0", Echo(b"x"), timeout=10)
        # addressed to the service: served by the live instance
        assert (await llmos.client.call("echo", Echo(b"y"), timeout=10)).instance == "echo-1"
