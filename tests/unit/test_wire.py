"""The envelope, codec and error values, with no sockets."""

from __future__ import annotations

import msgspec
import pytest

from ipc import codec
from ipc.envelope import PROTOCOL_VERSION, Header, Kind, decode_header, encode_header, split_route
from ipc.errors import BadRequest, Error, ErrorCode, NotFound, Overloaded
from ipc.protocol.base import Message
from ipc.protocol.echo import Echo, EchoReply
from ipc.protocol.kernel import Ready


def test_header_round_trips_every_field() -> None:
    h = Header(PROTOCOL_VERSION, Kind.REQUEST, 42, src="a", dst="echo", op="Echo", principal="p",
               token=b"\x01\x02", deadline_ns=123, trace_id="t", attempt=2)
    assert decode_header(encode_header(h)) == h


@pytest.mark.parametrize("frame, fragment", [
    (b"\xc1", "undecodable header"),
    (b"\xff\x00garbage", "malformed header"),
    (msgspec.msgpack.encode([PROTOCOL_VERSION, "not-an-int"]), "malformed header"),
    (msgspec.msgpack.encode([99, 1]), "unsupported protocol version 99"),
    (msgspec.msgpack.encode([PROTOCOL_VERSION, 77]), "unknown message kind 77"),
    (b"", "undecodable header"),
])
def test_bad_headers_are_bad_requests_naming_the_fault(frame: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest, match=fragment):
        decode_header(frame)


def test_split_route_requires_the_empty_delimiter() -> None:
    assert split_route([b"id", b"", b"h", b"b"]) == (b"id", [b"h", b"b"])
    with pytest.raises(BadRequest, match="delimiter"):
        split_route([b"id", b"h"])


def test_typed_decoder_rejects_wrong_field_types_naming_the_field() -> None:
    dec = codec.decoder([Echo])
    good = codec.encode(Echo(b"x", 0.5))
    assert codec.decode_body(dec, good) == Echo(b"x", 0.5)
    bad = msgspec.msgpack.encode(["Echo", "not-bytes-but-str", "nope"])
    with pytest.raises(BadRequest, match=r"field `Echo.payload`"):
        codec.decode_body(dec, bad)


def test_unknown_tag_is_a_bad_request() -> None:
    dec = codec.decoder([Echo])
    with pytest.raises(BadRequest, match="Invalid value 'Nope'|Nope"):
        codec.decode_body(dec, msgspec.msgpack.encode(["Nope"]))


def test_any_decoder_decodes_every_registered_message() -> None:
    anyd = codec.AnyDecoder()
    assert anyd.decode(codec.encode(EchoReply(b"z", "echo-1", 1))) == EchoReply(b"z", "echo-1", 1)
    assert isinstance(anyd.decode(codec.encode(Ready("echo", "echo", 1, "s"))), Ready)


def test_message_names_are_global() -> None:
    with pytest.raises(TypeError, match="defined twice"):
        type("Echo", (Message,), {"__module__": "somewhere.else"})


def test_errors_translate_between_values_and_exceptions() -> None:
    err = Overloaded("queue full", detail={"retry_after_s": 1.5}).to_wire()
    assert err.code == ErrorCode.OVERLOADED
    wire = msgspec.msgpack.decode(codec.encode(err), type=Error)
    exc = wire.exception()
    assert isinstance(exc, Overloaded) and exc.detail == {"retry_after_s": 1.5}
    assert isinstance(Error(ErrorCode.NOT_FOUND, "x").exception(), NotFound)
    assert str(NotFound("no such thing")) == "not_found: no such thing"
