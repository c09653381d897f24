"""What a driver keeps of each sequence between steps (drivers/seq_table.py):
deltas made whole, and a `resend` for every delta it cannot make whole."""

from __future__ import annotations

import random

import msgspec

from drivers.checks import Limits, check_steps
from drivers.seq_table import SeqTable
from ipc import codec
from ipc.protocol import driver as dp
from ipc.protocol.sampling import SamplingParams

PENALTY = SamplingParams(temperature=0.0, repetition_penalty=1.3)


def run(table: SeqTable, msg: dp.Execute, errors: dict[int, str] | None = None) -> tuple[list[dp.StepSeq], list[int]]:
    """Expand and record as a driver does; returns the whole steps and the ids answered resend."""
    steps, resend = table.expand(msg)
    seen = [msgspec.structs.replace(s, prior_token_ids=list(s.prior_token_ids)) for s in steps]  # as run
    table.record(steps, [(errors or {}).get(s.seq_id) for s in steps])
    assert all(o.resend and o.error for o in resend)
    return seen, [o.seq_id for o in resend]


def test_a_delta_is_made_whole_from_the_kept_copy_with_its_history() -> None:
    t = SeqTable()
    steps, _ = run(t, dp.Execute([dp.StepSeq(7, [1, 2, 3, 4, 5], 0, [3, 9], True, PENALTY, [])], epoch="e"))
    steps, resend = run(t, dp.Execute(deltas=[dp.StepDelta(7, [11], 5, 2, [4])], epoch="e"))
    (s,) = steps
    assert resend == [] and (s.seq_id, s.token_ids, s.start_pos, s.block_table) == (7, [11], 5, [3, 9, 4])
    assert s.params == PENALTY and s.prior_token_ids == [1, 2, 3, 4, 5]
    # a copy-on-write replaces the last block
    (s,), _ = run(t, dp.Execute(deltas=[dp.StepDelta(7, [12], 6, 2, [8])], epoch="e"))
    assert s.block_table == [3, 9, 8] and s.prior_token_ids == [1, 2, 3, 4, 5, 11]


def test_unknown_desynchronised_or_out_of_range_deltas_are_answered_resend_and_run_nothing() -> None:
    t = SeqTable()
    run(t, dp.Execute([dp.StepSeq(1, [1, 2], 0, [0]), dp.StepSeq(2, [1, 2], 0, [1]),
                       dp.StepSeq(3, [1, 2], 0, [2])], epoch="e"))
    steps, resend = run(t, dp.Execute(deltas=[
        dp.StepDelta(99, [5], 0, 0),        # never sent
        dp.StepDelta(1, [5], 7, 1),         # starts past where the copy ends
        dp.StepDelta(2, [5], 2, 5, [4]),    # table_start past the copy's table
        dp.StepDelta(3, [5], 2, -1),        # negative table_start
    ], epoch="e"))
    assert steps == [] and resend == [99, 1, 2, 3]
    # each is forgotten: a later good-looking delta for it is refused too
    assert run(t, dp.Execute(deltas=[dp.StepDelta(1, [5], 2, 1)], epoch="e"))[1] == [1]


def test_a_failed_step_a_drop_and_a_new_epoch_each_forget_the_sequence() -> None:
    t = SeqTable()
    run(t, dp.Execute([dp.StepSeq(1, [1], 0, [0]), dp.StepSeq(2, [1], 0, [1]), dp.StepSeq(3, [1], 0, [2])],
                      epoch="e"), errors={2: "bad"})
    assert sorted(t.seqs) == [1, 3]
    assert run(t, dp.Execute(deltas=[dp.StepDelta(1, [2], 1, 1), dp.StepDelta(3, [2], 1, 1)], drop=[3],
                             epoch="e"))[1] == [3]
    # a restarted scheduler (new epoch) reuses ids: nothing old is trusted
    assert run(t, dp.Execute(deltas=[dp.StepDelta(1, [3], 2, 1)], epoch="f"))[1] == [1] and len(t) == 0


def test_a_full_step_replaces_what_the_driver_kept() -> None:
    t = SeqTable()
    run(t, dp.Execute([dp.StepSeq(1, [1, 2, 3], 0, [0], True, PENALTY, [])], epoch="e"))
    run(t, dp.Execute([dp.StepSeq(1, [9], 4, [5, 6], True, PENALTY, [7, 7, 7, 7])], epoch="e"))
    (s,), _ = run(t, dp.Execute(deltas=[dp.StepDelta(1, [8], 5, 2)], epoch="e"))
    assert s.block_table == [5, 6] and s.prior_token_ids == [7, 7, 7, 7, 9]


def test_the_wire_structs_are_untagged_arrays() -> None:
    d = codec.encode(dp.StepDelta(5, [42], 100, 7))
    assert len(d) <= 10 and b"seq_id" not in d  # [5, [42], 100, 7, [], true]: no names, no tag
    out = codec.encode(dp.SeqOutput(5, 42))
    assert len(out) <= 16 and b"SeqOutput" not in out


def test_a_step_made_whole_is_checked_as_a_full_check_would_in_bulk_or_not() -> None:
    # Random walks of full steps and deltas, good and bad (tokens or blocks out
    # of range, a block listed twice, a table too short, a history out of the
    # vocabulary, a duplicate id, two writing one block): checking only what
    # each delta adds (the driver's way) says exactly what a full check says.
    lim = Limits(vocab_size=10, max_model_len=24, num_blocks=40, block_size=4)
    rng = random.Random(15)
    for walk in range(120):
        t = SeqTable()
        held: dict[int, tuple[int, list[int]]] = {}  # seq_id -> (pos, table), as the scheduler sees it
        for _ in range(12):
            steps, deltas = [], []
            for sid in rng.sample(range(6), rng.randint(1, 6)):
                pos, table = held.get(sid, (0, []))
                n = 1 if pos and rng.random() < 0.8 else rng.randint(1, 6)
                ids = [rng.randrange(10) for _ in range(n)]
                if rng.random() < 0.05:
                    ids[-1] = rng.choice([10, -1])
                need = -(-(pos + n) // 4)
                new = [rng.randrange(40) for _ in range(max(0, need - len(table)))]
                cut = len(table)
                if table and rng.random() < 0.1:  # copy-on-write of the last block
                    cut -= 1
                    new.insert(0, rng.randrange(40))
                if new and rng.random() < 0.15:  # out of range, listed twice, or another's
                    others = [b for o, (_, tb) in held.items() if o != sid for b in tb[-1:]]
                    new[-1] = rng.choice([40, *table[:cut], *others])
                if new and rng.random() < 0.05:
                    new.pop()  # too short
                sample = rng.random() < 0.8
                whole = table[:cut] + new
                if sid not in held or rng.random() < 0.1:
                    params = PENALTY if sid % 2 else SamplingParams(temperature=0.0)
                    prior = [rng.randrange(11 if rng.random() < 0.1 else 10) for _ in range(pos)]
                    steps.append(dp.StepSeq(sid, ids, pos, list(whole), sample, params, prior))
                else:
                    deltas.append(dp.StepDelta(sid, ids, pos, cut, new, sample))
                held[sid] = (pos + n, whole)
            if rng.random() < 0.1 and deltas:
                deltas.append(deltas[0])
            whole_steps, trust, resend = t.expand_trusted(dp.Execute(steps, [], deltas, [], "e"))
            errors = check_steps(whole_steps, lim, trust)
            assert errors == check_steps(whole_steps, lim), walk
            t.record(whole_steps, errors)
            for o in resend:
                held.pop(o.seq_id, None)
            for s, e in zip(whole_steps, errors):
                if e:
                    held.pop(s.seq_id, None)


def test_a_chain_delta_runs_on_the_token_the_last_step_sampled() -> None:
    t = SeqTable()
    steps, _ = t.expand(dp.Execute([dp.StepSeq(7, [1, 2, 3], 0, [3], True, PENALTY, [])], epoch="e"))
    t.record(steps, [None], [42])
    # sent before the scheduler knew 42: no tokens, `chain`
    (s,), resend = t.expand(dp.Execute(deltas=[dp.StepDelta(7, [], 3, 1, [5], chain=True)], epoch="e"))
    assert resend == [] and (s.token_ids, s.start_pos, s.block_table) == ([42], 3, [3, 5])
    assert s.prior_token_ids == [1, 2, 3]  # a penalty reads the history up to the chained token
    t.record([s], [None], [43])
    (s,), _ = t.expand(dp.Execute(deltas=[dp.StepDelta(7, [], 4, 2, chain=True)], epoch="e"))
    assert s.token_ids == [43] and s.prior_token_ids == [1, 2, 3, 42]


def test_a_chain_delta_with_no_sampled_token_to_run_on_is_answered_resend() -> None:
    t = SeqTable()
    # a prefill chunk that sampled nothing; a step recorded without its tokens
    steps, _ = t.expand(dp.Execute([dp.StepSeq(1, [1, 2], 0, [3], False), dp.StepSeq(2, [1], 0, [4])], epoch="e"))
    t.record(steps, [None, None], [-1])
    _, resend = t.expand(dp.Execute(deltas=[dp.StepDelta(1, [], 2, 1, chain=True),
                                            dp.StepDelta(2, [], 1, 1, chain=True)], epoch="e"))
    assert [o.seq_id for o in resend] == [1, 2] and all(o.resend and "sampled no token" in o.error for o in resend)
    # a chain delta that carries tokens is malformed: resend, nothing runs
    steps, _ = t.expand(dp.Execute([dp.StepSeq(3, [1], 0, [5])], epoch="e"))
    t.record(steps, [None], [9])
    steps, resend = t.expand(dp.Execute(deltas=[dp.StepDelta(3, [9], 1, 1, chain=True)], epoch="e"))
    assert not steps and "carries no tokens" in resend[0].error
