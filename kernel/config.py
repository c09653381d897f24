"""Configuration: one TOML file decoded into typed structs; every field has a default.

The kernel decodes the whole file once, before anything starts: its own
tables and every service's (each service's struct lives in a torch-free
`config.py` of its package), so a bad value stops `llmos up` at once with
the file, table and field named. Supervision policy is data here (Erlang/OTP
child specs), not code. `llmos config example` prints every setting with its
default (tools/config_example.py).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import msgspec

from common.config.driver import DriverConfig
from common.listen import parse_listen
from common.configfile import child_tables, read_toml, split_error, where, with_overrides
from ipc.errors import BadRequest, ConfigError
from ipc.sockets import FRONT_MAX_MESSAGE_BYTES, SocketLimits
from common.config.gateway import GatewayConfig
from common.config.memory import MemoryConfig
from common.config.scheduler import SchedulerConfig
from common.config.security import SecurityConfig
from common.config.launcher import LauncherConfig


# Past a child's own bound on stopping (the gateway's drain_s), before SIGKILL.
SHUTDOWN_SLACK_S = 5.0


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
    # `period_s` seconds gives the child up; a significant one escalates (the
    # kernel stops everything and exits), an optional one (false: the
    # gateway, test services) stops alone and the rest keep serving.
    intensity: int = 5
    period_s: float = 10.0
    significant: bool = True
    shutdown_timeout_s: float = 5.0
    startup_timeout_s: float = 120.0
    env: dict[str, str] = {}
    # "HOST:PORT" the kernel binds once and hands to every instance as an
    # inherited listening socket (LLMOS_LISTEN_FD; common/listen.py), so the
    # instances share one accept queue that outlives any of them.
    listen: str = ""
    # Placement, read by the Ray launcher only (kernel/ray_launcher.py):
    # what each instance's actor asks of a node (custom resources such as
    # {"llmos_driver": 1}, GPUs), or one node by its Ray node id.
    resources: dict[str, float] = {}
    num_gpus: float = 0.0
    node_id: str = ""

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
    # Requests one client may have in flight (routed or waiting); public ones
    # (Login, no token) apart and far fewer, per client and in all: a client
    # without a key kept tens of thousands in flight and locked every tenant
    # out of Login behind them (kernel/clients.py).
    client_inflight_limit: int = 4096
    client_public_limit: int = 8
    public_inflight_limit: int = 256
    # Bytes of requests in flight, per client and in all: the kernel keeps a
    # request's frames until it is answered. A client's first request is
    # always let through (up to the 8 MiB message bound).
    client_inflight_bytes: int = 32 * 1024 * 1024
    inflight_bytes_limit: int = 256 * 1024 * 1024
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


def default_children(model: str = "", drivers: dict[str, int] | None = None, http: str = "",
                     kv_cache_mb: float = 0, swap_mb: float = 0.0, preemption: str = "",
                     gateway: GatewayConfig | None = None, driver_args: list[str] | None = None) -> list[ChildSpec]:
    """What `llmos up` runs, in start order: security first (it writes
    admin.key and must be up before anyone logs in), the memory server
    before the drivers whose pools it tracks, the scheduler after both, the
    gateway last (optional: it stops alone; `gateway.instances` of them on
    the one port, each given `drain_s` to finish its streams when stopped).
    The settings come from the config's tables; model, kv_cache_mb, swap_mb
    and preemption, when given, are passed as flags over them (tools that
    boot their own llmos); `driver_args` go to every driver as given (its
    own flags, e.g. the null driver's --step-ms)."""
    children = [ChildSpec(name="security", module="services.security"),
                ChildSpec(name="memory", module="services.memory")]
    for name, n in (drivers or {"cpu": 1}).items():
        children.append(ChildSpec(name=name, module="drivers", service="driver", instances=n,
                                  args=[name, *(["--model", model] if model else []),
                                        *(["--kv-cache-mb", str(kv_cache_mb)] if kv_cache_mb else []),
                                        *(["--swap-mb", str(swap_mb)] if swap_mb > 0 else []),
                                        *(driver_args or [])]))
    children.append(ChildSpec(name="scheduler", module="services.scheduler",
                              args=["--preemption", preemption] if preemption else []))
    if http:
        gw = gateway or GatewayConfig()
        children.append(ChildSpec(name="gateway", module="services.gateway", args=["--listen", http],
                                  significant=False, listen=http, instances=gw.instances,
                                  shutdown_timeout_s=gw.drain_s + SHUTDOWN_SLACK_S))
    return children


def echo_child() -> ChildSpec:
    """The echo test service (no longer in a default boot): optional."""
    return ChildSpec(name="echo", module="services.echo", significant=False)


# The tables each service decodes itself, with the same struct.
SERVICE_TABLES = ("scheduler", "memory", "gateway", "security", "driver")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kernel: KernelConfig = KernelConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    children: list[ChildSpec] = msgspec.field(default_factory=default_children)
    scheduler: SchedulerConfig = SchedulerConfig()
    memory: MemoryConfig = MemoryConfig()
    gateway: GatewayConfig = GatewayConfig()
    security: SecurityConfig = SecurityConfig()
    driver: DriverConfig = DriverConfig()
    launcher: LauncherConfig = LauncherConfig()

    def validate(self, source: str | Path | None = None) -> "Config":
        """Every table's own checks, and the children's; `ConfigError` naming
        `source`, the table and the field."""
        for table in SERVICE_TABLES:
            try:
                getattr(self, table).validate()
            except BadRequest as exc:
                raise ConfigError(f"{where(source, table)} {exc.message}") from None
        try:
            self.launcher.validate()
        except BadRequest as exc:
            raise ConfigError(f"{where(source, 'launcher')} {exc.message}") from None
        names = [c.name for c in self.children]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"{where(source, 'children')} duplicate child names {sorted(dup)}")
        for c in self.children:
            if c.instances < 1:
                raise ConfigError(f"{where(source, 'children')} child {c.name!r} needs instances >= 1")
            if c.listen:
                try:
                    parse_listen(c.listen)
                except BadRequest as exc:
                    raise ConfigError(f"{where(source, 'children')} child {c.name!r}: {exc.message}") from None
            if c.num_gpus < 0 or any(v < 0 for v in c.resources.values()):
                raise ConfigError(f"{where(source, 'children')} child {c.name!r} asks for negative resources")
            if c.intensity < 0 or c.period_s <= 0:
                raise ConfigError(f"{where(source, 'children')} child {c.name!r} has a bad restart "
                                  f"intensity/period")
        return self

    def child_env(self, source: str | Path | None) -> dict[str, str]:
        """The environment that hands each child the tables decoded here
        (ipc/configfile.py `load_table` reads it)."""
        tables = {t: msgspec.to_builtins(getattr(self, t)) for t in SERVICE_TABLES}
        return {"LLMOS_CONFIG_TABLES": child_tables(tables, source)}

    def with_settings(self, source: str, **settings: object) -> "Config":
        """`self` with settings given as dotted names ("scheduler.policy.name")
        set where not None (`llmos up` flags), decoded and checked again."""
        raw = with_overrides(msgspec.to_builtins(self), settings)
        return decode_config(raw, source)


def decode_config(raw: dict[str, Any], source: str | Path | None) -> Config:
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        path, why = split_error(exc)
        table, _, fld = path.partition(".")
        if table.startswith("children["):  # "children[2]": the third [[children]] table
            table = f"[children] #{int(table[9:-1]) + 1}"
        if not table:
            prefix = f"config file {source}" if isinstance(source, Path) else (source or "config")
            raise ConfigError(f"{prefix}: {why}") from None
        if fld:
            raise ConfigError(f"{where(source, table)} {fld}: {why}") from None
        raise ConfigError(f"{where(source, table)} {why}") from None
    return cfg.validate(source)


def load_config(path: str | Path | None) -> Config:
    """Read the TOML file at `path` (None: all defaults). Errors name the file,
    the table and the field."""
    if path is None:
        return Config().validate()
    p = Path(path)
    return decode_config(read_toml(p), p)
