"""`llmos keys …` and `llmos audit …`: the security server's command line.

    llmos keys create --tenant NAME --rights generate,session [--quota requests_per_min=60,kv_blocks=256]
    llmos keys list [--json]
    llmos keys revoke ID [--kind key|token|principal]
    llmos keys quota --tenant NAME --quota tokens_per_min=5000
    llmos audit verify [--json]      exit 1 when the log was tampered with, naming the record and the check
    llmos audit tail [-n 20] [--json]

`keys` commands go through the kernel to the security server (they need the
`admin` right: the local operator's admin.key). `audit` reads the log in
`$LLMOS_HOME` directly, so it works with llmos stopped.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from typing import Any

import msgspec

from common.capability import RIGHTS
from ipc.errors import BadRequest
from common.home import llmos_home
from ipc.protocol import security as sp
from tools.cli_flags import connect
from tools.terminal import print_table, printable


def parse_quota(text: str) -> sp.Quota:
    """``name=value,...`` → Quota; unknown names and non-integers are named."""
    fields = set(sp.Quota.__struct_fields__)
    raw: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name not in fields:
            raise BadRequest(f"bad quota item {part!r}: use NAME=INT with NAME one of {sorted(fields)}")
        try:
            raw[name] = int(value)
        except ValueError:
            raise BadRequest(f"quota {name} must be an integer, got {value!r}") from None
    return sp.Quota(**raw)


def _rights(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def cmd_keys_create(args: argparse.Namespace) -> int:
    quota = parse_quota(args.quota) if args.quota else None
    with connect(args) as c:
        made: sp.KeyCreated = c.call(sp.SECURITY, sp.CreateKey(args.tenant, _rights(args.rights), quota, args.note),
                                     timeout=30)
    if args.json:
        print(msgspec.json.encode(msgspec.structs.asdict(made)).decode())
        return 0
    print(printable(f"key {made.key_id} for tenant {made.tenant} (rights: {', '.join(made.rights)})"))
    print(made.api_key)
    print("store this key now: it is shown once and kept only as a salted hash", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with connect(args) as c:
        listing: sp.KeyList = c.call(sp.SECURITY, sp.ListKeys(), timeout=30)
    if args.json:
        print(msgspec.json.encode({
            "keys": [msgspec.structs.asdict(k) for k in listing.keys],
            "principals": [{**msgspec.structs.asdict(p), "quota": msgspec.structs.asdict(p.quota)}
                           for p in listing.principals],
            "revoked_tokens": listing.revoked_tokens,
        }).decode())
        return 0
    rows: list[tuple[str, ...]] = [("KEY", "TENANT", "RIGHTS", "STATE", "NOTE")]
    for k in listing.keys:
        rows.append((k.key_id, k.tenant, ",".join(k.rights), "revoked" if k.revoked else "active", k.note))
    print_table(rows)
    limited = [p for p in listing.principals if p.quota != sp.Quota() or p.revoked]
    if limited:
        print()
        rows = [("TENANT", "STATE", "REQ/MIN", "TOK/MIN", "CONCURRENT", "KV BLOCKS")]
        for p in limited:
            q = p.quota
            rows.append((p.name, "revoked" if p.revoked else "active", *(str(v or "-") for v in (
                q.requests_per_min, q.tokens_per_min, q.concurrent_requests, q.kv_blocks))))
        print_table(rows)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with connect(args) as c:
        done: sp.Revoked = c.call(sp.SECURITY, sp.Revoke(sp.RevokeKind(args.kind), args.target), timeout=30)
    print(printable(f"llmos: {done.kind} {done.target} {'revoked' if done.changed else 'was already revoked'}"))
    return 0


def cmd_keys_quota(args: argparse.Namespace) -> int:
    with connect(args) as c:
        policy: sp.QuotaPolicy = c.call(sp.SECURITY, sp.SetQuota(args.tenant, parse_quota(args.quota)), timeout=30)
    print(printable(f"llmos: quota for {args.tenant} set (policy version {policy.version})"))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from common.home import root_key_path
    from services.security.audit import audit_path
    from services.security.verify import verify_home

    home = llmos_home(args.home)
    path = audit_path(home)
    key_file = root_key_path(home)
    try:
        v = verify_home(home)
    except OSError as exc:
        raise BadRequest(f"cannot verify the audit log: its MAC key derives from the root key {key_file}, "
                         f"which cannot be read ({exc.strerror})") from None
    except ValueError:
        raise BadRequest(f"cannot verify the audit log: {key_file} does not hold a hex key") from None
    if args.json:
        print(msgspec.json.encode({"ok": v.ok, "records": v.records, "message": v.message, "line": v.line,
                                   "seq": v.seq, "check": v.check, "checkpoints": v.checkpoints,
                                   "path": str(path)}).decode())
    else:
        where = "" if v.ok else f" [check: {v.check}]"
        print(f"llmos: audit log {path}: {v.message}{where}", file=sys.stdout if v.ok else sys.stderr)
    return 0 if v.ok else 1


def cmd_audit_tail(args: argparse.Namespace) -> int:
    from services.security.audit import audit_path
    from services.security.verify import read_lines

    path = audit_path(llmos_home(args.home))
    if not path.exists():
        raise BadRequest(f"no audit log at {path}")
    last = deque(read_lines(path), maxlen=args.n)
    if args.json:
        for raw in last:
            print(raw.decode())
        return 0
    import datetime as dt

    rows: list[tuple[str, ...]] = [("SEQ", "TIME", "PRINCIPAL", "ACTION", "TARGET", "RESULT")]
    for raw in last:
        try:
            r = msgspec.json.decode(raw)
            when = dt.datetime.fromtimestamp(r["time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            rows.append((str(r["seq"]), when, r["principal"], r["action"], r["target"], r["result"]))
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            rows.append(("?", "?", "?", "?", "(damaged line)", "?"))
    print_table(rows)
    return 0


def add_commands(sub: Any) -> None:
    """Register `keys` and `audit` on the `llmos` parser's subcommands."""
    keys = sub.add_parser("keys", help="API keys, revocation and quotas (needs the admin right)")
    ks = keys.add_subparsers(dest="keys_cmd", required=True)
    create = ks.add_parser("create", help="create an API key (shown once)")
    create.add_argument("--tenant", required=True, help="the principal (created if new)")
    create.add_argument("--rights", required=True, help=f"comma-separated, of: {', '.join(RIGHTS)}")
    create.add_argument("--quota", help="e.g. requests_per_min=60,tokens_per_min=10000,concurrent_requests=4,"
                                        "kv_blocks=512 (0 = unlimited)")
    create.add_argument("--note", default="")
    create.add_argument("--json", action="store_true")
    create.set_defaults(fn=cmd_keys_create)
    ls = ks.add_parser("list", help="list keys and tenants")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_keys_list)
    revoke = ks.add_parser("revoke", help="revoke a key, a token or a whole tenant")
    revoke.add_argument("target", help="key id (or token id / tenant name with --kind)")
    revoke.add_argument("--kind", choices=[k.value for k in sp.RevokeKind], default="key")
    revoke.set_defaults(fn=cmd_keys_revoke)
    quota = ks.add_parser("quota", help="set a tenant's quota")
    quota.add_argument("--tenant", required=True)
    quota.add_argument("--quota", required=True)
    quota.set_defaults(fn=cmd_keys_quota)

    audit = sub.add_parser("audit", help="the keyed, hash-chained audit log")
    au = audit.add_subparsers(dest="audit_cmd", required=True)
    verify = au.add_parser("verify", help="check the chain; exit 1 naming the first bad record")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(fn=cmd_audit_verify)
    tail = au.add_parser("tail", help="the last records")
    tail.add_argument("-n", type=int, default=20)
    tail.add_argument("--json", action="store_true")
    tail.set_defaults(fn=cmd_audit_tail)
