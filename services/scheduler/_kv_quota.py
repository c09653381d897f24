"""Tenants' KV-block quotas as the engine plans by them: the security
policy's, and those the memory server refused a sequence by that the policy
does not set (its own config); the policy's replace both. A request that
can never fit its tenant's quota is refused; one that must wait for room
under it says so (`Request.waiting_on`)."""

from __future__ import annotations

from collections.abc import Mapping

from common.logs import get_logger
from ipc.errors import BadRequest
from ipc.protocol import memory as mp
from ipc.protocol import scheduler as sp
from services.scheduler._request import Request, Seq
from services.scheduler.planner import BlockLedger, PoolShape, StepPlan, lifetime_blocks
from services.scheduler.quotas import kv_quota_refusal

log = get_logger()


class KvQuotas:
    def __init__(self) -> None:
        self._policy: dict[str, int] = {}
        self._learned: dict[str, int] = {}
        self.refused = 0  # requests refused as never fitting (Stats)

    @property
    def limits(self) -> dict[str, int]:
        """Tenant -> KV blocks over every pool (absent: unlimited)."""
        return {**self._learned, **self._policy}

    def set_policy(self, limits: Mapping[str, int]) -> None:
        self._policy = dict(limits)
        self._learned.clear()

    def forget_learned(self) -> None:
        """The memory server restarted: its config may have changed (it will say so again)."""
        self._learned.clear()

    def learn(self, tenant: str, limit: int) -> None:
        """The memory server refused `tenant` blocks by this limit."""
        if limit >= 0 and tenant not in self._policy:
            self._learned[tenant] = limit

    def refusal(self, seq: Seq, shapes: Mapping[str, PoolShape], prompt_tokens: int,
                max_tokens: int) -> BadRequest | None:
        """The refusal of a sequence that needs more KV blocks than its
        tenant's quota even alone (None: it fits, or there is no quota);
        counted when there is one."""
        limit = self.limits.get(seq.tenant)
        need = lifetime_blocks(seq, shapes) if limit is not None else None
        if limit is None or need is None or need[0] <= limit:
            return None
        self.refused += 1
        return kv_quota_refusal(seq.tenant, limit, need[0], need[1], prompt_tokens, max_tokens)

    def never_fits(self, seq: Seq, shapes: Mapping[str, PoolShape], limit: int) -> BadRequest:
        """The refusal of a waiting sequence the planner found can never fit
        (the quota was lowered, or learned), counted and logged."""
        req = seq.request
        need = lifetime_blocks(seq, shapes)
        refusal = kv_quota_refusal(seq.tenant, limit, need[0] if need else 0, need[1] if need else 0,
                                   len(req.prompt_ids), req.submit.max_tokens)
        self.refused += 1
        log.warning("scheduler.kv_quota_refused", request_id=req.request_id, principal=req.key[0],
                    error=refusal.message)
        return refusal

    def verdicts(self, p: StepPlan, ledger: BlockLedger, waiting: list[Seq]) -> list[tuple[Request, BadRequest]]:
        """The requests to refuse: their sequences can never fit their
        tenant's quota (it was lowered, or learned from the memory server).
        The waiting sequences short of it are marked, the others unmarked."""
        refused = [(seq.request, self.never_fits(seq, ledger.shapes, ledger.quotas.get(seq.tenant, 0)))
                   for seq in p.never_fit]
        waits = {id(seq) for seq in p.quota_waits}
        for seq in waiting:
            if id(seq) in waits:
                self.mark_waiting(seq, ledger.shapes, ledger.held[seq.tenant], ledger.quotas.get(seq.tenant, -1))
            else:
                seq.request.waiting_on = ""
        return refused

    @staticmethod
    def mark_waiting(seq: Seq, shapes: Mapping[str, PoolShape], held: int, limit: int) -> None:
        """`seq` waits for its tenant's other requests to free blocks (logged once)."""
        req = seq.request
        req.waiting_on = sp.WAITING_ON_KV_QUOTA
        if not req.quota_logged:
            req.quota_logged = True
            need = lifetime_blocks(seq, shapes) or (0, 0)
            log.info("scheduler.waiting_on_quota", request_id=req.request_id, principal=req.key[0],
                     tenant=seq.tenant, quota=mp.KV_BLOCKS, held=held, limit=limit, needs_blocks=need[0],
                     block_size=need[1], msg="waits until the tenant's other requests free KV blocks")


__all__ = ["KvQuotas"]
