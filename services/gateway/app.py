"""The HTTP surface: OpenAI's /v1/completions, /v1/chat/completions (SSE
streaming in OpenAI's chunk format), /v1/models, plus /health and /metrics.

The app talks to a backend object only (`KernelBackend` in production), so it
is tested in memory with a fake one.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ipc.errors import BadRequest, LlmosError, NotFound, Unauthorized
from ipc.protocol.driver import ModelDescription
from ipc.protocol.scheduler import Submit
from sdk.generate import Chunk
from services.gateway import openai as oa
from services.gateway.backend import Stats
from services.gateway.chat import ChatFormatter
from services.gateway.metrics import GatewayMetrics

DEFAULT_MAX_TOKENS = 256


class Backend(Protocol):
    def stream(self, api_key: str | None, submit: Submit) -> AsyncIterator[Chunk]: ...
    async def cancel(self, api_key: str | None, request_id: str) -> None: ...
    async def model(self, api_key: str | None) -> ModelDescription: ...
    async def stats(self) -> Stats: ...


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(oa.encode(obj), status, headers, media_type="application/json")


def _error(exc: LlmosError) -> Response:
    status, body, headers = oa.error_body(exc)
    return Response(body, status, headers, media_type="application/json")


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth is None:
        return None
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Authorization must be 'Bearer <api key>'")
    return key.strip()


def create_app(backend: Backend, *, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Starlette:
    metrics = GatewayMetrics()
    chat_formatters: dict[str, ChatFormatter] = {}

    async def completions(request: Request) -> Response:
        try:
            key = _api_key(request)
            req = oa.decode_completion(await request.body())
            prompt = _prompt(req.prompt)
            submit = oa.to_submit(req, prompt=prompt, logprobs=req.logprobs or 0,
                                  default_max_tokens=default_max_tokens)
            model = _check_model(req.model, await backend.model(key))
        except LlmosError as exc:
            metrics.requests.labels("completions", oa.STATUS.get(exc.code, 500)).inc()
            return _error(exc)
        return await _run(request, key, submit, model, chat=False, stream=req.stream,
                          include_usage=True)

    async def chat_completions(request: Request) -> Response:
        try:
            key = _api_key(request)
            req = oa.decode_chat(await request.body())
            desc = await backend.model(key)
            _check_model(req.model, desc)
            fmt = chat_formatters.get(desc.path)
            if fmt is None:
                fmt = chat_formatters[desc.path] = ChatFormatter.for_model(desc.path)
            prompt = fmt.render(req.messages)
            if req.max_completion_tokens is not None and req.max_tokens is None:
                req.max_tokens = req.max_completion_tokens
            submit = oa.to_submit(req, prompt=prompt, logprobs=req.top_logprobs if req.logprobs else 0,
                                  default_max_tokens=default_max_tokens)
            # A template that adds its own BOS must not get a second one.
            if fmt.has_template:
                submit.add_special_tokens = False
        except LlmosError as exc:
            metrics.requests.labels("chat", oa.STATUS.get(exc.code, 500)).inc()
            return _error(exc)
        return await _run(request, key, submit, desc.name, chat=True, stream=req.stream, include_usage=True)

    async def _run(request: Request, key: str | None, submit: Submit, model: str, *, chat: bool, stream: bool,
                   include_usage: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        chunks = backend.stream(key, submit)
        try:
            # The first chunk arrives only once the request was admitted, so
            # admission errors (429, 401, 403, 503) are ordinary HTTP errors.
            first = await chunks.__anext__()
        except LlmosError as exc:
            metrics.requests.labels(endpoint, oa.STATUS.get(exc.code, 500)).inc()
            return _error(exc)
        rid = first.request_id
        if not stream:
            text, last = [first.text], first
            try:
                async for c in chunks:
                    text.append(c.text)
                    last = c
            except LlmosError as exc:
                metrics.requests.labels(endpoint, oa.STATUS.get(exc.code, 500)).inc()
                return _error(exc)
            usage = last.usage
            metrics.observe_usage(usage)
            metrics.requests.labels(endpoint, 200).inc()
            body = (oa.chat_json if chat else oa.completion_json)(rid, model, "".join(text),
                                                                 str(last.finish_reason), usage)
            return _json(body)
        metrics.requests.labels(endpoint, 200).inc()
        return StreamingResponse(_sse(key, chunks, first, rid, model, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _sse(key: str | None, chunks: AsyncIterator[Chunk], first: Chunk, rid: str, model: str,
                   chat: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        finished = False
        try:
            if chat:
                yield _event(oa.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
            c: Chunk | None = first
            while c is not None:
                if c.text or c.finish_reason is not None:
                    finish = str(c.finish_reason) if c.finish_reason is not None else None
                    if chat:
                        delta = {"content": c.text} if c.text else {}
                        yield _event(oa.chat_chunk(rid, model, created, delta, finish))
                    else:
                        yield _event(oa.completion_chunk(rid, model, created, c.text, finish))
                if c.finish_reason is not None:
                    finished = True
                    metrics.observe_usage(c.usage)
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield _event(oa.usage_chunk(obj, rid, model, created, c.usage))
                    break
                c = await chunks.__anext__()
            yield b"data: [DONE]\n\n"
        except LlmosError as exc:
            _, body, _ = oa.error_body(exc)
            yield b"data: " + body + b"\n\n"
        finally:
            if not finished:
                # The client went away (or the stream failed): stop the generation.
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    try:
                        await backend.cancel(key, rid)
                    except LlmosError:
                        pass

    async def models(request: Request) -> Response:
        try:
            desc = await backend.model(_api_key(request))
        except LlmosError as exc:
            return _error(exc)
        return _json({"object": "list", "data": [{
            "id": desc.name, "object": "model", "created": 0, "owned_by": "llmos",
            "max_model_len": desc.max_model_len, "architecture": desc.architecture}]})

    async def health(request: Request) -> Response:
        try:
            st = (await backend.stats()).status
        except LlmosError as exc:
            return _json({"status": "unavailable", "error": exc.message}, 503)
        down = [i.instance for i in st.instances if i.state != "ready"]
        return _json({"status": "degraded" if down else "ok", "not_ready": down,
                      "services": {i.instance: i.state for i in st.instances}}, 200)

    async def prometheus(request: Request) -> Response:
        try:
            stats: Stats | None = await backend.stats()
        except LlmosError:
            stats = None
        return Response(metrics.render(stats), media_type="text/plain; version=0.0.4")

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ])


def _check_model(asked: str, desc: ModelDescription) -> str:
    """The served model's name; `asked` may be it, its directory's basename, or empty."""
    if asked and asked not in (desc.name, Path(desc.name).name):
        raise NotFound(f"model {asked!r} does not exist; this server runs {desc.name!r}",
                       detail={"field": "model"})
    return desc.name


def _prompt(p: str | list[int | str]) -> str | list[int]:
    if isinstance(p, str):
        return p
    if all(isinstance(x, int) for x in p):
        return [int(x) for x in p]
    if len(p) == 1 and isinstance(p[0], str):
        return p[0]
    raise BadRequest("prompt must be text, token ids, or one text in a list (batches are not supported)",
                     detail={"field": "prompt"})


def _event(obj: Any) -> bytes:
    return b"data: " + oa.encode(obj) + b"\n\n"
