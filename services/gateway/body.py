"""Reading a request body within the gateway's limits (and the head's).

Called only after the caller is authenticated. The declared length is
checked before anything is read; a chunked body is counted as it arrives
and reading stops at the first chunk past the limit, so the gateway never
holds more than the limit plus one chunk (uvicorn reads at most 64 KiB
ahead of the app).
"""

from __future__ import annotations

import anyio
from starlette.requests import ClientDisconnect, Request

from ipc.errors import BadRequest, Cancelled


class BodyTooLarge(BadRequest):
    """HTTP 413: the body is larger than the gateway accepts."""

    http_status = 413


class HeadersTooLarge(BadRequest):
    """HTTP 431: the request's headers are larger than the gateway accepts."""

    http_status = 431


def check_head(request: Request, limit: int) -> None:
    """h11 bounds a head that arrives in pieces; one read in a single piece
    (up to the 256 KiB the event loop reads at once) is bounded here."""
    size = sum(len(k) + len(v) + 4 for k, v in request.scope["headers"])
    if size > limit:
        raise HeadersTooLarge(f"request headers of {size} bytes are over this gateway's limit of {limit} bytes "
                              f"(gateway.max_header_bytes)", detail={"limit": limit})


class BodyTimeout(BadRequest):
    """HTTP 408: the body did not arrive in time."""

    http_status = 408


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        # Digits only: int() would also take "+1", " 1" and "1_000".
        if not declared.isdigit() or not declared.isascii():
            raise BadRequest("Content-Length must be a decimal number of bytes",
                             detail={"field": "content-length"})
        if len(declared) > 19 or int(declared) > limit:
            raise BodyTooLarge(f"request body of {declared} bytes is over this gateway's limit of {limit} "
                               f"bytes (gateway.max_body_bytes)", detail={"limit": limit})
    parts: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"request body is over this gateway's limit of {limit} bytes "
                                       f"(gateway.max_body_bytes)", detail={"limit": limit})
                parts.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"request body did not arrive within {timeout_s:g} s (gateway.body_timeout_s); "
                          f"{size} bytes came") from None
    except ClientDisconnect:
        raise Cancelled("the client went away while sending its body") from None
    return b"".join(parts)
