"""The security server's settings, as data: the `[security]` table of the
llmos TOML config."""

from __future__ import annotations

from pathlib import Path

import msgspec

from common.configfile import load_table
from ipc.errors import BadRequest

# A token lives at most a day (services/security/service.py MAX_TTL_S: the
# bound on a refresh family and on how long a revoked token id is kept).
MAX_TOKEN_TTL_S = 24 * 3600


class SecurityConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Seconds a capability token lives when its Login asks for no TTL (the
    # SDK refreshes it before it expires); at most a day.
    token_ttl_s: int = 3600

    def validate(self) -> "SecurityConfig":
        if not 1 <= self.token_ttl_s <= MAX_TOKEN_TTL_S:
            raise BadRequest(f"token_ttl_s must be within [1, {MAX_TOKEN_TTL_S}]")
        return self


def load_security_config(path: str | Path | None = None) -> SecurityConfig:
    """The `[security]` table (ipc/configfile.py `load_table`)."""
    return load_table(path, "security", SecurityConfig)
