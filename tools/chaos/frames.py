"""Malformed frames for the kernel's sockets, from a seeded generator: raw
random bytes, well-formed headers over garbage bodies, valid messages with
bytes flipped or cut, wrong versions and kinds, missing delimiters.

The generator never builds a *valid* command: a fuzzer holding the boot
secret is a trusted service, and a valid `Shutdown` from it is obeyed, not
fuzz."""

from __future__ import annotations

import random

import msgspec

from ipc.envelope import PROTOCOL_VERSION, Header, Kind, encode_header

OPS = ["Echo", "Submit", "Cancel", "Status", "Subscribe", "Login", "Reserve", "Release", "Execute",
       "DescribeModel", "Nope", "", "Ready"]
DSTS = ["echo", "scheduler", "memory", "driver", "security", "kernel", "gateway", "nope", "",
        "kernel.services", "security.policy"]
KINDS = [int(k) for k in Kind] + [0, 99]


def _rand_bytes(rng: random.Random, hi: int = 64) -> bytes:
    return rng.randbytes(rng.randrange(hi + 1))


def _garbage_body(rng: random.Random, op: str) -> bytes:
    r = rng.random()
    if r < 0.4:
        return _rand_bytes(rng)
    if r < 0.7:  # the right tag, wrong fields
        return msgspec.msgpack.encode([op, *(_rand_value(rng) for _ in range(rng.randrange(4)))])
    if r < 0.9:  # some other msgpack value
        return msgspec.msgpack.encode(_rand_value(rng))
    return b""


def _rand_value(rng: random.Random) -> object:
    return rng.choice([rng.randrange(-2**63, 2**63), -1, 2**64 - 1, _rand_bytes(rng, 16), "x" * rng.randrange(40),
                       None, True, 3.5, [1, "a", b"b"], {"k": 1}])


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    if not b:
        return _rand_bytes(rng)
    r = rng.random()
    if r < 0.4:
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if r < 0.7:
        return bytes(b[:rng.randrange(len(b))])
    return bytes(b) + _rand_bytes(rng, 16)


def malformed(rng: random.Random, *, token: bytes = b"", with_delimiter: bool = True) -> list[bytes]:
    """One multipart message, delimiter included unless the draw leaves it out."""
    r = rng.random()
    if r < 0.25:
        parts = [_rand_bytes(rng) for _ in range(rng.randrange(6))]
    else:
        op, dst = rng.choice(OPS), rng.choice(DSTS)
        kind = rng.choice(KINDS) if r < 0.45 else int(Kind.REQUEST)
        version = PROTOCOL_VERSION if rng.random() < 0.9 else rng.randrange(256)
        header = Header(version, kind, rng.randrange(2**63), src="fuzz", dst=dst, op=op,
                        token=token if token and rng.random() < 0.7 else _rand_bytes(rng, 8) if rng.random() < 0.2
                        else b"", deadline_ns=rng.choice([0, 0, 1, 2**62]), attempt=rng.randrange(3))
        raw = encode_header(header)
        if r < 0.6:
            raw = _mutate(rng, raw)
        parts = [raw, _garbage_body(rng, op)]
        if rng.random() < 0.1:
            parts.append(_rand_bytes(rng, 256))  # a stray buffer frame
    if with_delimiter and rng.random() < 0.95:
        return [b"", *parts]
    return parts or [b"x"]
