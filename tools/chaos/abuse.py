"""The abuse mix of a chaos run (`llmos chaos --abuse`): abusive clients
(tools/chaos/attacks.py) run beside the honest load and the faults, and the
run holds only if every attack was refused, the honest clients lost nothing
(the ordinary checker), no service went down that no fault explains, and the
kernel's resident memory stayed under a stated bound.

The kernel's RSS is sampled (VmRSS, every `rss_period_s`) for the whole run;
the peak reported is the larger of the samples' maximum and the kernel's own
high-water mark (VmHWM), which catches a spike between two samples.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from common.home import front_endpoint
from ipc.protocol import security as sec
from kernel.config import KernelConfig
from sdk.client import AsyncClient
from tools.chaos import attacks as at
from tools.chaos import raw_attacks as raw
from tools.chaos.fuzz import flood
from tools.chaos.history import History
from tools.chaos.procs import peak_rss_mb, rss_mb

ATTACKS = ("oversized", "disguised_ops", "unread_replies", "login_flood", "quota_bypass", "malformed")

# A chaos run's kernel without abuse peaks at 38 MiB (VmHWM; 20 s, 6 clients,
# 5 faults, the tests' tiny checkpoint, 2 cores): routing tables, wait queues
# and socket buffers of a few clients. 200 MiB is five times that: room for
# honest bursts, while a dozen parked or queued messages at the front limit
# (8 MiB), or the unread replies echoing a 1 MiB `dst` (1 GB per
# 1,000), cross it.
KERNEL_RSS_BOUND_MB = 200.0


@dataclass
class AbuseConfig:
    attacks: tuple[str, ...] = ATTACKS
    kernel_rss_bound_mb: float = KERNEL_RSS_BOUND_MB
    rss_period_s: float = 0.2
    period_s: float = 2.0  # between rounds of the paced attacks
    sdk_prompt_bytes: int = 6 * 1024 * 1024  # under the front limit (8 MiB): the scheduler must refuse it
    http_body_bytes: int = 32 * 1024 * 1024
    frame_period_s: float = 10.0  # between near-limit raw frames (each one a large allocation here)
    unread_requests: int = 1500
    unread_body_bytes: int = 256 * 1024
    unread_dst_bytes: int = 1024 * 1024
    login_window: int = 32
    quota_streams: int = 6
    malformed_rate: float = 300.0  # frames/s: tools/chaos/fuzz.py's front flood, paced


@dataclass
class Restart:
    t: float
    instance: str
    reason: str


def unexplained_downs(history: History) -> list[Restart]:
    """Services that went down with no fault to explain it: each fired fault
    explains the first down of its instance after it."""
    pending: dict[str, list[float]] = {}
    for f in sorted((f for f in history.faults if f.t >= 0), key=lambda f: f.t):
        pending.setdefault(f.instance, []).append(f.t)
    out = []
    for ev in history.services:
        if ev.kind != "down":
            continue
        queue = pending.get(ev.instance, [])
        if queue and queue[0] <= ev.t:
            queue.pop(0)
        else:
            out.append(Restart(round(ev.t, 3), ev.instance, ev.reason))
    return out


def front_limit() -> int:
    """The kernel's largest accepted client message (its front socket's MAXMSGSIZE)."""
    return KernelConfig().front_limits.max_message_bytes


class RssSampler:
    """VmRSS of one process, sampled; the peak and a coarse series."""

    def __init__(self, pid: int, period_s: float):
        self.pid = pid
        self.period_s = period_s
        self.peak_mb = 0.0
        self.series: list[float] = []  # one value per second
        self.first_mb: float | None = None

    def sample(self) -> None:
        r = rss_mb(self.pid)
        if r is None:
            return
        if self.first_mb is None:
            self.first_mb = round(r, 1)
        self.peak_mb = max(self.peak_mb, r)

    async def run(self) -> None:
        per_second = max(int(1 / self.period_s), 1)
        n = 0
        while True:
            self.sample()
            n += 1
            if n % per_second == 0 and (r := rss_mb(self.pid)) is not None:
                self.series.append(round(r, 1))
            await anyio.sleep(self.period_s)  # a sampling period: a measurement, not a wait


@dataclass
class AbuseMix:
    """The abusive clients of one run, prepared with the admin's client."""

    cfg: AbuseConfig
    home: Path
    kernel_pid: int
    status_token: bytes
    big: AsyncClient  # a tenant with `generate`: oversized prompts
    big_key: str
    quota: AsyncClient  # a tenant with `generate` and 1 concurrent request
    honest_key: str  # logs in during the login flood
    base_url: str
    seed: int
    stats: dict[str, at.AttackStats] = field(default_factory=dict)
    rss: RssSampler | None = None

    async def run(self, stop: anyio.Event, t0: float) -> None:
        """Every attack until `stop`, each ending its last round (`t0`: the
        history's clock, for the times in breach reports)."""
        c = self.cfg
        s = self.stats
        for name in _stat_names(c.attacks, bool(self.base_url)):
            s[name] = at.AttackStats(t0=t0)
        if "oversized_frames" in s:
            s["oversized_frames"].figures["front_limit_mib"] = front_limit() / 2**20
        async with anyio.create_task_group() as tg:
            if "oversized" in c.attacks:
                tg.start_soon(lambda: at.oversized_sdk(self.big, s["oversized_sdk"], stop,
                                                       prompt_bytes=c.sdk_prompt_bytes, period_s=c.period_s))
                token = self.big.connection.token
                tg.start_soon(_threaded, lambda h: raw.oversized_frames(
                    self.home, token, s["oversized_frames"], h, limit=front_limit(), period_s=c.frame_period_s), stop)
                if self.base_url:
                    tg.start_soon(lambda: at.oversized_http(self.base_url, self.big_key, s["oversized_http"], stop,
                                                            body_bytes=c.http_body_bytes, period_s=c.period_s))
            if "disguised_ops" in c.attacks:
                tg.start_soon(_threaded, lambda h: raw.disguised_ops(self.home, self.status_token, s["disguised_ops"],
                                                                    h, c.period_s), stop)
            if "unread_replies" in c.attacks:
                tg.start_soon(_threaded, lambda h: raw.unread_replies(
                    self.home, s["unread_replies"], h, requests=c.unread_requests, body_bytes=c.unread_body_bytes,
                    dst_bytes=c.unread_dst_bytes), stop)
            if "login_flood" in c.attacks:
                tg.start_soon(_threaded, lambda h: raw.login_flood(self.home, s["login_flood"], h,
                                                                  window=c.login_window, seed=self.seed), stop)
                tg.start_soon(lambda: at.honest_logins(self.home, self.honest_key, s["login_flood"], stop,
                                                       c.period_s * 2))
            if "quota_bypass" in c.attacks:
                tg.start_soon(lambda: at.quota_bypass(self.quota, s["quota_bypass"], stop, streams=c.quota_streams,
                                                      period_s=c.period_s))
            if "malformed" in c.attacks:
                tg.start_soon(self._malformed, stop)

    async def _malformed(self, stop: anyio.Event) -> None:
        """tools/chaos/fuzz.py's front flood with the tenant's token, for as long as the load runs."""
        stats = self.stats["malformed"]
        token = self.big.connection.token
        frames = 0
        k = 0
        while not stop.is_set():
            # Bursts of a few seconds (flood takes a count, not a stop event).
            fs = await anyio.to_thread.run_sync(lambda: flood(front_endpoint(self.home), "front",
                                                              int(self.cfg.malformed_rate * 5), self.seed + k,
                                                              token=token, rate=self.cfg.malformed_rate))
            k += 1
            frames += fs.sent
            for code, n in fs.answers.items():
                if code in at.REFUSALS:
                    stats.refused[code] += n
                else:
                    stats.other[code] += n
            for u in fs.unexpected:
                stats.breach(f"a malformed frame: {u}")
        stats.sent = frames

    async def sample_rss(self) -> None:
        self.rss = RssSampler(self.kernel_pid, self.cfg.rss_period_s)
        await self.rss.run()

    def report(self, history: History) -> dict[str, Any]:
        rss = self.rss or RssSampler(self.kernel_pid, self.cfg.rss_period_s)
        rss.sample()
        hwm = peak_rss_mb(self.kernel_pid)
        peak = max(rss.peak_mb, hwm or 0.0)
        downs = unexplained_downs(history)
        attacks = {name: st.to_json() for name, st in sorted(self.stats.items())}
        violations = [f"{name}: {st.breaches} breaches ({'; '.join(st.examples[:3])})"
                      for name, st in sorted(self.stats.items()) if st.breaches]
        violations += [f"{name}: nothing sent" for name, st in sorted(self.stats.items()) if not st.sent]
        if downs:
            violations.append(f"{len(downs)} services down with no fault injected: "
                              + ", ".join(f"{d.instance} at {d.t:.1f}s ({d.reason})" for d in downs[:5]))
        if peak > self.cfg.kernel_rss_bound_mb:
            violations.append(f"kernel RSS peaked at {peak:.0f} MiB (bound {self.cfg.kernel_rss_bound_mb:g} MiB)")
        return {
            "attacks": attacks,
            "refused": sum(sum(st.refused.values()) for st in self.stats.values()),
            "breaches": sum(st.breaches for st in self.stats.values()),
            "unexplained_downs": [vars(d) for d in downs],
            "kernel_rss_mb": {"peak": round(peak, 1), "peak_sampled": round(rss.peak_mb, 1),
                              "hwm": round(hwm, 1) if hwm is not None else None, "at_start": rss.first_mb,
                              "bound": self.cfg.kernel_rss_bound_mb, "per_second": rss.series},
            "holds": not violations,
            "violations": violations,
        }


async def prepare(stack: AsyncExitStack, admin: AsyncClient, home: Path, cfg: AbuseConfig, *, kernel_pid: int,
                  honest_key: str, base_url: str, seed: int, tag: str = "") -> AbuseMix:
    """The abusive tenants' keys and connections (closed with `stack`)."""
    async def key(name: str, rights: list[str], quota: sec.Quota | None = None) -> str:
        created = await admin.call(sec.SECURITY, sec.CreateKey(tag + name, rights, quota=quota, note="chaos abuse"))
        return str(created.api_key)

    async def client(api_key: str) -> AsyncClient:
        return await stack.enter_async_context(await AsyncClient.connect(home=home, api_key=api_key, timeout=30))

    status_only = await client(await key("abuse-status", ["status"]))
    big_key = await key("abuse-big", ["generate"])
    big = await client(big_key)
    quota = await client(await key("abuse-quota", ["generate"], sec.Quota(concurrent_requests=1)))
    return AbuseMix(cfg, home, kernel_pid, status_only.connection.token, big, big_key, quota, honest_key,
                    base_url, seed)


def _stat_names(attacks: Sequence[str], http: bool) -> list[str]:
    out = []
    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"unknown attack {a!r}; known: {', '.join(ATTACKS)}")
        if a == "oversized":
            out += ["oversized_sdk", "oversized_frames", *(["oversized_http"] if http else [])]
        else:
            out.append(a)
    return out


async def _threaded(fn: Callable[[threading.Event], None], stop: anyio.Event) -> None:
    """Run a blocking attack in a worker thread until `stop` (or cancellation) halts it."""
    halt = threading.Event()

    async def relay() -> None:
        try:
            await stop.wait()
        finally:
            halt.set()  # also when cancelled: the thread must end for run_sync to return

    async with anyio.create_task_group() as tg:
        tg.start_soon(relay)
        try:
            await anyio.to_thread.run_sync(fn, halt)
        finally:
            halt.set()
            tg.cancel_scope.cancel()


def summary_lines(abuse: dict[str, Any]) -> Sequence[str]:
    r = abuse["kernel_rss_mb"]
    lines = [f"  abuse             refused {abuse['refused']}, breaches {abuse['breaches']}; kernel RSS peak "
             f"{r['peak']:.0f} MiB (bound {r['bound']:g})"]
    for name, a in abuse["attacks"].items():
        refused = ", ".join(f"{k}={v}" for k, v in sorted(a["refused"].items())) or "none"
        other = ", ".join(f"{k}={v}" for k, v in sorted(a["other"].items()))
        figures = ", ".join(f"{k}={v:g}" for k, v in a.items() if isinstance(v, float | int) and k not in
                            ("sent", "breaches"))
        lines.append(f"    {name:<17} sent {a['sent']}: refused {refused}" + (f"; other {other}" if other else "")
                     + (f"; {figures}" if figures else "") + (f"; BREACHES {a['breaches']}" if a["breaches"] else ""))
    if abuse["unexplained_downs"]:
        lines.append(f"    services down with no fault: {len(abuse['unexplained_downs'])}")
    return lines
