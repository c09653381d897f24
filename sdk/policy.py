"""Following the security server's quota policy from a service that enforces it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ipc.errors import LlmosError
from ipc.protocol import security as secp

if TYPE_CHECKING:
    from sdk.service import Service


async def follow_quotas(service: "Service", apply: Callable[[secp.QuotaPolicy], None]) -> None:
    """Call `apply` with the current policy and with every later one, in
    version order. Run it as a task: it returns only when the kernel goes.
    Without a security service (auth off) nothing is ever applied."""
    events = service.subscribe(secp.POLICY_TOPIC)
    await events.__anext__()  # Subscribed: no later change is missed
    seen = -1
    try:
        current = await service.call(secp.SECURITY, secp.GetQuotas(), timeout=30.0)
    except LlmosError:
        pass  # no security server (auth off) or it is restarting: its next publication will come
    else:
        seen = current.version
        apply(current)
    async for ev in events:
        if isinstance(ev, secp.QuotaPolicy) and ev.version > seen:
            seen = ev.version
            apply(ev)
