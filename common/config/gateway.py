"""The gateway's limits, as data: the `[gateway]` table of the llmos TOML
config (the file the kernel was started with, `$LLMOS_CONFIG`).

Every number bounds what one HTTP client can make the gateway hold before it
has proved who it is, or how long it can hold it:

- `max_body_bytes` (4 MiB): a request body larger than this is refused (413)
  from its Content-Length before a byte of it is read, or as soon as a
  chunked body passes it. A full 128k-token context is about 0.5 MB of JSON
  text (1 MB as token ids); 4 MiB leaves room for JSON escapes (a `\\uXXXX`
  is 6 bytes for one character) and long chat transcripts, while one body
  in flight costs the gateway at most a few times 4 MiB to buffer and parse.
- `body_timeout_s` (60 s): a whole body must arrive within this (408), so
  a full-size body needs at least ~70 KB/s; a trickled body is not held
  forever.
- `header_timeout_s` (10 s): from a connection's first byte (or its opening)
  to the end of a request's headers; a slowloris connection is closed.
- `max_header_bytes` (16 KiB): the request line and headers together (431).
- `max_connections` (512) and `max_connections_per_client` (64, by source
  address; 0 = no per-client cap): connections past either are answered 503
  and closed at once. Behind a reverse proxy every client has the proxy's
  address: raise or switch off the per-client cap there.
- `keep_alive_s` (5 s): an idle keep-alive connection is closed.
- `max_n` (16): the most choices (`n`, `best_of`) one completion may ask
  for; they share the prompt's KV, but each holds its own generated blocks
  and decode slot. At most 256 (the scheduler's fork-group bound).
- `allow_anonymous` (false): requests without an API key are refused (401)
  before their body is read; true only for a kernel run with auth off,
  where nobody has a key to send.

Redundancy and restarts (docs/reliability.md, "HTTP clients"):

- `instances` (2): gateway processes sharing the one listening socket the
  kernel holds (`llmos up --gateway-instances N`); a killed one costs only
  the connections it had accepted, and its clients resume on another.
- `resume_grace_s` (30 s): how long a stream whose gateway instance died
  (or a request sent with an Idempotency-Key whose client left) runs on in
  the scheduler for its client to come back with Last-Event-ID.
- `drain_s` (30 s): on SIGTERM an instance stops accepting and lets its
  streams finish for at most this long; what is left is cut, to be resumed
  on another instance.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from common.configfile import load_table
from ipc.errors import BadRequest

MIB = 1 << 20
MAX_RESUME_GRACE_S = 300.0  # the bound of Submit.linger_s (ipc/protocol/scheduler.py)


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_body_bytes: int = 4 * MIB
    body_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 512
    max_connections_per_client: int = 64
    keep_alive_s: int = 5
    allow_anonymous: bool = False
    # max_tokens of a request that gives none
    default_max_tokens: int = 256
    max_n: int = 16  # choices per completion (n, best_of)
    # Gateway processes sharing the one listening socket the kernel holds.
    instances: int = 2
    # How long a stream whose gateway instance died (or a request with an
    # Idempotency-Key whose client left) runs on for its client to resume it.
    resume_grace_s: float = 30.0
    # On SIGTERM: how long an instance lets its open streams finish.
    drain_s: float = 30.0

    def validate(self) -> "GatewayConfig":
        checks = [
            (self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024"),
            (self.body_timeout_s > 0, "body_timeout_s must be > 0"),
            (self.header_timeout_s > 0, "header_timeout_s must be > 0"),
            (self.max_header_bytes >= 1024, "max_header_bytes must be >= 1024"),
            (self.max_connections >= 1, "max_connections must be >= 1"),
            (self.max_connections_per_client >= 0, "max_connections_per_client must be >= 0 (0: no cap)"),
            (self.keep_alive_s >= 1, "keep_alive_s must be >= 1"),
            (self.default_max_tokens >= 1, "default_max_tokens must be >= 1"),
            (1 <= self.max_n <= 256, "max_n must be in [1, 256]"),
            (1 <= self.instances <= 64, "instances must be in [1, 64]"),
            (0 <= self.resume_grace_s <= MAX_RESUME_GRACE_S, f"resume_grace_s must be in [0, {MAX_RESUME_GRACE_S:g}]"),
            (0 <= self.drain_s <= 3600, "drain_s must be in [0, 3600]"),
        ]
        for ok, why in checks:
            if not ok:
                raise BadRequest(why)
        return self


def load_gateway_config(path: str | Path | None, **overrides: object) -> GatewayConfig:
    """The `[gateway]` table (ipc/configfile.py `load_table`: the file at
    `path`, else the kernel's), with `overrides` that are not None applied."""
    return load_table(path, "gateway", GatewayConfig, overrides)
