"""Errors are values on the wire and exceptions in code.

    LlmosError                 code        meaning
    ├── BadRequest             bad_request       the input is malformed or invalid
    │   └── ConfigError        bad_request       a setting restarting cannot fix (exit EX_CONFIG)
    ├── Unauthorized           unauthorized      no valid credential
    ├── Forbidden              forbidden         credential lacks the right
    ├── NotFound               not_found         no such service / request / object
    ├── Unavailable            unavailable       the service died or is not running
    ├── Overloaded             overloaded        admission refused; retry later
    ├── DeadlineExceeded       deadline_exceeded the deadline passed
    ├── Cancelled              cancelled         cancelled by the client
    └── Internal               internal          a bug or an unexpected failure

On the wire an error is `Error(code, message, detail)`; `Error.exception()` and
`LlmosError.to_wire()` translate between the two.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

import msgspec


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class Error(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, gc=False):
    """The body of an ERROR frame. `detail` carries machine-readable extras
    (e.g. ``retry_after_s`` for `overloaded`)."""

    code: ErrorCode
    message: str
    detail: dict[str, str | int | float | bool] = {}

    def exception(self) -> "LlmosError":
        cls = _BY_CODE.get(self.code, Internal)
        return cls(self.message, detail=dict(self.detail))


class LlmosError(Exception):
    """Root of every error llmos raises on purpose."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str, *, detail: dict[str, str | int | float | bool] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail or {}

    def to_wire(self) -> Error:
        return Error(self.code, self.message, self.detail)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(LlmosError):
    code = ErrorCode.BAD_REQUEST


class ConfigError(BadRequest):
    """A failure restarting cannot fix: a bad config value, a device that is
    not there, a checkpoint that does not load. A service that raises it exits
    with `EX_CONFIG` and one line of reason, and its supervisor does not retry."""


# sysexits.h: "something was found in an unconfigured or misconfigured state"
EX_CONFIG = 78


class Unauthorized(LlmosError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(LlmosError):
    code = ErrorCode.FORBIDDEN


class NotFound(LlmosError):
    code = ErrorCode.NOT_FOUND


class Unavailable(LlmosError):
    code = ErrorCode.UNAVAILABLE


class Overloaded(LlmosError):
    code = ErrorCode.OVERLOADED


class DeadlineExceeded(LlmosError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(LlmosError):
    code = ErrorCode.CANCELLED


class Internal(LlmosError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[LlmosError]] = {
    cls.code: cls
    for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Unavailable, Overloaded,
                DeadlineExceeded, Cancelled, Internal)
}
