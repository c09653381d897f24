"""Content keys for the prefix cache.

A full block's key chains its parent's key with its token ids, so equal keys
mean equal prefixes, not just equal blocks. The chain starts from a root key
made of the tenant and the request's cache salt: tenants never share a key,
hence never a block. blake2b rather than `hash()`: a tenant must not be able
to craft a collision with another tenant's prefix.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b

import msgspec

_DIGEST = 16
_ROOT_DOMAIN = b"llmos-kv-v1"


def root_key(tenant: str, cache_salt: str) -> bytes:
    # msgpack frames each string with its length, so no two (tenant, salt)
    # pairs encode alike.
    data = msgspec.msgpack.encode((tenant, cache_salt))
    return blake2b(data, digest_size=_DIGEST, person=_ROOT_DOMAIN).digest()


def block_key(parent: bytes, tokens: array) -> bytes:
    """Key of a full block holding `tokens` (an int64 array) after `parent`."""
    return blake2b(parent + tokens.tobytes(), digest_size=_DIGEST).digest()


def token_array(tokens: list[int]) -> array:
    """Token ids as int64; an id that does not fit raises OverflowError."""
    return array("q", tokens)
