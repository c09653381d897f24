"""The `[launcher]` table: how and where the kernel starts its children.

    [launcher]
    kind = "ray"          # "local" (default): subprocesses of the kernel
    address = "auto"      # ray.init's address: "auto", "HOST:PORT", "ray://HOST:10001"
    namespace = "llmos"   # the Ray namespace the incarnation actors are named in

`local` never imports Ray; `ray` needs `pip install -e '.[ray]'`
(kernel/ray_launcher.py, docs/scale-out.md)."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from ipc.errors import BadRequest


class LauncherKind(StrEnum):
    LOCAL = "local"
    RAY = "ray"


class LauncherConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: LauncherKind = LauncherKind.LOCAL
    address: str = "auto"
    namespace: str = "llmos"
    # Seconds a spawn may wait for Ray to place its actor (no node with the
    # resources asked for: the spawn fails and the supervisor backs off).
    placement_timeout_s: float = 60.0

    def validate(self) -> None:
        if not self.address.strip():
            raise BadRequest("address must not be empty (\"auto\", \"HOST:PORT\" or \"ray://HOST:PORT\")")
        if not self.namespace.strip() or len(self.namespace) > 64:
            raise BadRequest("namespace must be 1-64 characters")
        if not 0 < self.placement_timeout_s <= 3600:
            raise BadRequest("placement_timeout_s must be in (0, 3600]")
