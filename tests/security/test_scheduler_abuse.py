"""Issue 12, the scheduler's part, without sockets: the engine, its quota gate
and the job runner over fake paged drivers, attacked the way the review did.
The same attacks over real processes are in test_scheduler_abuse_live.py."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import msgspec
import pytest

from text.tokenizer import ByteTokenizer
from ipc import codec
from common.capability import RIGHTS, rights_cover
from ipc.errors import BadRequest, NotFound, Overloaded
from ipc.protocol import scheduler as sp
from ipc.protocol import jobs as jp
from ipc.protocol.sampling import SamplingParams
from ipc.protocol.security import Quota, QuotaPolicy
from common.config.scheduler import PolicyConfig, PolicyName, SchedulerConfig, TunerConfig
from services.scheduler.engine import CHARS_PER_TOKEN, Engine, Model
from services.scheduler import _admission
from services.scheduler._job_store import JobStore
from services.scheduler.jobs import JobRunner
from services.scheduler.quotas import QuotaGate
from tests.helpers.scheduler_fakes import FakeDriver, InProcessBackend, running

GREEDY = SamplingParams(temperature=0.0)
TOK = ByteTokenizer()


def idle_engine(config: SchedulerConfig) -> Engine:
    """An engine whose loop is not running: whatever is admitted stays queued."""
    backend = InProcessBackend({"cpu": FakeDriver(64)})
    engine = Engine(config, backend)
    engine.driver_up("cpu", backend.drivers["cpu"].meta)
    engine.set_model(Model(TOK, frozenset(TOK.eos_token_ids), 256))
    return engine


def claimed_resubmission(i: int) -> sp.Submit:
    """A Submit dressed as the re-submission of an accepted request."""
    return sp.Submit(prompt=f"p{i}", request_id=f"r{i}", attempt=1, resume_from=1, resume_ids=[104])


def count_refused(engine: Engine, principal: str, msgs: Sequence[sp.Submit]) -> int:
    refused = 0
    for m in msgs:
        try:
            engine.submit(m, principal, lambda ev: None)
        except Overloaded:
            refused += 1
    return refused


# -- #3 re-submission is the scheduler's call, not the client's -------------------------

def test_claimed_resubmissions_hit_the_global_waiting_cap() -> None:
    engine = idle_engine(SchedulerConfig(max_waiting=256))
    refused = count_refused(engine, "", [claimed_resubmission(i) for i in range(2000)])
    assert refused == 2000 - 256 and len(engine.state.waiting) == 256
    # A request the scheduler does know still re-attaches, queue full or not.
    assert engine.submit(claimed_resubmission(0), "", lambda ev: None).attached


def test_one_principal_gets_a_share_of_the_queue_and_others_still_get_in() -> None:
    engine = idle_engine(SchedulerConfig(max_waiting=256, max_waiting_share=0.5))
    assert count_refused(engine, "mallory", [claimed_resubmission(i) for i in range(2000)]) == 2000 - 128
    with pytest.raises(Overloaded, match="share"):
        engine.submit(sp.Submit(prompt="one more"), "mallory", lambda ev: None)
    engine.submit(sp.Submit(prompt="honest"), "bob", lambda ev: None)  # not refused


def test_a_concurrency_quota_of_one_admits_one_of_ten_claimed_resubmissions() -> None:
    engine = idle_engine(SchedulerConfig())
    gate = QuotaGate()
    gate.apply(QuotaPolicy(1, {"alice": Quota(concurrent_requests=1)}))
    refused = 0
    for i in range(10):
        sink = engine.submit(claimed_resubmission(i), "alice", lambda ev: None)
        assert not sink.attached  # unknown ids: new requests, whatever they claim
        try:
            gate.charge("alice", sink.request)
        except Overloaded:
            refused += 1
    assert refused == 9


async def test_a_charge_lasts_as_long_as_the_request_not_the_stream() -> None:
    """Re-attaching a second stream to a running request (and dropping the
    first) must not give its concurrency slot back."""
    gate = QuotaGate()
    gate.apply(QuotaPolicy(1, {"alice": Quota(concurrent_requests=1)}))
    async with running() as (engine, backend):
        backend.hold_steps = anyio.Event()  # nothing finishes until released
        first = engine.submit(sp.Submit(prompt="long", request_id="a", params=GREEDY, max_tokens=20), "alice",
                              lambda ev: None)
        gate.charge("alice", first.request)
        again = engine.submit(sp.Submit(prompt="long", request_id="a", params=GREEDY, max_tokens=20,
                                        resume_from=0, attempt=1), "alice", lambda ev: None)
        assert again.attached and first.superseded
        other = engine.submit(sp.Submit(prompt="second", request_id="b"), "alice", lambda ev: None)
        with pytest.raises(Overloaded, match="concurrent_requests|already runs"):
            gate.charge("alice", other.request)
        engine.cancel("alice", "b")
        backend.hold_steps.set()
        with anyio.fail_after(10):
            await again.wait()
        # Finished: the slot is back.
        gate.charge("alice", engine.submit(sp.Submit(prompt="third", request_id="c", params=GREEDY, max_tokens=2),
                                           "alice", lambda ev: None).request)


# -- #4 the prompt's size is checked before anything reads it ---------------------------

class CountingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.encoded_chars = 0

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self.encoded_chars += len(text)
        return super().encode(text, add_special_tokens=add_special_tokens)


def test_a_huge_prompt_is_refused_before_it_is_tokenized() -> None:
    tok = CountingTokenizer()
    engine = idle_engine(SchedulerConfig())
    engine.set_model(Model(tok, frozenset(tok.eos_token_ids), 256))
    huge = sp.Submit(prompt="x" * (20 * 2**20))
    with pytest.raises(BadRequest, match=f"at most {256 * CHARS_PER_TOKEN}") as info:
        engine.submit(huge, "mallory", lambda ev: None)
    assert info.value.detail["field"] == "prompt" and tok.encoded_chars == 0
    # Just under the bound it is tokenized, and refused on its token count.
    with pytest.raises(BadRequest, match="tokens"):
        engine.submit(sp.Submit(prompt="x" * (256 * CHARS_PER_TOKEN)), "mallory", lambda ev: None)


# -- lows: bounded integers, vocabulary ------------------------------------------------

@pytest.mark.parametrize("field, value", [("max_tokens", 2**64 - 1), ("max_tokens", 2**21),
                                          ("priority", -2**62), ("priority", 2**63), ("top_k", 2**64 - 1),
                                          ("deadline_ns", 2**64 - 1), ("prompt_ids", [2**40])])
def test_out_of_range_integers_are_refused_at_decode_naming_the_field(field: str, value: object) -> None:
    raw = msgspec.to_builtins(sp.Submit(prompt_ids=[1, 2]))
    assert isinstance(raw, list)
    names = list(sp.Submit.__struct_fields__)
    if field == "top_k":
        raw[1 + names.index("params")][1 + list(SamplingParams.__struct_fields__).index("top_k")] = value
    else:
        raw[1 + names.index(field)] = value  # [0] is the tag
    # (ipc.codec names the top-level field: top_k is inside `params`, and the bound says which)
    want = "params.*|.*2147483647" if field == "top_k" else field
    with pytest.raises(BadRequest, match=want):
        codec.decode_body(codec.decoder([sp.Submit]), msgspec.msgpack.encode(raw), "Submit body")


def test_out_of_vocabulary_ids_are_refused_at_submit() -> None:
    engine = idle_engine(SchedulerConfig())
    for msg, field in [(sp.Submit(prompt_ids=[1, 258]), "prompt_ids"),
                       (sp.Submit(prompt_ids=[1, 2], request_id="r", resume_from=1, resume_ids=[10**6]),
                        "resume_ids")]:
        with pytest.raises(BadRequest, match="vocabulary") as info:
            engine.submit(msg, "mallory", lambda ev: None)
        assert info.value.detail["field"] == field
    assert not engine.state.waiting


@pytest.mark.parametrize("field, n", [("prompt_ids", sp.MAX_PROMPT_IDS + 1),
                                      ("stop_token_ids", sp.MAX_STOP_IDS + 1),
                                      ("resume_ids", sp.MAX_TOKENS_LIMIT + 1)])
def test_id_lists_are_bounded_at_decode(field: str, n: int) -> None:
    """Review finding: 8M prompt ids per Submit were looped over before any
    length check (the scheduler missed heartbeats and was killed), and 1.6M
    stop ids became a 135 MB frozenset per request."""
    raw = msgspec.to_builtins(sp.Submit(prompt_ids=[1, 2]))
    raw[1 + list(sp.Submit.__struct_fields__).index(field)] = [1] * n
    with pytest.raises(BadRequest, match=field):
        codec.decode_body(codec.decoder([sp.Submit]), msgspec.msgpack.encode(raw), "Submit body")


def test_prompt_ids_past_the_context_are_refused_before_any_is_looked_at(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = idle_engine(SchedulerConfig())

    def no_loop(*args: object) -> None:
        raise AssertionError("the ids were looped over before the length check")
    monkeypatch.setattr(_admission, "check_ids", no_loop)
    with pytest.raises(BadRequest, match="at most 255") as info:
        engine.submit(sp.Submit(prompt_ids=[1] * 100_000), "mallory", lambda ev: None)
    assert info.value.detail["field"] == "prompt_ids" and not engine.state.waiting


def test_only_the_priority_and_admin_rights_cover_the_privileged_ops() -> None:
    """The kernel checks rights per op: these ops must match no other right's pattern."""
    for op, allowed in [("PrioritySubmit", {"priority", "admin"}), ("AdminList", {"admin"}),
                        ("AdminCancel", {"admin"})]:
        assert {r for r in RIGHTS if rights_cover([r], "scheduler", op)} == allowed, op


# -- #12 fairness by default -------------------------------------------------------------

async def finish_order(config: SchedulerConfig) -> tuple[int, int]:
    """300 requests of one tenant queued, then one of another: how many of the
    flood's finished before the honest one, of how many."""
    order: list[str] = []
    async with running(config, {"cpu": FakeDriver(256)}) as (engine, _):
        sinks = [engine.submit(sp.Submit(prompt=f"flood {i}", params=GREEDY, max_tokens=4, ignore_eos=True),
                               "flood", lambda ev: None) for i in range(300)]
        honest = engine.submit(sp.Submit(prompt="honest", params=GREEDY, max_tokens=4, ignore_eos=True),
                               "honest", lambda ev: None)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for name, sink in [*(("flood", s) for s in sinks), ("honest", honest)]:
                    async def wait(name: str = name, sink: object = sink) -> None:
                        await sink.wait()  # type: ignore[attr-defined]
                        order.append(name)
                    tg.start_soon(wait)
    return order.index("honest"), len(order)


async def test_the_default_policy_serves_another_tenant_ahead_of_a_flood() -> None:
    config = SchedulerConfig(max_waiting=1024, max_num_seqs=8)
    assert config.policy.name == PolicyName.FAIR
    before, total = await finish_order(config)
    assert total == 301 and before <= 16  # within the first two batches
    # The control: first come, first served, it waits for the whole flood. With the tuner off: on a
    # machine slow enough for the flood to pass its first-token objective, the tuner's late-last
    # rule (issue 19) rightly starts the honest request, still within its own, ahead of the late
    # ones (CI saw it finish after 135 of the flood), which is not what this control is about.
    fcfs_before, _ = await finish_order(SchedulerConfig(max_waiting=1024, max_num_seqs=8,
                                                        policy=PolicyConfig(name=PolicyName.FCFS),
                                                        tuner=TunerConfig(enabled=False)))
    assert fcfs_before >= 290


# -- #10 jobs: revocation, per-principal ids, pruning, the operator's view ----------------

def periodic(job_id: str, prompt: str = "tick") -> jp.SubmitJob:
    return jp.SubmitJob(sp.Submit(prompt, params=GREEDY, max_tokens=2, ignore_eos=True), every_s=0.1,
                        job_id=job_id)


async def test_a_revoked_principals_jobs_stop_and_are_cancelled_for_good(tmp_path: Path) -> None:
    async with running() as (engine, _):
        r = JobRunner(engine, JobStore(tmp_path))
        await r.load()
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.run)
            await r.submit(periodic("daily"), "mallory")
            await r.submit(periodic("daily"), "bob")
            with anyio.fail_after(10):
                while (await r.get("mallory", "daily", 0)).runs < 1:
                    await anyio.sleep(0.01)
            await r.revoke(frozenset({"mallory"}))
            info = await r.get("mallory", "daily", 0)
            assert info.state in (jp.JobState.CANCELLED, jp.JobState.RUNNING) and "revoked" in info.error
            runs = info.runs
            bob_runs = (await r.get("bob", "daily", 0)).runs
            with anyio.fail_after(10):  # bob's job goes on ...
                while (await r.get("bob", "daily", 0)).runs < bob_runs + 3:
                    await anyio.sleep(0.01)
            # ... mallory's does not (at most the run in flight at revocation ends).
            final = await r.get("mallory", "daily", 0)
            assert final.state == jp.JobState.CANCELLED and final.runs <= runs + 1
            tg.cancel_scope.cancel()
    # Still cancelled for the next scheduler.
    r2 = JobRunner(engine, JobStore(tmp_path))
    await r2.load()
    assert (await r2.get("mallory", "daily", 0)).state == jp.JobState.CANCELLED


async def test_job_ids_are_per_principal_and_finished_jobs_are_pruned(tmp_path: Path) -> None:
    async with running() as (engine, _):
        r = JobRunner(engine, JobStore(tmp_path), max_finished=2)
        far = time.time_ns() + 10**15
        a = await r.submit(jp.SubmitJob(sp.Submit("alice's"), at_ns=far, job_id="daily"), "alice")
        # bob's "daily" is his own: no squatting, no "in use" leak, no view of alice's
        b = await r.submit(jp.SubmitJob(sp.Submit("bob's"), at_ns=far, job_id="daily"), "bob")
        assert a.job_id == b.job_id == "daily"
        assert [j.job_id for j in r.list("bob").jobs] == ["daily"]
        await r.cancel("bob", "daily")
        assert (await r.get("alice", "daily", 0)).state == jp.JobState.SCHEDULED
        with pytest.raises(NotFound):
            await r.get("carol", "daily", 0)
        # The operator's view names the owners.
        assert sorted((j.principal, j.state) for j in r.list_all().jobs) == [
            ("alice", jp.JobState.SCHEDULED), ("bob", jp.JobState.CANCELLED)]
        for i in range(5):
            await r.submit(jp.SubmitJob(sp.Submit(f"j{i}"), at_ns=far, job_id=f"j{i}"), "bob")
            await r.cancel("bob", f"j{i}")
        kept = sorted(j.job_id for j in r.list("bob").jobs)
        assert kept == ["j3", "j4"]  # the two newest finished ones
        assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 3  # alice's + bob's two
