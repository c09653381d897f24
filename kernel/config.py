"""Configuration: one TOML file decoded into typed structs; every field has a default.

Supervision policy is data here (Erlang/OTP child specs), not code.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec

from ipc.configfile import read_toml
from ipc.errors import BadRequest
from ipc.sockets import FRONT_MAX_MESSAGE_BYTES, SocketLimits


class Restart(StrEnum):
    PERMANENT = "permanent"  # always restarted
    TRANSIENT = "transient"  # restarted only after an abnormal exit
    TEMPORARY = "temporary"  # never restarted


class Strategy(StrEnum):
    ONE_FOR_ONE = "one_for_one"
    REST_FOR_ONE = "rest_for_one"  # also restart every child started after it


class ChildSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    module: str
    args: list[str] = []
    # The service name its instances register under ("" = `name`); several
    # specs may share one, e.g. cpu and cuda drivers both serve "driver".
    service: str = ""
    restart: Restart = Restart.PERMANENT
    instances: int = 1
    # Per-child restart intensity: more than `intensity` restarts within
    # `period_s` seconds escalates (the kernel stops everything and exits).
    intensity: int = 5
    period_s: float = 10.0
    shutdown_timeout_s: float = 5.0
    startup_timeout_s: float = 120.0
    env: dict[str, str] = {}


    @property
    def service_name(self) -> str:
        return self.service or self.name


class SupervisorConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    strategy: Strategy = Strategy.ONE_FOR_ONE
    # Exponential restart backoff, capped (MINIX 3's reincarnation server).
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 5.0


class KernelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    front: str = ""  # "" = ipc:// under LLMOS_HOME/run
    back: str = ""
    # Requests for a service with no live instance wait, bounded per service,
    # in all and in bytes (a restart takes ~0.5 s; a burst of a few thousand
    # requests rides it out, a flood is refused `overloaded`).
    wait_queue_limit: int = 1024
    wait_total_limit: int = 8192
    wait_total_bytes: int = 64 * 1024 * 1024
    wait_timeout_s: float = 30.0
    max_attempts: int = 3
    # The back socket carries swap images (large); the front only requests
    # and replies: the gateway takes bodies up to 4 MiB and a prompt of a
    # 128k-token context is ~0.6 MB as ids, so 8 MiB is room to spare. The
    # per-peer queues are short: a client that never reads its replies makes
    # the kernel hold at most 10k (small) replies; one that sends faster than
    # the kernel reads is pushed back by its own socket after 1,000 (ZeroMQ
    # bounds messages, not bytes: 10k queued 16 MiB frames took the kernel
    # past 200 MiB in the abuse chaos run).
    limits: SocketLimits = SocketLimits()
    front_limits: SocketLimits = SocketLimits(send_hwm=10_000, recv_hwm=1_000,
                                              max_message_bytes=FRONT_MAX_MESSAGE_BYTES)
    # Capability check on every client request (kernel/guard.py). On by default:
    # a fresh `llmos up` serves no unauthenticated request but Login.
    auth: bool = True


def default_children(model: str = "demo", drivers: dict[str, int] | None = None, http: str = "",
                     kv_cache_mb: int = 256, swap_mb: float = 0.0, preemption: str = "") -> list[ChildSpec]:
    """What `llmos up` runs, in start order: security first (it writes
    admin.key and must be up before anyone logs in), the memory server
    before the drivers whose pools it tracks, the scheduler after both, the
    gateway last. swap_mb: each driver's host swap tier; preemption: the
    scheduler's mode ("" = its config's)."""
    children = [ChildSpec(name="security", module="services.security"),
                ChildSpec(name="echo", module="services.echo"),
                ChildSpec(name="memory", module="services.memory")]
    for name, n in (drivers or {"cpu": 1}).items():
        children.append(ChildSpec(name=name, module="drivers", service="driver", instances=n,
                                  args=[name, "--model", model, "--kv-cache-mb", str(kv_cache_mb),
                                        *(["--swap-mb", str(swap_mb)] if swap_mb > 0 else [])]))
    children.append(ChildSpec(name="scheduler", module="services.scheduler",
                              args=["--preemption", preemption] if preemption else []))
    if http:
        children.append(ChildSpec(name="gateway", module="services.gateway", args=["--listen", http]))
    return children


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kernel: KernelConfig = KernelConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    children: list[ChildSpec] = msgspec.field(default_factory=default_children)
    # Tables the services read themselves (from $LLMOS_CONFIG, the file the
    # kernel was started with); the kernel only carries them.
    scheduler: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    gateway: dict[str, Any] = {}
    security: dict[str, Any] = {}

    def validate(self) -> "Config":
        names = [c.name for c in self.children]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise BadRequest(f"config: duplicate child names {sorted(dup)}")
        for c in self.children:
            if c.instances < 1:
                raise BadRequest(f"config: child {c.name!r} needs instances >= 1")
            if c.intensity < 0 or c.period_s <= 0:
                raise BadRequest(f"config: child {c.name!r} has a bad restart intensity/period")
        return self


def load_config(path: str | Path | None) -> Config:
    """Read the TOML file at `path` (None: all defaults). Errors name the file and field."""
    if path is None:
        return Config().validate()
    p = Path(path)
    raw = read_toml(p)
    try:
        return msgspec.convert(raw, Config).validate()
    except msgspec.ValidationError as exc:
        raise BadRequest(f"config file {p}: {exc}") from None
