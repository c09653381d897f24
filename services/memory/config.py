"""The memory server's policy, as data (a table of the llmos TOML config)."""

from __future__ import annotations

import msgspec

from ipc.protocol.memory import NO_LIMIT


class MemoryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Device KV blocks a tenant may hold over all pools; NO_LIMIT (-1): none.
    default_tenant_blocks: int = NO_LIMIT
    tenant_blocks: dict[str, int] = {}
