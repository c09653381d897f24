"""`llmos keys …` and `llmos audit …` as a user types them, against a kernel with auth on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from ipc.errors import Unauthorized
from ipc.protocol.echo import Echo
from sdk.client import AsyncClient
from tools.testing import running_llmos
from common.home import root_key_path
from services.security.audit import audit_path, head_path
from tests.helpers.cli import llmos


async def cli(home: Path, *args: str) -> tuple[int, str, str]:
    out = await anyio.to_thread.run_sync(lambda: llmos(home, *args))
    return out.returncode, out.stdout, out.stderr


async def test_keys_create_list_revoke_and_audit(home: Path) -> None:
    async with running_llmos(home, auth=True):
        rc, out, err = await cli(home, "keys", "create", "--tenant", "ivan", "--rights", "echo,generate",
                                 "--quota", "requests_per_min=30,kv_blocks=16", "--json")
        assert rc == 0, err
        made = json.loads(out)
        assert made["tenant"] == "ivan" and made["rights"] == ["echo", "generate"]
        c = await AsyncClient.connect(home=home, api_key=made["api_key"])
        assert (await c.call("echo", Echo(b"ok"))).payload == b"ok"

        rc, out, err = await cli(home, "keys", "list", "--json")
        listing = json.loads(out)
        assert rc == 0 and made["key_id"] in {k["key_id"] for k in listing["keys"]}
        quota = {p["name"]: p["quota"] for p in listing["principals"]}["ivan"]
        assert quota == {"requests_per_min": 30, "tokens_per_min": 0, "concurrent_requests": 0, "kv_blocks": 16}
        rc, out, _ = await cli(home, "keys", "list")
        assert rc == 0 and out.splitlines()[0].split() == ["KEY", "TENANT", "RIGHTS", "STATE", "NOTE"]
        assert any(line.startswith(made["key_id"]) and "active" in line for line in out.splitlines())

        rc, out, _ = await cli(home, "keys", "revoke", made["key_id"])
        assert rc == 0 and f"key {made['key_id']} revoked" in out
        with pytest.raises(Unauthorized, match=f"API key {made['key_id']} is revoked"):
            await c.call("echo", Echo(b"no"))
        await c.aclose()

        for args, fragment in [
            (("keys", "revoke", "ffffffffffff"), "no API key with id 'ffffffffffff'"),
            (("keys", "create", "--tenant", "x", "--rights", "echo,root"), "unknown rights ['root']"),
            (("keys", "create", "--tenant", "x", "--rights", "echo", "--quota", "rpm=3"), "bad quota item 'rpm=3'"),
            (("keys", "quota", "--tenant", "nobody", "--quota", "kv_blocks=3"), "no principal named 'nobody'"),
        ]:
            rc, _, err = await cli(home, *args)
            assert rc == 1 and fragment in err, (args, err)

        rc, out, _ = await cli(home, "audit", "tail", "-n", "50")
        assert rc == 0 and "key.create" in out and "revoke" in out
        rc, out, _ = await cli(home, "audit", "verify")
        assert rc == 0 and "chain intact" in out

    # with llmos stopped: tamper with the log in three ways
    path = audit_path(home)
    pristine = path.read_text().splitlines(keepends=True)
    assert len(pristine) >= 6

    edited = list(pristine)
    edited[2] = edited[2].replace('"result":"ok"', '"result":"denied"', 1)
    assert edited[2] != pristine[2]
    deleted = pristine[:3] + pristine[4:]
    reordered = pristine[:1] + [pristine[2], pristine[1]] + pristine[3:]
    truncated = pristine[:-2]
    for lines, fragment, check in [(edited, "line 3: record seq 2 fails its MAC", "mac"),
                                   (deleted, "line 4: record(s) missing: seq 3", "seq"),
                                   (reordered, "line 2: out of order", "seq"),
                                   (truncated, "records missing at the end", "head"),
                                   ([], "records missing at the end", "head")]:
        path.write_text("".join(lines))
        rc, out, err = await cli(home, "audit", "verify")
        assert rc == 1 and fragment in err and f"[check: {check}]" in err, err
        rc, out, _ = await cli(home, "audit", "verify", "--json")
        assert rc == 1 and json.loads(out)["ok"] is False and json.loads(out)["check"] == check
    path.write_text("".join(pristine))
    rc, _, _ = await cli(home, "audit", "verify")
    assert rc == 0
    # the head deleted too: a failure, not "ok" (it was, before the head was required)
    head = head_path(home)
    saved = head.read_bytes()
    head.unlink()
    path.write_text("".join(truncated))
    rc, _, err = await cli(home, "audit", "verify")
    assert rc == 1 and "head is missing" in err, err
    head.write_bytes(saved)
    path.write_text("".join(pristine))
    # the root key unreadable: the verifier says so instead of guessing
    key = root_key_path(home)
    key.chmod(0o000)
    try:
        if not os.access(key, os.R_OK):  # as root, file modes do not stop reads
            rc, _, err = await cli(home, "audit", "verify")
            assert rc == 1 and "cannot be read" in err, err
    finally:
        key.chmod(0o600)
