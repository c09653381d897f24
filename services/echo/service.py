"""The echo service: replies with what it was sent (tests, routing benchmark)."""

from __future__ import annotations

import anyio

from ipc.protocol.echo import Count, CountDone, Counted, Echo, EchoOnce, EchoReply, Identity, WhoAmI
from sdk.service import Context, Service, handler


class EchoService(Service):
    name = "echo"

    @handler(idempotent=True)
    async def echo(self, msg: Echo, ctx: Context) -> EchoReply:
        if msg.delay_s:
            await anyio.sleep(msg.delay_s)
        return EchoReply(msg.payload, self.instance, ctx.attempt)

    @handler
    async def echo_once(self, msg: EchoOnce, ctx: Context) -> EchoReply:
        if msg.delay_s:
            await anyio.sleep(msg.delay_s)
        return EchoReply(msg.payload, self.instance, ctx.attempt)

    @handler
    async def count(self, msg: Count, ctx: Context) -> CountDone:
        for i in range(msg.n):
            ctx.emit(Counted(i))
        return CountDone(msg.n)

    @handler(idempotent=True)
    async def whoami(self, msg: WhoAmI, ctx: Context) -> Identity:
        r = ctx.restrictions
        return Identity(ctx.principal, r.max_tokens, r.session)
