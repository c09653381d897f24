"""The checker on hand-made histories: each contract breach is caught, and a
clean history passes (no sockets, no processes)."""

from __future__ import annotations

from tools.chaos.checker import Reference, check
from tools.chaos.faults import plan_faults
from tools.chaos.history import Fault, FaultKind, History, Op, OpKind, Via

REF = Reference(sdk_ids={0: [1, 2, 3, 4]}, http_text={0: "abcd"})


def text_of(prompt: int, ids: list[int]) -> str:
    return "".join(chr(ord("a") + i - 1) for i in ids)


def history(*ops: Op, faults: tuple[Fault, ...] = ()) -> History:
    h = History()
    h.ops = list(ops)
    h.faults = list(faults)
    return h


def invoke(t: float, req: str = "r", via: Via = Via.SDK, greedy: bool = True) -> Op:
    return Op(t, OpKind.INVOKE, req, "c", via=via, prompt=0, max_tokens=4, greedy=greedy)


def chunk(t: float, offset: int, ids: list[int], req: str = "r") -> Op:
    return Op(t, OpKind.CHUNK, req, "c", offset=offset, token_ids=ids, text=text_of(0, ids))


def ok(t: float, offset: int, ids: list[int], req: str = "r", n: int = 4) -> Op:
    return Op(t, OpKind.OK, req, "c", offset=offset, token_ids=ids, text=text_of(0, ids), finish_reason="length",
              completion_tokens=n)


def test_a_clean_history_holds() -> None:
    v = check(history(invoke(0), chunk(1, 0, [1, 2]), ok(2, 2, [3, 4])), REF, text_of)
    assert v.holds and v.ok == 1 and v.greedy_unfaulted_equal == 1


def test_each_breach_is_caught() -> None:
    never_ended = history(invoke(0), chunk(1, 0, [1, 2]))
    assert check(never_ended, REF, text_of).lost == ["r"]
    twice = history(invoke(0), chunk(1, 0, [1, 2]), ok(2, 2, [3, 4]), ok(3, 2, [3, 4]))
    assert check(twice, REF, text_of).duplicated == ["r"]
    repeat = history(invoke(0), chunk(1, 0, [1, 2]), ok(2, 1, [2, 3, 4], n=4))
    assert check(repeat, REF, text_of).offset_errors
    bad_text = history(invoke(0), chunk(1, 0, [1, 2]), Op(2, OpKind.OK, "r", "c", offset=2, token_ids=[3, 4],
                                                           text="zz", finish_reason="length", completion_tokens=4))
    assert check(bad_text, REF, text_of).text_errors == ["r"]
    wrong_answer = history(invoke(0), chunk(1, 0, [1, 2]), ok(2, 2, [3, 5]))
    assert check(wrong_answer, REF, text_of).greedy_mismatch == ["r"]
    failed_after_accepted = history(invoke(0), chunk(1, 0, [1]), Op(2, OpKind.FAIL, "r", "c", code="unavailable"))
    assert check(failed_after_accepted, REF, text_of).lost == ["r"]
    assert not check(history(), REF, text_of, leaked_pids=[123]).holds
    assert not check(history(), REF, text_of, kernel_restarted=True).holds


def test_what_the_contract_allows() -> None:
    refused = history(invoke(0), Op(1, OpKind.FAIL, "r", "c", code="overloaded"))
    v = check(refused, REF, text_of)
    assert v.holds and v.failed == {"overloaded": 1}
    gateway_kill = Fault(1.0, "gateway", "gateway", FaultKind.KILL, t=1.0, pid=9, ready_t=1.5)
    cut = history(invoke(0, via=Via.HTTP), Op(0.5, OpKind.CHUNK, "r", "c", text="ab"),
                  Op(1.1, OpKind.UNKNOWN, "r", "c", code="stream_cut"), faults=(gateway_kill,))
    assert check(cut, REF, text_of).holds
    uncaused = history(invoke(0, via=Via.HTTP), Op(0.5, OpKind.CHUNK, "r", "c", text="ab"),
                       Op(1.1, OpKind.UNKNOWN, "r", "c", code="stream_cut"))
    assert check(uncaused, REF, text_of).lost == ["r"]
    # A greedy request a fault overlapped may differ from the reference; it is counted, not failed.
    driver_kill = Fault(1.0, "cpu", "driver", FaultKind.KILL, t=1.0, pid=9, ready_t=3.0)
    v = check(history(invoke(0), chunk(0.5, 0, [1, 2]), ok(4, 2, [3, 5]), faults=(driver_kill,)), REF, text_of)
    assert v.holds and v.greedy_faulted == 1 and v.greedy_faulted_equal == 0


def test_an_http_stream_resumed_after_a_cut_is_one_request_and_is_counted() -> None:
    from tools.chaos.figures import http_figures

    http = lambda t, kind, **kw: Op(t, kind, "h", "c", **kw)  # noqa: E731
    resumed = history(invoke(0, req="h", via=Via.HTTP), http(0.5, OpKind.CHUNK, text="ab"),
                      http(1.1, OpKind.RETRY, code="stream_cut", offset=2),
                      http(1.3, OpKind.CHUNK, offset=1, text="cd"),
                      http(1.4, OpKind.OK, offset=2, finish_reason="length", completion_tokens=4),
                      invoke(2, req="g", via=Via.HTTP, greedy=False), Op(2.1, OpKind.RETRY, "g", "c", code="connect"),
                      Op(2.5, OpKind.OK, "g", "c", finish_reason="length", completion_tokens=0))
    v = check(resumed, REF, text_of)
    assert v.holds and v.ok == 2 and v.greedy_unfaulted_equal == 1  # "ab" + "cd": the reference
    assert http_figures(resumed) == {"requests": 2, "connect_errors": 1, "refused_at_connect": 0,
                                     "incomplete_streams": 0, "reconnections": 2, "resumed_streams": 1,
                                     "retried_from_start": 1}


def test_the_fault_schedule_is_seeded_and_covers_every_target() -> None:
    targets = {"security": "security", "memory": "memory", "cpu": "driver", "scheduler": "scheduler",
               "gateway": "gateway"}
    a, b = plan_faults(7, 60, targets), plan_faults(7, 60, targets)
    assert a == b and a != plan_faults(8, 60, targets)
    assert len(a) >= 20 and {f.instance for f in a} == set(targets)
    for inst in targets:
        times = [f.planned_s for f in a if f.instance == inst]
        assert all(t2 - t1 >= 3.0 for t1, t2 in zip(times, times[1:])), "faults respect the restart intensity"
