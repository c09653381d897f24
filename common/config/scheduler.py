"""The scheduler's policy, as data: a `[scheduler]` table of the llmos TOML
config (or the same fields as command-line flags of `python -m services.scheduler`)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

import msgspec

from common.configfile import load_table
from ipc.errors import BadRequest


class PolicyName(StrEnum):
    FCFS = "fcfs"
    PRIORITY = "priority"
    ROUND_ROBIN = "round_robin"
    MLFQ = "mlfq"
    FAIR = "fair"


class PreemptionMode(StrEnum):
    RECOMPUTE = "recompute"  # release the victim's KV; recompute it when it runs again
    SWAP = "swap"  # move it to the driver's host swap tier (recompute when there is none)


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Fair share across tenants (equal weights unless `weights` says otherwise)
    # by default: under FCFS one tenant's backlog is everyone's wait.
    name: PolicyName = PolicyName.FAIR
    # priority: a waiting request gains one priority level per `aging_s` seconds.
    aging_s: float = 10.0
    # round_robin: tokens a sequence computes before it yields to waiting ones
    # (when the batch is full). mlfq: the top level's quantum; it doubles per level.
    quantum: int = 64
    mlfq_levels: int = 4
    # mlfq: every `boost_s` seconds every sequence returns to the top level.
    boost_s: float = 5.0
    # fair: weight per tenant (principal); absent tenants weigh `default_weight`.
    weights: dict[str, float] = {}
    default_weight: float = 1.0


class Objective(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A request's service-level objective: its first token within `ttft_ms`
    of arrival, then on average one token per `tpot_ms`. A request that
    meets both counts toward goodput. The defaults suit an interactive chat
    (a reply starts within a second and streams faster than one reads)."""

    ttft_ms: float = 1000.0
    tpot_ms: float = 100.0


class TunerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Online tuning toward goodput (services/scheduler/autotune.py), on by
    default: each step's token budget, batch cap and prefill chunk start
    from the configured ones and depart from them only where a step-time
    model fitted online predicts a request would otherwise miss an
    objective it can still meet; the configured limits while the model is
    unsure. `enabled = false`: the configured limits, always (objectives
    are still judged and reported)."""

    enabled: bool = True
    objective: Objective = Objective()
    # Per tenant (principal), then per priority ("0", "1", ...: Submit.priority),
    # over `objective`.
    tenants: dict[str, Objective] = {}
    priorities: dict[str, Objective] = {}
    # Early rejection: a request whose predicted time to first token is over
    # its objective times this is refused `overloaded` with a retry-after
    # (only while something waits or the batch is full). 0, the default:
    # never; a late request is queued and its status carries the estimate
    # (RequestInfo.estimated_ttft_s) — on your own machine a slow answer
    # usually beats none; a shared service sets 2.
    reject_factor: float = 0.0
    # A step is planned to take at most this share of the tightest running
    # per-token objective (the rest is headroom for noise).
    headroom: float = 0.85
    # Steps fitted (a sliding window) and steps between refits (the limits are planned every step).
    window: int = 64
    every: int = 8
    # The least the tuner lowers a step's token budget to (while prompts
    # wait): below it a long prompt's prefill crawls (a 1,000-token one over
    # 8+ steps) and its first token pays more than the decodes gain.
    min_token_budget: int = 64
    min_prefill_chunk: int = 32

    def validate(self) -> "TunerConfig":
        objectives = [("objective", self.objective)] + [(f"tenants.{k}", o) for k, o in self.tenants.items()] + [
            (f"priorities.{k}", o) for k, o in self.priorities.items()]
        for where, o in objectives:
            if not (o.ttft_ms > 0 and o.tpot_ms > 0):
                raise BadRequest(f"tuner.{where}: ttft_ms and tpot_ms must be > 0")
        for k in self.priorities:
            if not k.lstrip("-").isdigit():
                raise BadRequest(f"tuner.priorities: {k!r} is not a priority (an integer, e.g. \"0\")")
        checks = [(self.reject_factor >= 0, "tuner.reject_factor must be >= 0"),
                  (0.1 <= self.headroom <= 1.0, "tuner.headroom must be within [0.1, 1]"),
                  (self.window >= 8, "tuner.window must be >= 8"), (self.every >= 1, "tuner.every must be >= 1"),
                  (self.min_token_budget >= 1, "tuner.min_token_budget must be >= 1"),
                  (self.min_prefill_chunk >= 1, "tuner.min_prefill_chunk must be >= 1")]
        for ok, why in checks:
            if not ok:
                raise BadRequest(why)
        return self

    def objective_for(self, tenant: str, priority: int) -> Objective:
        return self.tenants.get(tenant) or self.priorities.get(str(priority)) or self.objective


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    policy: PolicyConfig = PolicyConfig()
    # Tokens whose KV one step computes, over all sequences (chunked prefill).
    token_budget: int = 512
    max_num_seqs: int = 64
    # A prefill chunk of one sequence is at most this many tokens per step.
    prefill_chunk: int = 512
    # Admission control: waiting requests and their prompt tokens.
    max_waiting: int = 256
    max_waiting_tokens: int = 262144
    # The part of each of those one principal may hold (auth on; 1.0: no
    # per-principal bound), so a tenant's flood is refused before it fills
    # the line for everyone.
    max_waiting_share: float = 0.5
    # Finished requests remembered for re-submissions (idempotency).
    remember_finished: int = 4096
    # A step whose driver does not answer in time counts as that driver lost.
    step_timeout_s: float = 120.0
    # Reserve the next step's decode slots while a step runs, so the memory
    # round trip leaves the critical path (docs/scheduler.md, "The step").
    overlap: bool = True
    # Async scheduling: while step N runs, step N+1 (the same decodes, their
    # slots reserved ahead) goes to the driver, which feeds each the token it
    # sampled in N; a sequence that ended in N has its N+1 token dropped
    # (docs/scheduler.md, "Async steps"). Needs `overlap`. "auto" (the
    # default): for every driver but one that computes on the host's CPU
    # cores, where the scheduler's and kernel's work it moves beside the
    # forward pass would compete with it; true: for every driver.
    async_steps: bool | Literal["auto"] = "auto"
    # How a sequence preempted for blocks keeps its KV (see PreemptionMode).
    preemption: PreemptionMode = PreemptionMode.RECOMPUTE
    # Objectives and online tuning (on by default; see TunerConfig).
    tuner: TunerConfig = TunerConfig()
    # Shorthand kept from before objectives (`llmos up --autotune MS`): > 0
    # sets the default objective's tpot_ms.
    tpot_target_ms: float = 0.0
    # Sessions: the share of a pool's blocks idle sessions may keep pinned
    # for their next request (0: no pinning; the prefix cache alone).
    session_pin_fraction: float = 0.5
    # Timed and periodic jobs: active jobs one principal may hold, and the
    # finished ones (done, cancelled, failed) kept for it, oldest pruned first.
    max_jobs: int = 1024
    max_finished_jobs: int = 256

    def validate(self) -> "SchedulerConfig":
        checks = [
            (self.token_budget >= 1, "token_budget must be >= 1"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.prefill_chunk >= 1, "prefill_chunk must be >= 1"),
            (self.max_waiting >= 1, "max_waiting must be >= 1"),
            (self.max_waiting_tokens >= 1, "max_waiting_tokens must be >= 1"),
            (self.max_jobs >= 0, "max_jobs must be >= 0"),
            (self.max_finished_jobs >= 0, "max_finished_jobs must be >= 0"),
            (0.0 < self.max_waiting_share <= 1.0, "max_waiting_share must be within (0, 1]"),
            (self.tpot_target_ms >= 0, "tpot_target_ms must be >= 0"),
            (0.0 <= self.session_pin_fraction <= 1.0, "session_pin_fraction must be within [0, 1]"),
            (self.policy.aging_s > 0, "policy.aging_s must be > 0"),
            (self.policy.quantum >= 1, "policy.quantum must be >= 1"),
            (self.policy.mlfq_levels >= 1, "policy.mlfq_levels must be >= 1"),
            (self.policy.boost_s > 0, "policy.boost_s must be > 0"),
            (self.policy.default_weight > 0 and all(w > 0 for w in self.policy.weights.values()),
             "policy weights must be > 0"),
        ]
        for ok, why in checks:
            if not ok:
                raise BadRequest(why)
        self.tuner.validate()
        return self

    @property
    def objectives(self) -> TunerConfig:
        """The tuner's table with `tpot_target_ms` (when set) applied."""
        if self.tpot_target_ms <= 0:
            return self.tuner
        o = msgspec.structs.replace(self.tuner.objective, tpot_ms=self.tpot_target_ms)
        return msgspec.structs.replace(self.tuner, objective=o)


def load_scheduler_config(path: str | Path | None, **overrides: object) -> SchedulerConfig:
    """The `[scheduler]` table (ipc/configfile.py `load_table`: the file at
    `path`, else the kernel's), with `overrides` (top-level fields, or
    ``policy``: the policy's name) that are not None applied."""
    if "policy" in overrides:
        overrides["policy.name"] = overrides.pop("policy")
    return load_table(path, "scheduler", SchedulerConfig, overrides)
