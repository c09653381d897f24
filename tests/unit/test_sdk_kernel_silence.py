"""A client judges its kernel's silence on the time its own loop ran
(`ipc.heartbeat.Stalls`): a wake-up that came late is not the kernel's
silence, but a client late on every wake-up still finds a dead kernel."""

from __future__ import annotations

import time
from types import SimpleNamespace

import anyio
import pytest

from ipc.errors import Unavailable
from ipc.protocol.echo import Echo
from sdk import connection as connection_module
from sdk.connection import Connection
from tests.helpers.fake_kernel import FakeKernel


async def test_a_client_whose_wake_ups_are_always_late_still_finds_its_kernel_gone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel()  # takes the request and never answers, nor heartbeats
    conn = Connection(kernel.endpoint)
    skew = 0.0

    def late() -> float:
        nonlocal skew
        skew += 1.0  # every reading a second later than the last: this process is never run on time
        return time.monotonic() + skew

    monkeypatch.setattr(connection_module, "time", SimpleNamespace(monotonic=late, time_ns=time.time_ns))
    try:
        with anyio.fail_after(30), pytest.raises(Unavailable, match="stopped answering"):
            await conn.call("echo", Echo(b"anyone?"))
    finally:
        conn.close()
        kernel.close()
