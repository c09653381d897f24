"""A channel's deferred reads are coalesced: sends while input is pending
schedule one read callback, not one each. (One each let a flood of malformed
frames queue thousands of kernel pumps ahead of its heartbeat timer, so the
services, hearing nothing, stopped; found by the chaos fuzzer.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import zmq

from ipc.sockets import Channel


@contextmanager
def socket_pair(name: str) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """A ROUTER and a DEALER (identity b"peer") connected over inproc://NAME."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"inproc://{name}")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.connect(f"inproc://{name}")
    try:
        yield router, dealer
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


async def test_sends_with_input_pending_schedule_one_read() -> None:
    with socket_pair("wakeups") as (router, dealer):
        reads = 0

        def on_readable() -> None:
            nonlocal reads
            reads += 1
            ch.drain()

        ch = Channel(router, on_readable=on_readable)
        try:
            dealer.send_multipart([b"", b"pending"])
            while not ch.pending_input():
                await asyncio.sleep(0.001)
            reads = 0
            for _ in range(1000):
                assert ch.send([b"peer", b"", b"answer"])
            for _ in range(3):
                await asyncio.sleep(0)
            assert reads == 1
            # Once it ran, input pending at a later send schedules the next one.
            dealer.send_multipart([b"", b"pending again"])
            while not ch.pending_input():
                await asyncio.sleep(0.001)
            ch.send([b"peer", b"", b"answer"])
            for _ in range(3):
                await asyncio.sleep(0)
            assert reads == 2
        finally:
            ch.close()


async def test_a_reader_that_reschedules_itself_is_not_rearmed_by_the_channel() -> None:
    with socket_pair("self-rescheduling") as (router, dealer):
        reads = 0

        def on_readable() -> None:  # reads one message a call, leaves the rest
            nonlocal reads
            reads += 1
            ch.drain(limit=1)

        ch = Channel(router, on_readable=on_readable, reader_reschedules=True)
        try:
            for i in range(5):
                dealer.send_multipart([b"", b"%d" % i])
            while not ch.pending_input():
                await asyncio.sleep(0.001)
            reads = 0
            ch.send([b"peer", b"", b"answer"])  # input pending: one deferred read
            for _ in range(10):
                await asyncio.sleep(0)
            assert reads == 1 and ch.pending_input()  # what is left is the reader's to schedule
        finally:
            ch.close()


async def test_the_kernel_continues_a_flood_with_one_pump_per_turn(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every wake-up (a socket readable, a send with input pending, the
    continuation) used to run a pump and schedule its own continuation, so
    under a flood the pumps per turn of the loop grew without bound and the
    heartbeat timer fell behind. Now one slice of work runs per turn."""
    import anyio

    import kernel.pump as pump_mod
    from kernel.config import KernelConfig
    from kernel.router import Kernel

    monkeypatch.setattr(pump_mod, "_PUMP_SLICE_S", 0.0)  # every slice ends after one round
    monkeypatch.setattr(pump_mod, "_PUMP_ROUNDS", 1)
    from ipc.sockets import SocketLimits

    # The whole flood queued in the kernel's socket at once (the default front
    # queue is short and would push back on the flooder, which sends blocking).
    config = KernelConfig(auth=False, front_limits=SocketLimits(recv_hwm=100_000))
    k = Kernel(config, f"ipc://{tmp_path}/front", f"ipc://{tmp_path}/back", "secret")
    slices: list[int] = [0]
    run = pump_mod.Pump.run

    def counting_run(pump: pump_mod.Pump) -> None:
        if not pump.continues:
            slices[-1] += 1
        run(pump)

    monkeypatch.setattr(pump_mod.Pump, "run", counting_run)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    flooder = ctx.socket(zmq.DEALER)
    flooder.setsockopt(zmq.SNDHWM, 100_000)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(k.serve)
            flooder.connect(f"ipc://{tmp_path}/front")
            for _ in range(20_000):
                flooder.send_multipart([b"", b"\x93\x01\x01", b"x"])  # truncated headers
            answered = 0
            while answered < 20_000:
                slices.append(0)
                await asyncio.sleep(0)  # one turn of the loop
                while flooder.poll(0):
                    flooder.recv_multipart()
                    answered += 1
            tg.cancel_scope.cancel()
    finally:
        flooder.close(0)
        ctx.term()
    assert k.router.counters.rejected == 20_000
    assert max(slices) <= 3, f"pump slices per turn grew to {max(slices)}"


async def test_more_than_a_batch_arriving_at_once_is_all_read() -> None:
    """One FD wake-up for 600 messages: the reader drains a batch (512) per
    call, and the channel comes back for the rest by itself (the edge that
    woke it will not fire again for what is already queued)."""
    import anyio

    with socket_pair("batch") as (router, dealer):
        got: list[list[zmq.Frame]] = []
        ch = Channel(dealer, on_readable=lambda: got.extend(ch.drain()))
        try:
            dealer.send_multipart([b"", b"hello"])
            ident, _, _ = router.recv_multipart()
            for i in range(600):
                router.send_multipart([ident, b"", b"%d" % i])
            with anyio.fail_after(10):
                while len(got) < 600:
                    await asyncio.sleep(0.01)
            assert [bytes(m[1]) for m in got] == [b"%d" % i for i in range(600)]
        finally:
            ch.close()
