"""Invalid UTF-8 in a string field is a malformed frame like any other: the
decoders raise BadRequest (msgspec raises UnicodeDecodeError, not
DecodeError, for it — found by the chaos fuzzer: the kernel logged an
exception and left the sender unanswered)."""

from __future__ import annotations

import msgspec
import pytest

from ipc.codec import decode_body
from ipc.envelope import PROTOCOL_VERSION, Kind, decode_header
from ipc.errors import BadRequest
from ipc.protocol.echo import Echo


def _bad_str(*head: object) -> bytes:
    return msgspec.msgpack.encode([*head, "\x00"]).replace(b"\xa1\x00", b"\xa2\xff\xfe")


def test_a_header_with_invalid_utf8_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="undecodable header"):
        decode_header(_bad_str(PROTOCOL_VERSION, int(Kind.REQUEST), 1))


def test_a_body_with_invalid_utf8_is_a_bad_request() -> None:
    dec = msgspec.msgpack.Decoder(Echo)
    with pytest.raises(BadRequest, match="undecodable body"):
        decode_body(dec, _bad_str())


def test_invalid_utf8_past_a_validation_error_is_a_bad_request() -> None:
    # The typed decode stops at the first wrong field; naming that field
    # decodes the frame again, untyped, and meets the invalid string.
    dec = msgspec.msgpack.Decoder(Echo)
    with pytest.raises(BadRequest, match="invalid body"):
        decode_body(dec, _bad_str([1]))
