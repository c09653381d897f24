"""The memory server's policy, as data: the `[memory]` table of the llmos
TOML config."""

from __future__ import annotations

from pathlib import Path

import msgspec

from common.configfile import load_table
from ipc.errors import BadRequest
from ipc.protocol.memory import NO_LIMIT


class MemoryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Device KV blocks a tenant may hold over all pools; -1: no limit. A
    # tenant's `kv_blocks` quota (`llmos keys quota`) takes precedence.
    default_tenant_blocks: int = NO_LIMIT
    # Per tenant (principal) exceptions to `default_tenant_blocks`.
    tenant_blocks: dict[str, int] = {}

    def validate(self) -> "MemoryConfig":
        if self.default_tenant_blocks < NO_LIMIT:
            raise BadRequest(f"default_tenant_blocks must be >= 0 (or {NO_LIMIT}: no limit)")
        bad = sorted(t for t, n in self.tenant_blocks.items() if n < NO_LIMIT)
        if bad:
            raise BadRequest(f"tenant_blocks.{bad[0]} must be >= 0 (or {NO_LIMIT}: no limit)")
        return self


def load_memory_config(path: str | Path | None = None) -> MemoryConfig:
    """The `[memory]` table (ipc/configfile.py `load_table`)."""
    return load_table(path, "memory", MemoryConfig)
