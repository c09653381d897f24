"""A short chaos run with the abuse mix: abusive clients (oversized prompts
through the SDK, raw frames at the kernel's front limit and over HTTP;
privileged kernel ops disguised as `Status`; a client that never reads its
replies; a login flood; re-submission claims past a quota of 1; malformed
frames) run beside the honest load and the faults. Every attack must be
refused, the honest clients must lose nothing, no service may go down that
no fault explains, and the kernel's RSS must stay under the bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.chaos.abuse import AbuseConfig, unexplained_downs
from tools.chaos.history import Fault, FaultKind, History, ServiceEvent
from tools.chaos.run import ChaosConfig, run_chaos


def test_a_down_with_no_fault_before_it_is_unexplained() -> None:
    h = History()
    h.faults = [Fault(1.0, "scheduler", "scheduler", FaultKind.KILL, t=1.0),
                Fault(5.0, "memory", "memory", FaultKind.PAUSE, t=5.0)]  # paused, never went down
    h.services = [ServiceEvent(1.1, "down", "scheduler", "scheduler", reason="killed by SIGKILL"),
                  ServiceEvent(2.0, "up", "scheduler", "scheduler", 7),
                  ServiceEvent(3.0, "down", "scheduler", "scheduler", reason="heartbeat expired"),
                  ServiceEvent(4.0, "down", "security", "security", reason="killed by SIGKILL")]
    assert [(d.instance, d.t) for d in unexplained_downs(h)] == [("scheduler", 3.0), ("security", 4.0)]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_abusive_clients_are_refused_and_honest_ones_lose_nothing(home: Path, checkpoint: Path,
                                                                        tmp_path: Path) -> None:
    abuse = AbuseConfig(unread_requests=600, frame_period_s=5.0)
    cfg = ChaosConfig(duration_s=20, seed=2, model=str(checkpoint), clients=6, http_clients=1, kv_cache_mb=16,
                      faults_per_minute=15, drain_s=60, abuse=abuse)
    result = await run_chaos(home, cfg, tmp_path / "report")
    report, verdict = result.report, result.verdict
    # The honest clients: the recovery contract, as without abuse.
    assert verdict.holds, verdict.violations()
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert report["requests"]["ok"] >= 5
    out = report["abuse"]
    attacks = out["attacks"]
    assert set(attacks) == {"oversized_sdk", "oversized_frames", "oversized_http", "disguised_ops",
                            "unread_replies", "login_flood", "quota_bypass", "malformed"}
    # Every attack was made and none got through.
    breaches = {name: a["breach_examples"] for name, a in attacks.items() if a["breaches"]}
    assert not breaches, breaches
    assert all(a["sent"] > 0 for a in attacks.values()), {n: a["sent"] for n, a in attacks.items()}
    # Refused with a clear code (the unread client reads nothing until the end: the kernel may drop its answers).
    for name in ("oversized_sdk", "oversized_frames", "oversized_http", "disguised_ops", "login_flood",
                 "quota_bypass", "malformed"):
        assert sum(attacks[name]["refused"].values()) > 0, (name, attacks[name])
    assert attacks["oversized_frames"]["refused"].get("bad_request", 0) >= 1  # a Submit just under the limit
    assert attacks["disguised_ops"]["refused"].keys() <= {"bad_request", "forbidden"}
    assert attacks["quota_bypass"]["quota_in_force"] == 1 and attacks["quota_bypass"]["max_admitted_at_once"] <= 1
    assert out["unexplained_downs"] == []
    assert out["kernel_rss_mb"]["peak"] <= abuse.kernel_rss_bound_mb
    assert out["holds"] and report["holds"], report["violations"]
