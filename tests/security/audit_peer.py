"""A registered service for the audit tests (`python -m tests.security.audit_peer`):
on `Echo(b"admin")` it acts as an admin from the back socket (a CreateKey, a
ListKeys), on `Echo(b"note")` it publishes an `AuditNote`, the way the
scheduler reports a caveat refusal."""

from __future__ import annotations

from ipc.protocol import security as sp
from ipc.protocol.echo import Echo, EchoReply
from sdk.service import Context, Service, handler


class AuditPeer(Service):
    name = "auditpeer"

    @handler
    async def echo(self, msg: Echo, ctx: Context) -> EchoReply:
        if msg.payload == b"admin":
            made: sp.KeyCreated = await self.call(sp.SECURITY, sp.CreateKey("peer-made", ["echo"]), timeout=10)
            await self.call(sp.SECURITY, sp.ListKeys(), timeout=10)
            return EchoReply(made.key_id.encode(), self.instance)
        if msg.payload == b"note":
            self.publish(sp.AUDIT_TOPIC, sp.AuditNote("bob", "caveat", "scheduler:Submit", "forbidden",
                                                      origin=self.instance,
                                                      detail={"reason": "max_tokens 900 > token's 16" + "x" * 5000}))
        return EchoReply(msg.payload, self.instance)


if __name__ == "__main__":
    AuditPeer.main()
