"""Batched next-token sampling with per-sequence parameters.

Order of operations (vLLM's): repetition penalty, then greedy argmax or
temperature, top-k, top-p (over what top-k kept), min-p, and a draw.

The draw is an inverse-CDF draw in token-id order with a single uniform
number per row, hashed from (seed, position) with splitmix64. Every row goes
through the same operations whatever its batch-mates ask for (a filter a row
does not use leaves it untouched), so a sequence samples the same token at a
position whether it runs alone, in any batch, or after a driver restart.

Log-probabilities are those of the model's raw distribution (before penalty,
temperature and filters), over the ids the tokenizer can decode; they are
computed for the chosen token always and for the top N when asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ipc.protocol.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1) that depends only on (seed, position)."""
    return (splitmix64(splitmix64(seed & _MASK64) ^ position) >> 11) * (1.0 / (1 << 53))


@dataclass(frozen=True, slots=True)
class SampleRow:
    params: SamplingParams
    seed: int                        # resolved (never None)
    position: int                    # position of the token being sampled
    history: Sequence[int] = ()      # ids the repetition penalty applies to


@dataclass(frozen=True, slots=True)
class Sample:
    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


class Sampler:
    def __init__(self, vocab_limit: int):
        """Ids at or above `vocab_limit` (vocabulary padding the tokenizer
        cannot decode) are never sampled: as if their logits were -inf."""
        self.vocab_limit = vocab_limit

    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[Sample]:
        """`logits` float32 [len(rows), vocab]; may be modified in place."""
        raw = logits[:, :self.vocab_limit]
        finite = torch.isfinite(raw).all(dim=1).tolist()
        out: list[Sample | None] = [
            None if ok else Sample(None, error="the model produced non-finite logits (NaN or inf)")
            for ok in finite]
        good = [i for i, ok in enumerate(finite) if ok]
        if not good:
            return [s for s in out if s is not None]
        if len(good) < len(rows):
            raw = raw.index_select(0, torch.tensor(good, device=raw.device))
        rows = [rows[i] for i in good]
        lse = torch.logsumexp(raw, dim=1)
        tokens = self._choose(raw, rows)
        chosen = torch.tensor(tokens, device=raw.device)
        logprobs = (raw.gather(1, chosen[:, None]).squeeze(1) - lse).tolist()
        tops = self._top_logprobs(raw, lse, rows)
        for j, i in enumerate(good):
            out[i] = Sample(tokens[j], logprobs[j], tops[j])
        return [s for s in out if s is not None]

    def _choose(self, raw: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
        plain = [r.params.greedy and r.params.repetition_penalty == 1.0 for r in rows]
        if all(plain):
            return [int(t) for t in raw.argmax(dim=1).tolist()]
        tokens = [0] * len(rows)
        plain_idx = [i for i, p in enumerate(plain) if p]
        if plain_idx:
            picked = raw.index_select(0, _idx(plain_idx, raw)).argmax(dim=1).tolist()
            for i, t in zip(plain_idx, picked):
                tokens[i] = int(t)
        rest_idx = [i for i, p in enumerate(plain) if not p]
        rest = [rows[i] for i in rest_idx]
        work = raw.index_select(0, _idx(rest_idx, raw))      # a copy: raw stays raw
        _penalize(work, rest)
        greedy = [i for i, r in enumerate(rest) if r.params.greedy]
        if greedy:
            picked = work.index_select(0, _idx(greedy, work)).argmax(dim=1).tolist()
            for i, t in zip(greedy, picked):
                tokens[rest_idx[i]] = int(t)
        drawn = [i for i, r in enumerate(rest) if not r.params.greedy]
        if drawn:
            sub = work.index_select(0, _idx(drawn, work))
            picked = _draw(sub, [rest[i] for i in drawn])
            for i, t in zip(drawn, picked):
                tokens[rest_idx[i]] = t
        return tokens

    @staticmethod
    def _top_logprobs(raw: torch.Tensor, lse: torch.Tensor,
                      rows: Sequence[SampleRow]) -> list[list[tuple[int, float]]]:
        tops: list[list[tuple[int, float]]] = [[] for _ in rows]
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs > 0]
        if not wanted:
            return tops
        n = min(max(rows[i].params.logprobs for i in wanted), raw.shape[1])
        sel = _idx(wanted, raw)
        values, ids = raw.index_select(0, sel).topk(n, dim=1)
        values = values - lse.index_select(0, sel)[:, None]
        for j, i in enumerate(wanted):
            k = rows[i].params.logprobs
            tops[i] = list(zip(ids[j, :k].tolist(), values[j, :k].tolist()))
        return tops


def _idx(indices: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long, device=like.device)


def _penalize(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """CTRL repetition penalty: a seen token's logit is divided by the
    penalty if positive, multiplied if negative."""
    limit = logits.shape[1]
    r_idx: list[int] = []
    t_idx: list[int] = []
    factors: list[float] = []
    for i, row in enumerate(rows):
        p = row.params.repetition_penalty
        if p == 1.0:
            continue
        seen = {t for t in row.history if 0 <= t < limit}
        r_idx += [i] * len(seen)
        t_idx += seen
        factors += [p] * len(seen)
    if not r_idx:
        return
    r, t = _idx(r_idx, logits), _idx(t_idx, logits)
    f = torch.tensor(factors, dtype=logits.dtype, device=logits.device)
    vals = logits[r, t]
    logits[r, t] = torch.where(vals > 0, vals / f, vals * f)


def _draw(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=device)
    logits.div_(temps[:, None])
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    vocab = logits.shape[1]
    if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_vals = logits.sort(dim=1, descending=True).values
        # Top-k: keep values >= the k-th largest (ties kept); -inf = no cut.
        kth = torch.tensor([min(k, vocab) - 1 if k > 0 else 0 for k in top_k], device=device)
        cut = sorted_vals.gather(1, kth[:, None])
        no_k = torch.tensor([not 0 < k < vocab for k in top_k], device=device)
        cut.masked_fill_(no_k[:, None], -math.inf)
        # Top-p on what top-k kept: the smallest prefix of the sorted
        # distribution holding top_p of the mass.
        if any(p < 1.0 for p in top_p):
            probs = torch.softmax(sorted_vals.masked_fill(sorted_vals < cut, -math.inf), dim=1)
            before = probs.cumsum(dim=1) - probs
            ps = torch.tensor(top_p, dtype=probs.dtype, device=device)
            keep = (before < ps[:, None]).sum(dim=1).clamp_(min=1)
            p_cut = sorted_vals.gather(1, (keep - 1)[:, None])
            no_p = torch.tensor([p >= 1.0 for p in top_p], device=device)
            cut = torch.where(no_p[:, None], cut, torch.maximum(cut, p_cut))
        logits.masked_fill_(logits < cut, -math.inf)
    min_p = [r.params.min_p for r in rows]
    if any(m > 0.0 for m in min_p):
        probs = torch.softmax(logits, dim=1)
        floor = probs.max(dim=1, keepdim=True).values * torch.tensor(
            min_p, dtype=probs.dtype, device=device)[:, None]
        logits.masked_fill_(probs < floor, -math.inf)
    probs = torch.softmax(logits, dim=1)
    cdf = probs.double().cumsum_(dim=1)
    u = torch.tensor([uniform(r.seed, r.position) for r in rows], dtype=torch.float64, device=device)
    total = cdf[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # The first id whose cumulative mass exceeds the target; masked ids add
    # no mass, so they are never chosen.
    picked = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return [int(t) for t in picked.tolist()]
