"""Hostile frames against a live kernel: every one is answered or dropped, and
the kernel keeps serving everyone else (hypothesis-generated)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header
from ipc.errors import Error, ErrorCode
from common.home import back_endpoint, front_endpoint, logs_dir
from ipc.protocol.echo import Echo, EchoReply
from ipc.protocol.kernel import Ready
from sdk.client import Client
from kernel.config import ChildSpec, Config, KernelConfig
from tools.testing import REPO_ROOT, write_config

ANSWER_CODES = {ErrorCode.BAD_REQUEST, ErrorCode.UNAUTHORIZED, ErrorCode.NOT_FOUND}


@pytest.fixture(scope="module")
def kernel_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="llmos-fuzz-", dir="/tmp"))
    log = open(home / "kernel.stderr", "wb")
    # The routing layer under fuzz, without the capability check (tests/integration/
    # test_security.py sends hostile tokens to a kernel with it).
    cfg = write_config(home / "llmos.toml", Config(kernel=KernelConfig(auth=False),
                                                   children=[ChildSpec("echo", "services.echo")]))
    proc = subprocess.Popen([sys.executable, "-m", "kernel", "--home", str(home), "--config", str(cfg)],
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=log, stderr=log)
    end = time.monotonic() + 30
    with Client.connect(home=home) if _wait_socket(home, end) else _fail() as c:
        while not any(i.state == "ready" for i in c.status().instances):
            assert time.monotonic() < end, "echo never became ready"
            time.sleep(0.05)
    yield home
    assert proc.poll() is None, "the kernel died during fuzzing"
    with Client.connect(home=home) as c:
        c.shutdown("fuzz done")
    assert proc.wait(30) == 0
    log.close()


def _wait_socket(home: Path, end: float) -> bool:
    sock = Path(front_endpoint(home)[len("ipc://"):])
    while not sock.exists():
        assert time.monotonic() < end, "kernel did not bind"
        time.sleep(0.02)
    return True


def _fail() -> Client:
    raise AssertionError("unreachable")


def _dealer(endpoint: str) -> zmq.Socket[bytes]:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _answers(sock: zmq.Socket[bytes], wait_ms: int = 300) -> list[list[bytes]]:
    out = []
    while sock.poll(wait_ms):
        out.append(sock.recv_multipart())
        wait_ms = 50
    return out


def _assert_rejected_properly(answers: list[list[bytes]]) -> None:
    for frames in answers:
        assert frames[0] == b"", "answers start with the empty delimiter"
        header = decode_header(frames[1])
        if header.kind in (Kind.DISCONNECT, Kind.HEARTBEAT, Kind.REPLY, Kind.EVENT):
            continue  # a well-formed exchange hypothesis happened to build
        assert header.kind == Kind.ERROR, f"unexpected answer kind {header.kind}"
        err = msgspec.msgpack.decode(frames[2], type=Error)
        assert err.code in ANSWER_CODES and err.message


def _still_serving(home: Path) -> bytes:
    with Client.connect(home=home) as c:
        reply = c.call("echo", Echo(b"still here"), timeout=10)
        assert isinstance(reply, EchoReply)
        return reply.payload


frame = st.binary(max_size=64)
header_like = st.builds(
    lambda kind, op, dst, msg_id: encode_header(Header(PROTOCOL_VERSION, kind, msg_id, dst=dst, op=op)),
    st.integers(1, 7), st.sampled_from(["Echo", "Status", "Nope", "", "Ready"]),
    st.sampled_from(["echo", "kernel", "nope", ""]), st.integers(0, 2**63 - 1))
body_like = st.one_of(frame, st.builds(lambda p: msgspec.msgpack.encode(["Echo", p]), frame),
                      st.builds(lambda x: msgspec.msgpack.encode(x), st.lists(st.integers(-2**63, 2**63 - 1), max_size=4)))
message = st.one_of(
    st.lists(frame, min_size=0, max_size=5),
    st.tuples(header_like, body_like).map(list),
    st.tuples(st.just(b"\x93\x01\x01"), body_like).map(list),  # truncated msgpack header
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=message)
def test_random_frames_on_the_client_socket(kernel_home: Path, parts: list[bytes]) -> None:
    sock = _dealer(front_endpoint(kernel_home))
    try:
        sock.send_multipart([b"", *parts])
        _assert_rejected_properly(_answers(sock, 100))
    finally:
        sock.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=message)
def test_random_frames_on_the_service_socket(kernel_home: Path, parts: list[bytes]) -> None:
    sock = _dealer(back_endpoint(kernel_home))
    try:
        sock.send_multipart([b"", *parts])
        _assert_rejected_properly(_answers(sock, 100))
    finally:
        sock.close()


def test_the_kernel_served_well_formed_traffic_after_fuzzing(kernel_home: Path) -> None:
    assert _still_serving(kernel_home) == b"still here"


def test_a_client_cannot_register_as_a_service(kernel_home: Path) -> None:
    ready = msgspec.msgpack.encode(Ready("echo", "echo-evil", 1, "guess"))
    for endpoint, fragment in [(front_endpoint(kernel_home), "clients cannot register"),
                               (back_endpoint(kernel_home), "wrong boot secret")]:
        sock = _dealer(endpoint)
        try:
            sock.send_multipart([b"", encode_header(Header(PROTOCOL_VERSION, Kind.READY, 1, op="Ready")), ready])
            answers = _answers(sock)
            assert answers, "a refused registration is answered"
            err = msgspec.msgpack.decode(answers[0][2], type=Error)
            assert err.code == ErrorCode.UNAUTHORIZED and fragment in err.message
        finally:
            sock.close()
    with Client.connect(home=kernel_home) as c:
        assert [i.instance for i in c.status().instances] == ["echo"]


def test_missing_frames_oversized_frames_and_missing_delimiter(kernel_home: Path) -> None:
    sock = _dealer(front_endpoint(kernel_home))
    try:
        cases = [
            [b""],                                                                  # no header
            [b"", encode_header(Header(PROTOCOL_VERSION, Kind.REQUEST, 5, dst="echo", op="Echo"))],  # no body
            [b"not-empty", b"x"],                                                   # no delimiter
        ]
        for parts in cases:
            sock.send_multipart(parts)
            answers = _answers(sock)
            assert len(answers) == 1
            err = msgspec.msgpack.decode(answers[0][2], type=Error)
            assert err.code == ErrorCode.BAD_REQUEST
        # bigger than MAXMSGSIZE: the kernel's zmq drops the connection, nothing else happens
        huge = _dealer(front_endpoint(kernel_home))
        huge.send_multipart([b"", b"\x00" * (300 * 1024 * 1024 // 1000), b"x"])
        huge.close()
    finally:
        sock.close()
    assert _still_serving(kernel_home) == b"still here"


def test_wrong_body_for_a_real_service_names_the_field(kernel_home: Path) -> None:
    sock = _dealer(front_endpoint(kernel_home))
    try:
        header = encode_header(Header(PROTOCOL_VERSION, Kind.REQUEST, 9, dst="echo", op="Echo"))
        sock.send_multipart([b"", header, msgspec.msgpack.encode(["Echo", "text, not bytes"])])
        answers = _answers(sock, 5000)
        err = msgspec.msgpack.decode(answers[0][2], type=Error)
        assert err.code == ErrorCode.BAD_REQUEST and "Echo.payload" in err.message
        assert decode_header(answers[0][1]).msg_id == 9
        # A value out of range is the caller's error too (found by the fuzzer:
        # a negative delay reached anyio.sleep and came back `internal`).
        sock.send_multipart([b"", header, msgspec.msgpack.encode(["Echo", b"x", -1.0])])
        err = msgspec.msgpack.decode(_answers(sock, 5000)[0][2], type=Error)
        assert err.code == ErrorCode.BAD_REQUEST and "Echo.delay_s" in err.message
    finally:
        sock.close()


def _rejects_in_log(home: Path) -> tuple[int, int]:
    """(rejected frames logged one by one, rejected frames logged as counts)."""
    import json

    one_by_one = counted = 0
    for line in (logs_dir(home) / "kernel.log").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "kernel.rejected":
            one_by_one += 1
        elif event.get("event") == "kernel.rejected_unlogged":
            counted += event["count"]
    return one_by_one, counted


def test_a_flood_of_bad_frames_is_answered_frame_by_frame_and_logged_as_counts(kernel_home: Path) -> None:
    n = 2000
    before = _rejects_in_log(kernel_home)
    sock = _dealer(front_endpoint(kernel_home))
    try:
        for _ in range(n):
            sock.send_multipart([b"", b"\x93\x01\x01", b"x"])  # a truncated header
        got = 0
        while got < n and sock.poll(10_000):
            frames = sock.recv_multipart()
            assert msgspec.msgpack.decode(frames[2], type=Error).code == ErrorCode.BAD_REQUEST
            got += 1
        assert got == n, "every bad frame is answered"
    finally:
        sock.close()
    end = time.monotonic() + 30
    while True:  # the counts are written at the next heartbeat tick
        one_by_one, counted = (a - b for a, b in zip(_rejects_in_log(kernel_home), before))
        if one_by_one + counted >= n or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert one_by_one + counted == n, "every rejected frame is in the log, alone or counted"
    assert one_by_one < n // 2, "a flood does not cost a log line per frame"
    assert _still_serving(kernel_home) == b"still here"
