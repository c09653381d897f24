"""OpenAI's Responses API (`/v1/responses`) over the OS's sessions.

A chain of responses is a session (ipc/protocol/sessions.py): the scheduler
keeps the conversation's tokens, so a request that continues a response
(`previous_response_id`) sends only its new input, and the prefix is the
session's KV (``input_tokens_details.cached_tokens`` shows it). Nothing is
stored in the gateway: a response id names its chain's session and its
turn (``resp_<chain: 32 hex><created: 8 hex><own: 12 hex>``, the turn's
request id), so a response survives what sessions survive (a scheduler
restart: they are stored under LLMOS_HOME) and any gateway instance serves
it. Sessions are the principal's own: another tenant's response id is a 404.

- Continuing the chain's latest response continues its session; continuing
  an earlier one forks the session's first turns into a new chain
  (`ForkSession`; the shared prefix is found in the prefix cache).
- `store: false`: the response is not kept: without a previous response it
  is a plain request; with one, it runs in a fork of that chain that is
  closed (history deleted) when it ends. Its id is not retrievable.
- `instructions` become the chain's system prompt with its first response; a
  continuation may repeat them or leave them out, not change them (400).
- DELETE deletes the response's whole chain (its session): a response is a
  turn of one conversation, and the OS keeps conversations, not turns.

The transcript: a model without a chat template gets "role: text" lines
and "assistant:" before each answer, with assistant input items written as
"assistant:<text>" so that a whole history sent as input renders to exactly
what the session holds (greedy answers match). A model with a template gets
each request's items rendered by it (a continuation is rendered alone).
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Any

import msgspec

from common.config.gateway import GatewayConfig
from ipc.errors import BadRequest, NotFound
from ipc.protocol import sessions as ss
from ipc.protocol.sampling import SamplingParams
from ipc.protocol.scheduler import FinishReason, MaxTokens, Submit, Usage
from services.gateway.openai import Name, Seed, _decode, short
from text.chat import ChatFormatter, Turn

CHAIN_PREFIX = "resp-"  # session names of response chains
_ID = re.compile(r"resp_([0-9a-f]{32})([0-9a-f]{8})([0-9a-f]{12})")
MAX_ITEMS = 4096
ROLES = ("user", "assistant", "system", "developer")


class ContentPart(msgspec.Struct):
    type: Name
    text: str = ""


class InputItem(msgspec.Struct):
    role: Name = ""
    content: str | list[ContentPart] = ""
    type: Name = "message"


class ResponseRequest(msgspec.Struct, kw_only=True):
    model: Name = ""
    input: str | Annotated[list[InputItem], msgspec.Meta(max_length=MAX_ITEMS)]
    instructions: str | None = None
    previous_response_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: MaxTokens | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Seed | None = None  # llmos extra, as on the other endpoints
    ignore_eos: bool = False  # llmos extra
    user: Name = ""


_decoder = msgspec.json.Decoder(ResponseRequest)


def decode(body: bytes) -> ResponseRequest:
    req: ResponseRequest = _decode(_decoder, body)
    if isinstance(req.input, list):
        if not req.input:
            raise BadRequest("input must not be empty", detail={"field": "input"})
        for i, item in enumerate(req.input):
            if item.type != "message":
                raise BadRequest(f"input[{i}].type {short(item.type)} is not supported (messages only)",
                                 detail={"field": f"input[{i}].type"})
            if item.role not in ROLES:
                raise BadRequest(f"input[{i}].role {short(item.role)} is not one of {', '.join(ROLES)}",
                                 detail={"field": f"input[{i}].role"})
            for part in item.content if isinstance(item.content, list) else ():
                if part.type not in ("input_text", "output_text", "text"):
                    raise BadRequest(f"input[{i}].content of type {short(part.type)} is not supported (text only)",
                                     detail={"field": f"input[{i}].content"})
    elif not req.input:
        raise BadRequest("input must not be empty", detail={"field": "input"})
    return req


def _text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def render(req: ResponseRequest, fmt: ChatFormatter, *, continuing: bool) -> str:
    """This request's new text: its input items, then the assistant's cue."""
    items = [("user", req.input)] if isinstance(req.input, str) else [(i.role, _text(i.content)) for i in req.input]
    if fmt.has_template:
        return fmt.render([Turn("system" if r == "developer" else r, t) for r, t in items])
    lines = "".join(f"assistant:{t}\n" if r == "assistant" else f"{'system' if r == 'developer' else r}: {t}\n"
                    for r, t in items)
    return ("\n" if continuing else "") + lines + "assistant:"


def system_text(instructions: str) -> str:
    return f"system: {instructions}\n"


def new_id(chain: str, created: float) -> str:
    return f"resp_{chain}{int(created) & 0xFFFFFFFF:08x}{secrets.token_hex(6)}"


def parse_id(rid: str, field: str) -> tuple[str, float]:
    """(its chain's session, created_at) of a response id; 404 for an id of
    the wrong shape (it names no response)."""
    m = _ID.fullmatch(rid)
    if m is None:
        raise NotFound(f"no response {short(rid)} (not a response id of this server)", detail={"field": field})
    return CHAIN_PREFIX + m.group(1), float(int(m.group(2), 16))


def submit_for(req: ResponseRequest, rid: str, prompt: str, session: str, cfg: GatewayConfig) -> Submit:
    params = SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    submit = Submit(prompt, params=params, max_tokens=req.max_output_tokens or cfg.default_max_tokens,
                    session=session, request_id=rid, ignore_eos=req.ignore_eos)
    submit.validate()
    return submit


def usage_json(u: Usage | None) -> dict[str, Any]:
    u = u or Usage()
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def response_json(rid: str, created: float, model: str, *, text: str | None, finish: FinishReason | None,
                  usage: dict[str, Any] | None, req: ResponseRequest | None = None, previous: str | None = None,
                  instructions: str | None = None, store: bool = True) -> dict[str, Any]:
    """A Response object; `text` None: still in progress (no output yet)."""
    incomplete = finish == FinishReason.LENGTH
    status = "in_progress" if text is None else "incomplete" if incomplete else "completed"
    output = [] if text is None else [message_item(rid, text, "incomplete" if incomplete else "completed")]
    return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions if req is not None else instructions,
            "previous_response_id": req.previous_response_id if req is not None else previous,
            "max_output_tokens": req.max_output_tokens if req is not None else None,
            "temperature": req.temperature if req is not None else None,
            "top_p": req.top_p if req is not None else None, "store": store,
            "parallel_tool_calls": False, "tool_choice": "auto", "tools": [], "truncation": "disabled",
            "text": {"format": {"type": "text"}}, "metadata": {}, "usage": usage}


def message_item(rid: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {"type": "message", "id": "msg_" + rid[5:], "status": status, "role": "assistant", "content": content}


def stored_response(rid: str, created: float, model: str, hist: ss.SessionHistory) -> dict[str, Any]:
    """A stored response, rebuilt from its chain's history (its turn)."""
    idx = turn_index(hist, rid, "id")
    turn = hist.turns[idx]
    before = hist.info.system_tokens + sum(t.prompt_tokens + t.output_tokens for t in hist.turns[:idx])
    usage = {"input_tokens": before + turn.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": turn.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": before + turn.prompt_tokens + turn.output_tokens}
    instructions = hist.system_text.removeprefix("system: ").removesuffix("\n") or None
    previous = hist.turns[idx - 1].request_id if idx else None
    return response_json(rid, created, model, text=turn.output_text, finish=FinishReason.STOP, usage=usage,
                         previous=previous, instructions=instructions)


def turn_index(hist: ss.SessionHistory, rid: str, field: str) -> int:
    for i, t in enumerate(hist.turns):
        if t.request_id == rid:
            return i
    raise NotFound(f"no response {short(rid)}", detail={"field": field})


def sse(event: dict[str, Any], seq: list[int]) -> bytes:
    """One Responses API event (`event:` line and data), numbered in order."""
    event["sequence_number"] = seq[0]
    seq[0] += 1
    return b"event: " + event["type"].encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"


__all__ = ["CHAIN_PREFIX", "ResponseRequest", "decode", "message_item", "new_id", "parse_id", "render",
           "response_json", "sse", "stored_response", "submit_for", "system_text", "turn_index", "usage_json"]

