"""ModelRunner: mixed batches, per-sequence errors, block copies and swaps."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from drivers.model.errors import InvalidStep
from drivers.model.runner import ModelRunner
from drivers.model.step import SeqResult
from ipc.protocol.driver import StepSeq
from ipc.protocol.sampling import SamplingParams
from tests.helpers.stacks import EXACT_DTYPE
from tests.helpers.model_fixtures import make_checkpoint, recording

BS = 4
GREEDY = SamplingParams(temperature=0.0, logprobs=5)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, logprobs=5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    make_checkpoint(path, "llama", sharp=True, seed=2)
    return path


def load(path: Path, **kw: object) -> ModelRunner:
    kw.setdefault("dtype", EXACT_DTYPE)  # exact comparisons (tests/helpers/stacks.py)
    return ModelRunner.load(str(path), kv_cache_bytes=1 << 20, block_size=BS, **kw)  # type: ignore[arg-type]


def assert_same(a: SeqResult, b: SeqResult) -> None:
    assert a.error is None and b.error is None, (a.error, b.error)
    assert a.token == b.token
    assert a.logprob is not None and b.logprob is not None
    assert math.isclose(a.logprob, b.logprob, abs_tol=1e-5)
    assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    for (_, x), (_, y) in zip(a.top_logprobs, b.top_logprobs):
        assert math.isclose(x, y, abs_tol=1e-5)


def run_alone(runner: ModelRunner, seq_id: int, prompt: list[int], table: list[int],
              params: SamplingParams, decodes: int) -> list[SeqResult]:
    """The prompt in one step, then `decodes` steps feeding back each token."""
    out = runner.execute([StepSeq(seq_id, prompt, 0, table, params=params)])
    results = [out[0]]
    for k in range(decodes):
        assert results[-1].token is not None
        step = StepSeq(seq_id, [results[-1].token], len(prompt) + k, table, params=params)
        results.append(runner.execute([step])[0])
    return results


@pytest.mark.parametrize("kernel", ["bag", "gather"])
def test_mixed_batch_matches_each_sequence_alone(ckpt: Path, kernel: str) -> None:
    prompts = {1: list(range(40, 45)), 2: list(range(60, 73)), 3: list(range(80, 110)),
               4: [7, 8]}
    params = {1: GREEDY, 2: SEEDED, 3: GREEDY, 4: SamplingParams(temperature=1.0, seed=3)}
    tables = {1: [3, 9, 12], 2: [14, 1, 22, 6, 30], 3: [2, 17, 25, 11, 5, 19, 27, 8, 31, 13],
              4: [20, 4, 26]}
    alone = load(ckpt, decode_kernel=kernel)
    expected = {s: run_alone(alone, s, prompts[s], tables[s], params[s], 6) for s in prompts}

    runner = load(ckpt, decode_kernel=kernel)
    got: dict[int, list[SeqResult]] = {s: [] for s in prompts}
    pending = {s: 0 for s in prompts}          # prompt tokens fed so far

    def step_for(s: int, chunk: int) -> StepSeq | None:
        done, prompt = pending[s], prompts[s]
        if done < len(prompt):
            hi = min(len(prompt), done + chunk)
            pending[s] = hi
            return StepSeq(s, prompt[done:hi], done, tables[s], sample=hi == len(prompt),
                           params=params[s])
        if len(got[s]) > 6:
            return None
        pos = len(prompt) + len(got[s]) - 1
        return StepSeq(s, [got[s][-1].token], pos, tables[s], params=params[s])  # type: ignore[list-item]

    # Sequence 3 prefills in chunks of 8 while the others decode; sequence 4
    # joins late. Each step holds prefill chunks and decodes together.
    schedule = [(1, 2, 3), (1, 2, 3), (1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4),
                (1, 2, 3, 4), (1, 2, 3, 4), (2, 3, 4), (3, 4), (3,), (3,)]
    for members in schedule:
        steps = [st for s in members if (st := step_for(s, 8)) is not None]
        for res in runner.execute(steps):
            if res.token is not None or res.error is not None:
                got[res.seq_id].append(res)
    for s in prompts:
        assert len(got[s]) == 7, s
        for a, b in zip(got[s], expected[s]):
            assert_same(a, b)


def test_bad_sequences_fail_alone_and_the_rest_run(ckpt: Path) -> None:
    runner = load(ckpt)
    good_alone = load(ckpt).execute([StepSeq(1, [5, 6, 7], 0, [0], params=GREEDY)])[0]
    max_len, vocab, blocks = runner.info.max_model_len, runner.info.vocab_size, runner.info.num_blocks
    bad = {
        2: (StepSeq(2, [], 0, [1]), "empty token_ids"),
        3: (StepSeq(3, [1, 2], max_len - 1, list(range(2, 2 + max_len // BS + 1))),
            "exceeds the context window"),
        4: (StepSeq(4, [1, vocab], 0, [3]), f"token id {vocab} is out of the vocabulary"),
        5: (StepSeq(5, [1, 2], 0, [-1]), "block id -1 is not one of this driver's blocks"),
        6: (StepSeq(6, [1, 2], 0, [blocks]), f"block id {blocks} is not one of"),
        7: (StepSeq(7, [1, 2, 3, 4, 5], 0, [4]), "block table has 1 blocks"),
        8: (StepSeq(8, [1], 0, [5], params=SamplingParams(top_p=0.0)), "top_p"),
        9: (StepSeq(9, [1], 3, [6], params=SamplingParams(repetition_penalty=1.3)),
            "needs prior_token_ids"),
        10: (StepSeq(10, [1, 2], -1, [7]), "start_pos -1 is negative"),
        11: (StepSeq(11, [1, 2], 0, [0]), "seq_id 1 also writes"),   # block 0 is seq 1's
    }
    steps = [StepSeq(1, [5, 6, 7], 0, [0], params=GREEDY)] + [s for s, _ in bad.values()]
    steps.append(StepSeq(1, [9], 0, [8]))                           # duplicate seq_id
    results = runner.execute(steps)
    assert [r.seq_id for r in results] == [s.seq_id for s in steps]
    assert_same(results[0], good_alone)
    for res, (seq_id, (_, why)) in zip(results[1:], bad.items()):
        assert res.seq_id == seq_id and res.token is None
        assert res.error is not None and why.split(" also")[0] in res.error, (seq_id, res.error)
    assert results[-1].error is not None and "appears more than once" in results[-1].error


def test_non_sequence_input_is_rejected_as_a_whole(ckpt: Path) -> None:
    with pytest.raises(InvalidStep, match="StepSeq"):
        load(ckpt).execute([("not", "a", "step")])  # type: ignore[list-item]


@pytest.mark.parametrize("kernel", ["bag", "gather"])
def test_nan_logits_fail_one_sequence_and_stale_nan_never_leaks(ckpt: Path, kernel: str) -> None:
    runner = load(ckpt, decode_kernel=kernel)
    clean = load(ckpt, decode_kernel=kernel)
    a = [StepSeq(1, [10, 11, 12, 13, 14], 0, [0, 1], params=GREEDY)]
    b = [StepSeq(2, [20, 21, 22], 0, [2], params=GREEDY)]
    runner.execute(a + b)
    expected_b = clean.execute(b)[0]
    # Poison sequence 1's KV; block 3's slots are stale garbage nobody owns.
    runner.cache.k[:, 0] = float("nan")
    runner.cache.v[:, 0] = float("nan")
    runner.cache.k[:, 3] = float("nan")
    runner.cache.v[:, 3] = float("nan")
    out = runner.execute([StepSeq(1, [15], 5, [0, 1], params=GREEDY),
                          StepSeq(3, [30, 31], 0, [3], params=GREEDY)])
    assert out[0].token is None and "non-finite" in (out[0].error or "")
    # Sequence 3 wrote slots 0-1 of block 3; slots 2-3 still hold NaN.
    assert_same(out[1], clean.execute([StepSeq(3, [30, 31], 0, [3], params=GREEDY)])[0])
    b_next = StepSeq(2, [expected_b.token], 3, [2], params=GREEDY)  # type: ignore[list-item]
    assert_same(runner.execute([b_next])[0], clean.execute([b_next])[0])


def test_copy_blocks_gives_a_fork_the_same_context(ckpt: Path) -> None:
    runner = load(ckpt)
    prompt = list(range(100, 110))                     # 10 tokens: blocks 0, 1 full, 2 half
    first = runner.execute([StepSeq(1, prompt, 0, [0, 1, 2], params=GREEDY)])[0]
    runner.copy_blocks([(2, 7)])                       # copy-on-write of the shared last block
    assert first.token is not None
    a = runner.execute([StepSeq(1, [first.token], 10, [0, 1, 2], params=GREEDY)])[0]
    b = runner.execute([StepSeq(2, [first.token], 10, [0, 1, 7], params=GREEDY)])[0]
    assert_same(a, b)
    with pytest.raises(InvalidStep, match="not in"):
        runner.copy_blocks([(0, runner.info.num_blocks)])
    with pytest.raises(InvalidStep, match="twice"):
        runner.copy_blocks([(0, 5), (1, 5)])


@pytest.mark.parametrize("tier", ["bytes", "ram", "disk"])
def test_swap_out_and_in_restores_the_context(ckpt: Path, tmp_path: Path, tier: str) -> None:
    path = tmp_path / "swap.bin" if tier == "disk" else None
    runner = load(ckpt, host_tier_slots=4, host_tier_path=path)
    reference = load(ckpt)
    prompt = list(range(50, 57))
    first = runner.execute([StepSeq(1, prompt, 0, [4, 5], params=GREEDY)])[0]
    reference.execute([StepSeq(1, prompt, 0, [4, 5], params=GREEDY)])
    if tier == "bytes":
        image = runner.swap_out([4, 5])
        assert image.shape == (2, runner.info.block_nbytes)
        runner.execute([StepSeq(9, list(range(8)), 0, [4, 5])])     # blocks reused meanwhile
        runner.swap_in([10, 11], bytes(image))
    else:
        runner.swap_out_to_host([4, 5], [3, 0])
        runner.execute([StepSeq(9, list(range(8)), 0, [4, 5])])
        runner.swap_in_from_host([3, 0], [10, 11])
        if path is not None:
            assert path.stat().st_size == 4 * runner.info.block_nbytes
    assert first.token is not None
    step = StepSeq(1, [first.token], 7, [10, 11], params=GREEDY)
    assert_same(runner.execute([step])[0],
                reference.execute([StepSeq(1, [first.token], 7, [4, 5], params=GREEDY)])[0])
    with pytest.raises(InvalidStep):
        runner.swap_in([1], b"short")
    runner.close()
    if path is not None:
        assert not path.exists()


def test_host_tier_calls_need_a_tier_and_valid_slots(ckpt: Path) -> None:
    with pytest.raises(InvalidStep, match="no host swap tier"):
        load(ckpt).swap_out_to_host([0], [0])
    runner = load(ckpt, host_tier_slots=2)
    with pytest.raises(InvalidStep, match="slot 2 is not in"):
        runner.swap_out_to_host([0], [2])
    with pytest.raises(InvalidStep, match="block ids but"):
        runner.swap_in_from_host([0, 1], [0])


def test_host_tier_sized_in_bytes_holds_that_many_whole_blocks(ckpt: Path) -> None:
    probe = load(ckpt)
    runner = load(ckpt, host_tier_bytes=5 * probe.info.block_nbytes + 1)
    assert runner.info.host_slots == 5
    assert load(ckpt, host_tier_bytes=probe.info.block_nbytes - 1).info.host_slots == 0


def test_info_health_and_worker_thread(ckpt: Path) -> None:
    runner = load(ckpt)
    info = runner.info
    assert info.num_blocks == (1 << 20) // info.block_nbytes
    # 2 layers x (K + V) x 2 kv heads x 16 dims x 4 slots x 4 bytes
    assert info.block_nbytes == 2 * 2 * 2 * 16 * BS * 4
    assert (info.vocab_size, info.sampleable_vocab, info.eos_token_ids) == (300, 280, (279,))
    with ThreadPoolExecutor(1) as pool:
        res = pool.submit(runner.execute, [StepSeq(1, [1, 2, 3], 0, [0], sample=False)]).result()
    assert res == [SeqResult(1)]
    health = runner.health()
    assert health.ok and health.steps == 1 and health.tokens == 3
    # Health answers while a step holds the runner (here: a held lock).
    with runner._lock:
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(runner.health).result(timeout=30).ok


def test_kv_cache_smaller_than_a_block_is_refused(ckpt: Path) -> None:
    from ipc.errors import BadRequest

    with pytest.raises(BadRequest, match="less than one KV block"):
        ModelRunner.load(str(ckpt), kv_cache_bytes=100)


def test_unseeded_sampling_differs_between_runners(ckpt: Path) -> None:
    """No seed: each runner has its own random stream (with a seed, the
    mixed-batch test shows results are reproducible)."""
    prompt = list(range(60, 70))
    hot = SamplingParams(temperature=5.0)
    draws = [tuple(r.token for r in run_alone(load(ckpt), 1, prompt, [0, 1, 2, 3, 4], hot, 8))
             for _ in range(2)]
    assert draws[0] != draws[1]


def test_seeded_sampling_is_reproducible_across_runners(ckpt: Path) -> None:
    prompt = list(range(60, 70))
    hot = SamplingParams(temperature=5.0, seed=99)
    draws = [tuple(r.token for r in run_alone(load(ckpt), 1, prompt, [0, 1, 2, 3, 4], hot, 8))
             for _ in range(2)]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 3


def test_repetition_penalty_sees_prior_tokens(ckpt: Path) -> None:
    runner = load(ckpt)
    rec = recording(runner)
    gen = torch.Generator().manual_seed(0)
    # Find a context whose greedy next token already occurs in it.
    for _ in range(50):
        prompt = torch.randint(0, 256, (40,), generator=gen).tolist()
        base = runner.execute([StepSeq(1, prompt, 0, list(range(10)), params=GREEDY)])[0]
        if base.token in prompt:
            break
    assert base.token in prompt
    penal = SamplingParams(temperature=0.0, repetition_penalty=3.0)
    runner.execute([StepSeq(2, prompt[:-1], 0, list(range(10, 20)), sample=False)])
    rec.logits.clear()
    out = runner.execute([StepSeq(2, prompt[-1:], 39, list(range(10, 20)), params=penal,
                                  prior_token_ids=prompt[:-1])])[0]
    logits = rec.logits[0][:runner.info.sampleable_vocab].clone()
    seen = torch.tensor(sorted(set(prompt)))
    vals = logits[seen]
    logits[seen] = torch.where(vals > 0, vals / 3.0, vals * 3.0)
    assert out.token == int(logits.argmax()) != base.token
