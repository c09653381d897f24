"""A channel's deferred reads are coalesced: sends while input is pending
schedule one read callback, not one each. (One each let a flood of malformed
frames queue thousands of kernel pumps ahead of its heartbeat timer, so the
services, hearing nothing, stopped; found by the chaos fuzzer.)"""

from __future__ import annotations

import asyncio

import zmq

from ipc.sockets import Channel


async def test_sends_with_input_pending_schedule_one_read() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://wakeups")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.connect("inproc://wakeups")
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
        dealer.close(0)
        ctx.term()
