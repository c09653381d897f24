"""OpenAI-compatible request and response bodies, validated with msgspec.

Unknown fields are accepted and ignored (clients send many); known fields are
type-checked, and a wrong one is a 400 naming it. llmos extras: `priority`,
`session_id`, `request_id`.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

import msgspec

from ipc.errors import BadRequest, ErrorCode, LlmosError
from ipc.protocol.sampling import MAX_LOGPROBS, MAX_SEED, MAX_TOP_K, SamplingParams
from ipc.protocol.scheduler import MAX_REQUEST_ID_LEN, MaxTokens, PriorityLevel, PrioritySubmit, Submit, TokenId
from text.chat import Turn

# Every integer a client sends is bounded where the body is decoded, so a
# 2**64 (or a -2**63) is a 400 naming its field, never an overflow later.
MAX_N = 128
MAX_NAME_LEN = 256
Logprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)]
TopK = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_K)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_LEN)]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: Name = ""
    max_tokens: MaxTokens | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: TopK = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: Count = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    user: Name = ""
    priority: PriorityLevel = 0
    session_id: Name = ""
    request_id: Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID_LEN)] = ""
    ignore_eos: bool = False  # as vLLM: generate max_tokens even past EOS


class CompletionRequest(_Common, kw_only=True):
    # text, token ids, or a one-element list of text (msgspec unions allow one array type)
    prompt: str | list[TokenId | str]
    logprobs: Logprobs | None = None
    echo: bool = False
    best_of: Count | None = None


class ContentPart(msgspec.Struct):
    """One part of a message's content; only text parts are served."""

    type: Name
    text: str = ""


class ChatMessage(msgspec.Struct):
    role: Name
    # null: an assistant turn that only called tools
    content: str | list[ContentPart] | None = ""


def chat_turns(messages: list[ChatMessage]) -> list[Turn]:
    """The messages as (role, text) turns for a chat template; only text
    content is served."""
    return [Turn(m.role, _text(m.content)) for m in messages]


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    for part in content:
        if part.type != "text":
            raise BadRequest(f"message content of type {short(part.type)} is not supported (text only)",
                             detail={"field": "messages.content"})
    return "".join(part.text for part in content)


class ChatRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Logprobs = 0


_completion = msgspec.json.Decoder(CompletionRequest)
_chat = msgspec.json.Decoder(ChatRequest)
encode = msgspec.json.Encoder().encode


def decode_completion(body: bytes) -> CompletionRequest:
    return _decode(_completion, body)


def decode_chat(body: bytes) -> ChatRequest:
    req = _decode(_chat, body)
    if not req.messages:
        raise BadRequest("messages must not be empty", detail={"field": "messages"})
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise BadRequest(f"messages[{i}].role {short(m.role)} is not one of {', '.join(ROLES)}",
                             detail={"field": f"messages[{i}].role"})
    return req


ROLES = ("system", "user", "assistant", "tool", "developer")
_AT = re.compile(r" - at `\$\.?(.*)`$")


def _decode(dec: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return dec.decode(body)
    except msgspec.ValidationError as exc:
        at = _AT.search(str(exc))
        raise BadRequest(f"invalid request body: {exc}", detail={"field": at.group(1)} if at else {}) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None


def short(value: str, limit: int = 40) -> str:
    """`value` quoted for an error message, cut to `limit` characters (the
    client sent it; it is not echoed whole)."""
    return repr(value[:limit] + "..." if len(value) > limit else value)


def check_n(req: _Common, best_of: int | None, max_n: int) -> tuple[int, int]:
    """(n, best_of) of a request, within this server's `max_n`; a refusal names the field."""
    if req.n > max_n:
        raise BadRequest(f"n must be at most {max_n} (this server's max_n), got {req.n}", detail={"field": "n"})
    runs = req.n if best_of is None else best_of
    if best_of is not None and not req.n <= best_of <= max_n:
        raise BadRequest(f"best_of must be in [n, {max_n}] (n = {req.n}; {max_n}: this server's max_n), got "
                         f"{best_of}", detail={"field": "best_of"})
    if runs > req.n and req.stream:
        raise BadRequest("best_of > n cannot be streamed (the best are known at the end)",
                         detail={"field": "best_of"})
    if runs > 1 and req.session_id:
        raise BadRequest("n > 1 cannot run in a session (a session's turns are one conversation)",
                         detail={"field": "n"})
    return req.n, runs


def to_submit(req: _Common, *, prompt: str | list[int], logprobs: int, default_max_tokens: int) -> Submit:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
    params = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                            repetition_penalty=req.repetition_penalty, seed=req.seed, logprobs=logprobs)
    text, ids = (prompt, []) if isinstance(prompt, str) else ("", prompt)
    # Ahead of the default is the `priority` right's op (the kernel checks it).
    kind = PrioritySubmit if req.priority < 0 else Submit
    submit = kind(text, ids, params, max_tokens, stop, priority=req.priority, session=req.session_id,
                  request_id=req.request_id or uuid.uuid4().hex, ignore_eos=req.ignore_eos)
    submit.validate()
    return submit


# -- errors -------------------------------------------------------------------

def status_of(exc: LlmosError) -> int:
    """The HTTP status for an llmos error (a gateway-only error carries its own)."""
    own: int | None = getattr(exc, "http_status", None)
    return own if own is not None else STATUS.get(exc.code, 500)


STATUS = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.UNAUTHORIZED: 401, ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404, ErrorCode.OVERLOADED: 429, ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504, ErrorCode.CANCELLED: 499, ErrorCode.INTERNAL: 500,
}
_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 408: "invalid_request_error", 413: "invalid_request_error",
         431: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout",
         499: "cancelled", 500: "server_error"}


def error_body(exc: LlmosError) -> tuple[int, bytes, dict[str, str]]:
    """(HTTP status, OpenAI error JSON, extra headers) for an llmos error."""
    status = status_of(exc)
    param = exc.detail.get("field")
    body = encode({"error": {"message": exc.message, "type": _TYPE.get(status, "server_error"), "param": param, "code": str(exc.code)}})
    headers = {}
    retry = exc.detail.get("retry_after_s")
    if status == 429:
        headers["Retry-After"] = str(max(1, round(float(retry)))) if retry is not None else "1"
    return status, body, headers
