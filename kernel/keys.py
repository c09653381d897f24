"""The kernel's side of the keys issued to each incarnation (ipc/curve.py
`KeyRing`): an instance the kernel issued keys to registers only under the
key its live incarnation was given, and what the ZAP handler refused (a
replaced incarnation's key, one never admitted) goes to the audit with the
key it came with."""

from __future__ import annotations

from common.logs import get_logger
from ipc.curve import KeyRing
from ipc.envelope import PROTOCOL_VERSION, Header, Kind
from ipc.errors import LlmosError, Unauthorized
from kernel.guard import Guard

log = get_logger()

HANDSHAKE = Header(PROTOCOL_VERSION, Kind.READY, dst="kernel", op="(CURVE handshake)")


def key_refusal(keyring: KeyRing | None, instance: str, key: str) -> LlmosError | None:
    """Why a READY for `instance` over a connection admitted under `key` is
    refused (None: it is not). Only on tcp:// (ipc:// has no keys) and only
    for the kernel's own children."""
    if keyring is None or not key or not keyring.manages(instance):
        return None
    if keyring.current(instance) != key:
        return Unauthorized(f"the CURVE key this peer connected with is not the one issued to the live "
                            f"incarnation of {instance}")
    return None


def audit_refusals(keyring: KeyRing | None, guard: Guard | None) -> None:
    """The ZAP handler's refusals since the last call: logged, and audited
    when auth is on (the guard queues them for the security server)."""
    if keyring is None:
        return
    for r in keyring.take_refusals():
        log.warning("kernel.curve_refused", domain=r.domain, key=r.key, reason=r.reason)
        if guard is not None:
            guard.note(HANDSHAKE, Unauthorized(r.reason), f"{r.domain}:curve:{r.key}")
