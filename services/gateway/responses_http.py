"""The Responses API's HTTP handlers: POST /v1/responses (plain and
streamed in the Responses API's SSE events), GET and DELETE
/v1/responses/{id}. The model of it (chains are sessions) is in
responses.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from common.config.gateway import GatewayConfig
from ipc.errors import BadRequest, LlmosError, NotFound
from ipc.protocol import sessions as ss
from ipc.protocol.driver import ModelDescription
from ipc.protocol.scheduler import SCHEDULER
from sdk.generate import Chunk, GenerationStream
from services.gateway import openai as oa
from services.gateway import responses as rs
from services.gateway.body import read_body
from services.gateway.metrics import GatewayMetrics
from text.chat import ChatFormatter

ENDPOINT = "responses"


def routes(backend: Any, cfg: GatewayConfig, metrics: GatewayMetrics, *,
           caller: Callable[[Request], Awaitable[str | None]],
           refuse: Callable[..., Response],
           formatter: Callable[[ModelDescription], ChatFormatter],
           check_model: Callable[[str, ModelDescription], str]) -> list[Route]:

    async def show(key: str | None, session: str, rid: str, field: str) -> ss.SessionHistory:
        try:
            hist: ss.SessionHistory = await backend.call(key, SCHEDULER, ss.ShowSession(session))
        except NotFound:
            raise NotFound(f"no response {oa.short(rid)}", detail={"field": field}) from None
        return hist

    async def close(key: str | None, session: str) -> None:
        try:
            await backend.call(key, SCHEDULER, ss.CloseSession(session))
        except LlmosError:
            pass  # an unstored response's fork: at worst its history stays until the session store prunes it

    async def create(request: Request) -> Response:
        body_read = False
        temp = ""
        try:
            key = await caller(request)
            body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
            body_read = True
            req = rs.decode(body)
            del body
            desc = await backend.model(key)
            model = check_model(req.model, desc)
            fmt = formatter(desc)
            created = time.time()
            prev = req.previous_response_id
            if prev is None:
                chain = uuid.uuid4().hex
                session = rs.CHAIN_PREFIX + chain if req.store else ""
                prompt = rs.render(req, fmt, continuing=False)
                if req.instructions and req.store:
                    await backend.call(key, SCHEDULER, ss.OpenSession(session, system=rs.system_text(req.instructions)))
                elif req.instructions:
                    prompt = rs.system_text(req.instructions) + prompt
            else:
                psession, _ = rs.parse_id(prev, "previous_response_id")
                hist = await show(key, psession, prev, "previous_response_id")
                idx = rs.turn_index(hist, prev, "previous_response_id")
                if req.instructions is not None and rs.system_text(req.instructions) != hist.system_text:
                    raise BadRequest("instructions differ from those the chain began with (its system prompt); "
                                     "send the same or none", detail={"field": "instructions"})
                prompt = rs.render(req, fmt, continuing=True)
                if req.store and idx == len(hist.turns) - 1:
                    chain, session = psession.removeprefix(rs.CHAIN_PREFIX), psession
                else:  # an earlier response, or not to be stored: a fork of the chain up to it
                    chain = uuid.uuid4().hex
                    session = rs.CHAIN_PREFIX + chain if req.store else f"{rs.CHAIN_PREFIX}tmp-{chain}"
                    await backend.call(key, SCHEDULER, ss.ForkSession(psession, session, idx + 1))
                    temp = "" if req.store else session
            rid = rs.new_id(chain, created)
            submit = rs.submit_for(req, rid, prompt, session, cfg)
            stream = await backend.stream(key, submit)
        except LlmosError as exc:
            if temp:
                await close(key, temp)
            return refuse(ENDPOINT, exc, body_read=body_read)
        try:
            first = await stream.__anext__()  # admitted (admission errors are HTTP errors)
        except LlmosError as exc:
            await stream.aclose()
            if temp:
                await close(key, temp)
            return refuse(ENDPOINT, exc)
        metrics.requests.labels(ENDPOINT, 200).inc()
        if req.stream:
            return StreamingResponse(events(key, stream, first, rid, created, model, req, temp),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text, last = [first.text], first
            async for c in stream:
                text.append(c.text)
                last = c
        except LlmosError as exc:
            return refuse(ENDPOINT, exc)
        finally:
            await stream.aclose()
            if temp:
                await close(key, temp)
        metrics.observe_usage(last.usage)
        return _json(rs.response_json(rid, created, model, text="".join(text), finish=last.finish_reason,
                                      usage=rs.usage_json(last.usage), req=req, store=req.store))

    async def events(key: str | None, stream: GenerationStream, first: Chunk, rid: str, created: float, model: str,
                     req: rs.ResponseRequest, temp: str) -> AsyncIterator[bytes]:
        seq = [0]
        pending = rs.response_json(rid, created, model, text=None, finish=None, usage=None, req=req, store=req.store)
        item = rs.message_item(rid, None, "in_progress")
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        yield rs.sse({"type": "response.created", "response": pending}, seq)
        yield rs.sse({"type": "response.in_progress", "response": pending}, seq)
        yield rs.sse({"type": "response.output_item.added", "output_index": 0, "item": item}, seq)
        part = {"type": "output_text", "text": "", "annotations": []}
        yield rs.sse({"type": "response.content_part.added", **where, "part": part}, seq)
        text: list[str] = []
        c: Chunk | None = first
        try:
            while c is not None:
                if c.text:
                    text.append(c.text)
                    yield rs.sse({"type": "response.output_text.delta", **where, "delta": c.text, "logprobs": []}, seq)
                if c.finish_reason is not None:
                    break
                c = await stream.__anext__()
        except LlmosError as exc:
            yield rs.sse({"type": "error", "code": str(exc.code), "message": exc.message,
                          "param": exc.detail.get("field")}, seq)
            return
        finally:
            await stream.aclose()
            if temp:
                await close(key, temp)
        assert c is not None
        metrics.observe_usage(c.usage)
        full = "".join(text)
        done = rs.response_json(rid, created, model, text=full, finish=c.finish_reason, usage=rs.usage_json(c.usage),
                                req=req, store=req.store)
        yield rs.sse({"type": "response.output_text.done", **where, "text": full, "logprobs": []}, seq)
        yield rs.sse({"type": "response.content_part.done", **where, "part": {**part, "text": full}}, seq)
        yield rs.sse({"type": "response.output_item.done", "output_index": 0, "item": done["output"][0]}, seq)
        kind = "response.completed" if done["status"] == "completed" else "response.incomplete"
        yield rs.sse({"type": kind, "response": done}, seq)

    async def get(request: Request) -> Response:
        try:
            key = await caller(request)
            rid = request.path_params["response_id"]
            session, created = rs.parse_id(rid, "response_id")
            hist = await show(key, session, rid, "response_id")
            desc = await backend.model(key)
            return _json(rs.stored_response(rid, created, desc.name, hist))
        except LlmosError as exc:
            return refuse(ENDPOINT, exc)

    async def delete(request: Request) -> Response:
        try:
            key = await caller(request)
            rid = request.path_params["response_id"]
            session, _ = rs.parse_id(rid, "response_id")
            rs.turn_index(await show(key, session, rid, "response_id"), rid, "response_id")
            await backend.call(key, SCHEDULER, ss.CloseSession(session))
        except LlmosError as exc:
            return refuse(ENDPOINT, exc)
        return _json({"id": rid, "object": "response", "deleted": True})

    return [Route("/v1/responses", create, methods=["POST"]),
            Route("/v1/responses/{response_id}", get, methods=["GET"]),
            Route("/v1/responses/{response_id}", delete, methods=["DELETE"])]


def _json(obj: Any, status: int = 200) -> Response:
    return Response(oa.encode(obj), status, media_type="application/json")
