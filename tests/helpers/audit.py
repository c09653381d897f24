"""Reading the audit log from tests: its records, and waiting for one."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from ipc.protocol import security as sp
from services.security.audit import audit_path
from tools.testing import RunningLlmos


def audit_records(home: Path) -> list[dict[str, Any]]:
    path = audit_path(home)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


async def wait_audit(home: Path, pred: Callable[[dict[str, Any]], bool], what: str,
                     timeout: float = 20.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        for rec in audit_records(home):
            if pred(rec):
                return rec
        if time.monotonic() > end:
            raise TimeoutError(f"no audit record for {what}; last: {audit_records(home)[-3:]}")
        await anyio.sleep(0.05)


async def new_key(llmos: RunningLlmos, tenant: str, rights: list[str]) -> sp.KeyCreated:
    made: sp.KeyCreated = await llmos.client.call(sp.SECURITY, sp.CreateKey(tenant, rights))
    return made
