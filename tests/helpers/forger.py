"""A registered service that forges (the abuse test of batched events):
asked to `Count`, it emits, in one loop tick (one EVENTS frame), its own
`Counted` events interleaved with `TokenDelta`s for the routing ids around
its own: the kernel gives out routing ids in order, so those are the calls
other services serve right now."""

from __future__ import annotations

import msgspec

from ipc.protocol.echo import Count, CountDone, Counted
from ipc.protocol.scheduler import TokenDelta
from sdk.service import Context, Service, handler

FORGED_TOKEN = 999_999


class Forger(Service):
    name = "forger"

    @handler
    async def count(self, msg: Count, ctx: Context) -> CountDone:
        own = ctx.header.msg_id
        for i in range(msg.n):
            ctx.emit(Counted(i))
            for rid in range(max(1, own - 1024), own + 64):
                if rid != own:  # as ctx.emit would for that call, were it this service's
                    forged = msgspec.structs.replace(ctx.header, msg_id=rid)
                    self._emit(forged, TokenDelta("forged", 0, [FORGED_TOKEN]), ())
        return CountDone(msg.n)


if __name__ == "__main__":
    Forger.main()
