"""The sampler on constructed logits, and the wire type of its parameters."""

from __future__ import annotations

import math
from collections import Counter

import msgspec
import pytest
import torch

from drivers.model.sampling import Sampler, SampleRow, uniform
from ipc.errors import BadRequest
from ipc.protocol.sampling import SamplingParams

V = 50


def logits_for(probs: list[float], vocab: int = V) -> torch.Tensor:
    """One row whose softmax puts `probs` on ids 0.. and ~nothing elsewhere."""
    row = torch.full((vocab,), -1e4)
    row[:len(probs)] = torch.log(torch.tensor(probs))
    return row


def draw(params: SamplingParams, row: torch.Tensor, n: int = 400, vocab_limit: int = V) -> Counter:
    """Tokens drawn at positions 0..n-1 (one batch of n rows)."""
    sampler = Sampler(vocab_limit)
    rows = [SampleRow(params, params.seed or 0, pos) for pos in range(n)]
    out = sampler.sample(row.expand(n, -1).clone(), rows)
    return Counter(s.token for s in out)


def test_same_seed_and_position_give_the_same_token_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, V, generator=gen) * 2
    mates = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, seed=1),
             SamplingParams(top_p=0.5, min_p=0.1, seed=2),
             SamplingParams(temperature=0.0, repetition_penalty=2.0),
             SamplingParams(temperature=2.0, seed=3, logprobs=3)]
    params = SamplingParams(temperature=0.8, seed=1234)
    for pos in range(64):
        alone = Sampler(V).sample(logits[pos:pos + 1].clone(), [SampleRow(params, 1234, pos)])[0]
        batch = torch.cat([logits[:5], logits[pos:pos + 1], logits[5:9]]).clone()
        rows = [SampleRow(m, m.seed or 7, 3, history=[1, 2, 3]) for m in mates]
        rows.insert(5, SampleRow(params, 1234, pos))
        rows += [SampleRow(m, 9, pos, history=[4]) for m in mates[:4]]
        mixed = Sampler(V).sample(batch, rows)[5]
        assert (mixed.token, mixed.logprob) == (alone.token, alone.logprob)


def test_draws_depend_on_seed_and_position() -> None:
    row = logits_for([0.25] * 4)
    assert len(draw(SamplingParams(seed=5), row)) == 4           # positions vary the draw
    same_pos = {Sampler(V).sample(row[None].clone(), [SampleRow(SamplingParams(), s, 0)])[0].token
                for s in range(40)}
    assert len(same_pos) == 4                                   # so do seeds
    assert uniform(1, 2) == uniform(1, 2) != uniform(1, 3) != uniform(2, 2)


def test_temperature_one_follows_the_distribution() -> None:
    counts = draw(SamplingParams(seed=1), logits_for([0.6, 0.3, 0.1]), n=3000)
    assert set(counts) == {0, 1, 2}
    for token, p in [(0, 0.6), (1, 0.3), (2, 0.1)]:
        assert abs(counts[token] / 3000 - p) < 0.03


def test_low_temperature_sharpens_and_zero_is_greedy() -> None:
    row = logits_for([0.4, 0.35, 0.25])
    expected = float(torch.softmax(row / 0.05, dim=0)[0])       # about 0.93 (0.4 at T=1)
    assert abs(draw(SamplingParams(temperature=0.05, seed=1), row, n=2000)[0] / 2000 - expected) < 0.02
    assert draw(SamplingParams(temperature=0.0), row) == Counter({0: 400})


def test_top_k_restricts_support() -> None:
    row = logits_for([0.3, 0.25, 0.2, 0.15, 0.1])
    assert set(draw(SamplingParams(top_k=2, seed=3), row)) == {0, 1}
    assert set(draw(SamplingParams(top_k=4, seed=3), row)) == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_prefix_holding_p() -> None:
    row = logits_for([0.5, 0.3, 0.15, 0.05])
    assert set(draw(SamplingParams(top_p=0.5, seed=3), row)) == {0}
    assert set(draw(SamplingParams(top_p=0.7, seed=3), row)) == {0, 1}
    assert set(draw(SamplingParams(top_p=0.9, seed=3), row)) == {0, 1, 2}
    # Applied after top-k, on the renormalised distribution: 0.5/0.8 < 0.7.
    assert set(draw(SamplingParams(top_k=2, top_p=0.7, seed=3), row)) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    row = logits_for([0.4, 0.3, 0.19, 0.11])
    assert set(draw(SamplingParams(min_p=0.5, seed=3), row)) == {0, 1}
    assert set(draw(SamplingParams(min_p=0.3, seed=3), row)) == {0, 1, 2}      # 0.11 < 0.12
    assert set(draw(SamplingParams(min_p=0.25, seed=3), row)) == {0, 1, 2, 3}  # 0.11 >= 0.1


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    row = torch.full((V,), -10.0)
    row[:4] = torch.tensor([2.0, 1.9, -0.5, -0.6])
    greedy = SamplingParams(temperature=0.0)
    penal = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    pick = lambda p, hist: Sampler(V).sample(row[None].clone(), [SampleRow(p, 0, 9, hist)])[0].token
    assert pick(greedy, [0]) == 0
    assert pick(penal, [0, 0, 7]) == 1          # 2.0 / 1.2 < 1.9
    assert pick(penal, [2]) == 0                # unseen best stays best
    # A negative logit is multiplied, pushing it further down.
    row[:4] = torch.tensor([-1.0, -1.1, -5.0, -6.0])
    assert pick(penal, [0]) == 1                # -1.2 < -1.1


def test_logprobs_are_the_raw_distribution() -> None:
    gen = torch.Generator().manual_seed(4)
    row = torch.randn(V, generator=gen)
    p = SamplingParams(temperature=0.5, top_k=3, seed=8, logprobs=4)
    out = Sampler(V).sample(row[None].clone(), [SampleRow(p, 8, 0)])[0]
    ref = torch.log_softmax(row, dim=0)
    assert out.token is not None and out.logprob is not None
    assert math.isclose(out.logprob, float(ref[out.token]), abs_tol=1e-5)
    top = ref.topk(4)
    assert [t for t, _ in out.top_logprobs] == top.indices.tolist()
    assert all(math.isclose(a, b, abs_tol=1e-5) for (_, a), b in zip(out.top_logprobs, top.values.tolist()))
    none = Sampler(V).sample(row[None].clone(), [SampleRow(SamplingParams(), 8, 0)])[0]
    assert none.top_logprobs == [] and none.logprob is not None


def test_padded_vocabulary_is_never_sampled_nor_counted() -> None:
    row = torch.zeros(V)
    row[45] = 100.0                              # padding the tokenizer cannot decode
    row[3] = 1.0
    out = Sampler(40).sample(torch.stack([row, row]), [
        SampleRow(SamplingParams(temperature=0.0, logprobs=1), 0, 0),
        SampleRow(SamplingParams(seed=1), 1, 0)])
    assert out[0].token == 3
    assert out[1].token is not None and out[1].token < 40
    assert out[0].logprob is not None
    expected = float(torch.log_softmax(row[:40], dim=0)[3])
    assert math.isclose(out[0].logprob, expected, abs_tol=1e-5)


def test_non_finite_logits_fail_only_their_row() -> None:
    rows = torch.randn(3, V)
    rows[1, 7] = float("nan")
    params = SamplingParams(temperature=0.0)
    out = Sampler(V).sample(rows.clone(), [SampleRow(params, 0, 0)] * 3)
    assert out[1].token is None and "non-finite" in (out[1].error or "")
    assert [out[0].token, out[2].token] == rows[[0, 2]].argmax(dim=1).tolist()


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_p", 0.0),
    ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0),
    ("seed", -1), ("seed", 2**63), ("logprobs", 21), ("logprobs", -1)])
def test_validate_names_the_bad_field(field: str, value: float) -> None:
    with pytest.raises(BadRequest) as err:
        SamplingParams(**{field: value}).validate()
    assert field in err.value.message and err.value.detail["field"] == field


def test_params_round_trip_on_the_wire() -> None:
    p = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05,
                       repetition_penalty=1.1, seed=42, logprobs=2)
    p.validate()
    data = msgspec.msgpack.encode(p)
    assert msgspec.msgpack.decode(data, type=SamplingParams) == p
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(SamplingParams()),
                                  type=SamplingParams) == SamplingParams()
