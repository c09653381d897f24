"""The HTTP surface: OpenAI's /v1/completions, /v1/chat/completions (SSE
streaming in OpenAI's chunk format; n, best_of and logprobs in choices.py),
/v1/responses (responses.py), /v1/models, plus /health and /metrics.

The app talks to a backend object only (`KernelBackend` in production), so it
is tested in memory with a fake one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import anyio
from pathlib import Path
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ipc.errors import BadRequest, Forbidden, Internal, LlmosError, NotFound, Unauthorized
from ipc.protocol.driver import ModelDescription
from ipc.protocol.kernel import ChildState
from ipc.protocol import kernel as kp
from ipc.protocol.scheduler import RequestInfo, Submit, Usage
from sdk.generate import Chunk, GenerationStream, fork_submits
from services.gateway import choices
from services.gateway import openai as oa
from services.gateway.choices import Shape
from services.gateway.responses_http import routes as responses_routes
from services.gateway.backend import Stats
from services.gateway.body import check_head, read_body
from common.config.gateway import GatewayConfig
from services.gateway.metrics import GatewayMetrics
from services.gateway.model_text import ModelText
from services.gateway.resume import Resume, check_key, event_id, parse_last_event_id, request_id

class Backend(Protocol):
    async def authenticate(self, api_key: str) -> None: ...
    async def principal(self, api_key: str | None) -> str: ...
    async def stream(self, api_key: str | None, submit: Submit) -> GenerationStream: ...
    async def call(self, api_key: str | None, service: str, msg: Any) -> Any: ...
    async def request_info(self, api_key: str | None, request_id: str) -> RequestInfo | None: ...
    async def model(self, api_key: str | None) -> ModelDescription: ...
    async def stats(self, api_key: str | None = None) -> Stats: ...
    async def status(self) -> kp.StatusReply: ...


# /health asks the kernel at most this often (a load balancer may probe many
# times a second, from every instance).
HEALTH_CACHE_S = 1.0
# The services without a ready instance of which no generation can run.
NEEDED = ("scheduler", "driver")


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(oa.encode(obj), status, headers, media_type="application/json")


def _error(exc: LlmosError, *, close: bool = False) -> Response:
    """`close`: the body was left unread, so this connection carries no
    further request (the connection layer lingers before closing it)."""
    status, body, headers = oa.error_body(exc)
    if close:
        headers["Connection"] = "close"
    return Response(body, status, headers, media_type="application/json")


# Longer than any key the security server mints (llmos.<12 hex>.<secret>).
MAX_API_KEY_LEN = 256


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth is None:
        return None
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Authorization must be 'Bearer <api key>'")
    if len(key) > MAX_API_KEY_LEN:
        raise Unauthorized(f"API key longer than {MAX_API_KEY_LEN} characters: not a key")
    return key.strip()


def create_app(backend: Backend, config: GatewayConfig | None = None,
               draining: Callable[[], bool] = lambda: False, instance: str = "") -> Starlette:
    """`draining`: true once this instance stopped accepting (SIGTERM): a
    stream it then has to cut is left running for its client to resume
    elsewhere, and /health says so. `instance` names this process in each
    generation's `Llmos-Instance` response header (which one served it)."""
    cfg = config or GatewayConfig()
    served_by = {"Llmos-Instance": instance} if instance else {}
    metrics = GatewayMetrics()
    health_seen: list[tuple[float, kp.StatusReply]] = []

    async def caller(request: Request) -> str | None:
        """The caller's API key, resolved to a token, before the body is read:
        a request without a valid key costs its headers and nothing more."""
        check_head(request, cfg.max_header_bytes)
        key = _api_key(request)
        if key is None:
            if cfg.allow_anonymous:
                return None
            raise Unauthorized("no API key: send 'Authorization: Bearer <api key>'")
        await backend.authenticate(key)
        return key

    def refuse(endpoint: str, exc: LlmosError, *, body_read: bool = True) -> Response:
        metrics.requests.labels(endpoint, oa.status_of(exc)).inc()
        return _error(exc, close=not body_read)

    async def completions(request: Request) -> Response:
        body_read = False
        try:
            key = await caller(request)
            body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
            body_read = True
            req = oa.decode_completion(body)
            del body
            desc = await backend.model(key)
            model = _check_model(req.model, desc)
            prompt = _prompt(req.prompt, desc)
            submit = oa.to_submit(req, prompt=prompt, logprobs=req.logprobs or 0,
                                  default_max_tokens=cfg.default_max_tokens)
            shape = Shape(False, model, *oa.check_n(req, req.best_of, cfg.max_n),
                          pieces=await pieces_of(desc) if req.logprobs is not None else None)
            resume, keyed = await resumable(request, key, submit, req.request_id, stream=req.stream)
        except LlmosError as exc:
            return refuse("completions", exc, body_read=body_read)
        return await _run(key, submit, shape, stream=req.stream, resume=resume, keyed=keyed)

    async def chat_completions(request: Request) -> Response:
        body_read = False
        try:
            key = await caller(request)
            body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
            body_read = True
            req = oa.decode_chat(body)
            del body
            desc = await backend.model(key)
            _check_model(req.model, desc)
            fmt = formatter(desc)
            prompt = fmt.render(oa.chat_turns(req.messages))
            if req.max_completion_tokens is not None and req.max_tokens is None:
                req.max_tokens = req.max_completion_tokens
            submit = oa.to_submit(req, prompt=prompt, logprobs=req.top_logprobs if req.logprobs else 0,
                                  default_max_tokens=cfg.default_max_tokens)
            # A template that adds its own BOS must not get a second one.
            if fmt.has_template:
                submit.add_special_tokens = False
            shape = Shape(True, desc.name, *oa.check_n(req, None, cfg.max_n),
                          pieces=await pieces_of(desc) if req.logprobs else None)
            resume, keyed = await resumable(request, key, submit, req.request_id, stream=req.stream)
        except LlmosError as exc:
            return refuse("chat", exc, body_read=body_read)
        return await _run(key, submit, shape, stream=req.stream, resume=resume, keyed=keyed)

    model_text = ModelText()  # from the driver's description, never its path (model_text.py)
    formatter, pieces_of = model_text.formatter, model_text.pieces

    async def resumable(request: Request, key: str | None, submit: Submit, body_id: str, *,
                        stream: bool) -> tuple[Resume | None, bool]:
        """Name the request (`submit.request_id`) and, for a re-sent stream,
        where it resumes (resume.py). (Last-Event-ID, whether the client
        sent an Idempotency-Key.)"""
        raw_key = request.headers.get("idempotency-key")
        idem = check_key(raw_key) if raw_key is not None else None
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        resume = parse_last_event_id(last) if last else None
        if resume is not None and not stream:
            raise BadRequest("Last-Event-ID resumes a stream: send it with \"stream\": true",
                             detail={"field": "last-event-id"})
        rid = request_id(await backend.principal(key), body_id=body_id, key=idem, resume=resume)
        submit.request_id = rid
        # A stream is left running for its client when this instance dies;
        # a plain request only when its client can name it again.
        submit.linger_s = cfg.resume_grace_s if stream or idem is not None else 0.0
        if resume is not None:
            if resume.offset > submit.max_tokens:
                raise BadRequest(f"Last-Event-ID offset {resume.offset} is past this request's max_tokens "
                                 f"{submit.max_tokens}", detail={"field": "last-event-id"})
            info = await backend.request_info(key, rid)
            if info is not None and info.state == "finished" and resume.offset > info.generated:
                raise BadRequest(f"Last-Event-ID offset {resume.offset} is past the {info.generated} tokens "
                                 f"request {rid[:40]!r} generated", detail={"field": "last-event-id"})
            submit.resume_from, submit.attempt = resume.offset, 1
        return resume, idem is not None

    async def release(chunks: GenerationStream, keep: bool) -> None:
        """Done with a generation's stream: cancel what is left of it, unless
        its client may come back for it (an Idempotency-Key, or a stream this
        draining instance cut)."""
        if keep or draining():
            await chunks.detach()
        else:
            await chunks.aclose()

    async def _run(key: str | None, submit: Submit, shape: Shape, *, stream: bool, resume: Resume | None,
                   keyed: bool) -> Response:
        endpoint = "chat" if shape.chat else "completions"
        try:
            if resume is not None and shape.runs > 1:
                raise BadRequest("Last-Event-ID resumes a stream of one choice (n = 1)", detail={"field": "n"})
            streams = [await backend.stream(key, s) for s in fork_submits(submit, shape.runs)]
        except LlmosError as exc:
            return refuse(endpoint, exc)
        rid = submit.request_id
        if not stream:
            try:
                # Each stream's first chunk arrives once it was admitted, so
                # admission errors (429, 401, 403, 503) are ordinary HTTP errors.
                results = await choices.gather(streams, lambda c: release(c, keyed))
            except LlmosError as exc:
                return refuse(endpoint, exc)
            for c in results:
                metrics.observe_usage(c.usage)
            metrics.requests.labels(endpoint, 200).inc()
            return _json(shape.body(rid, results), headers=served_by)
        if len(streams) > 1:
            metrics.requests.labels(endpoint, 200).inc()
            return StreamingResponse(_sse_many(streams, shape, rid, keyed), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **served_by})
        chunks = streams[0]
        try:
            first = await chunks.__anext__()
        except LlmosError as exc:
            await chunks.aclose()
            return refuse(endpoint, exc)
        except BaseException:
            await release(chunks, keyed)  # the client went away while it waited
            raise
        metrics.requests.labels(endpoint, 200).inc()
        return StreamingResponse(_sse(chunks, first, rid, shape, resume, keyed),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache", **served_by})

    async def _sse(chunks: GenerationStream, first: Chunk, rid: str, shape: Shape, resume: Resume | None,
                   keyed: bool) -> AsyncIterator[bytes]:
        """The events of one stream, each with the id it resumes from; a
        resumed stream (`resume`) sends only what its client lacks."""
        try:
            if shape.chat and resume is None:
                yield _event(shape.chunk(rid, 0, first, 0, first=True), event_id(rid, 0))
            c: Chunk | None = first
            offset = 0  # text_offset of the next token (completions' logprobs)
            while c is not None:
                held = c.offset + len(c.token_ids)
                finish = str(c.finish_reason) if c.finish_reason is not None else None
                if (c.text or finish is not None) and not (resume is not None and resume.ended):
                    yield _event(shape.chunk(rid, 0, c, offset), event_id(rid, held, end=finish is not None))
                    offset += len(c.text)
                if finish is not None:
                    metrics.observe_usage(c.usage)
                    yield _event(shape.usage_chunk(rid, [c.usage]))
                    break
                c = await chunks.__anext__()
            yield b"data: [DONE]\n\n"
        except LlmosError as exc:
            _, err, _ = oa.error_body(exc)
            yield b"data: " + err + b"\n\n"
        finally:
            # The end, or the client gone mid-stream (cancelled unless it may come back).
            await release(chunks, keyed)

    async def _sse_many(streams: list[GenerationStream], shape: Shape, rid: str, keyed: bool) -> AsyncIterator[bytes]:
        """n > 1 choices streamed as their tokens come, each event naming its
        choice's index; no Last-Event-ID resume."""
        usages: list[Usage | None] = [None] * len(streams)
        offsets = [0] * len(streams)
        if shape.chat:
            for i in range(len(streams)):
                yield _event(shape.chunk(rid, i, Chunk(rid, 0, [], ""), 0, first=True))
        async for i, c in choices.merged(streams, lambda s: release(s, keyed)):
            if isinstance(c, LlmosError):
                yield b"data: " + oa.error_body(c)[1] + b"\n\n"
                return
            if c.text or c.finish_reason is not None:
                yield _event(shape.chunk(rid, i, c, offsets[i]))
                offsets[i] += len(c.text)
            if c.finish_reason is not None:
                metrics.observe_usage(c.usage)
                usages[i] = c.usage
        yield _event(shape.usage_chunk(rid, usages))
        yield b"data: [DONE]\n\n"

    async def models(request: Request) -> Response:
        try:
            desc = await backend.model(await caller(request))
        except LlmosError as exc:
            return _error(exc)
        return _json({"object": "list", "data": [{
            "id": desc.name, "object": "model", "created": 0, "owned_by": "llmos",
            "max_model_len": desc.max_model_len, "architecture": desc.architecture}]})

    async def health(request: Request) -> Response:
        """503 with the reason when nothing could be generated (no ready
        scheduler or driver, no kernel) or this instance is draining; 200
        ("degraded" while another service restarts) otherwise."""
        if draining():
            return _json({"status": "draining", "reason": "this gateway instance is shutting down"}, 503)
        now = time.monotonic()
        if health_seen and now - health_seen[0][0] < HEALTH_CACHE_S:
            st = health_seen[0][1]
        else:
            try:
                st = await backend.status()
            except LlmosError as exc:
                return _json({"status": "unavailable", "reason": f"the kernel did not answer: {exc.message}"}, 503)
            health_seen[:] = [(now, st)]
        ready = {i.service for i in st.instances if i.state == ChildState.READY}
        missing = [f"no {name} instance is ready" for name in NEEDED if name not in ready]
        services = {i.instance: str(i.state) for i in st.instances}
        if missing:
            return _json({"status": "unavailable", "reason": "; ".join(missing), "services": services}, 503)
        down = [i.instance for i in st.instances if i.state != ChildState.READY]
        return _json({"status": "degraded" if down else "ok", "not_ready": down, "services": services}, 200)

    async def prometheus(request: Request) -> Response:
        # Request and token counts are other tenants' activity: only a key
        # whose token the kernel lets read its Status (`status` or `admin`)
        # sees them. Prometheus sends one with `authorization` in its scrape config.
        try:
            key = await caller(request)
        except LlmosError as exc:
            return _error(exc)
        try:
            stats: Stats | None = await backend.stats(key)
        except (Unauthorized, Forbidden) as exc:
            return _error(exc)
        except LlmosError:
            stats = None
        return Response(metrics.render(stats), media_type="text/plain; version=0.0.4")

    async def crashed(request: Request, exc: Exception) -> Response:
        # A bug, not a bad input (those are LlmosErrors): the client still gets
        # OpenAI's error shape; Starlette re-raises it for the server's log.
        return _error(Internal(f"the gateway failed on this request ({type(exc).__name__})"))

    return Starlette(exception_handlers={Exception: crashed}, routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *responses_routes(backend, cfg, metrics, caller=caller, refuse=refuse, formatter=formatter,
                          check_model=_check_model),
    ])


def _check_model(asked: str, desc: ModelDescription) -> str:
    """The served model's name; `asked` may be it, its directory's basename, or empty."""
    if asked and asked not in (desc.name, Path(desc.name).name):
        raise NotFound(f"model {oa.short(asked)} does not exist; this server runs {desc.name!r}",
                       detail={"field": "model"})
    return desc.name


def _prompt(p: str | list[int | str], desc: ModelDescription) -> str | list[int]:
    """Text, or token ids checked against the model: ids outside its
    vocabulary, or more than its context holds, never reach the scheduler."""
    if isinstance(p, str):
        return p
    if all(isinstance(x, int) for x in p):
        ids = [int(x) for x in p]
        if len(ids) > desc.max_model_len:
            raise BadRequest(f"prompt has {len(ids)} token ids; the model's context holds {desc.max_model_len}",
                             detail={"field": "prompt"})
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < desc.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"prompt[{bad}] = {ids[bad]} is not a token id of this model (vocabulary: "
                             f"0..{desc.vocab_size - 1})", detail={"field": f"prompt[{bad}]"})
        return ids
    if len(p) == 1 and isinstance(p[0], str):
        return p[0]
    raise BadRequest("prompt must be text, token ids, or one text in a list (batches are not supported)",
                     detail={"field": "prompt"})


def _event(obj: Any, eid: bytes = b"") -> bytes:
    """One SSE event; one without an id keeps its predecessor's (the SSE rule)."""
    return (b"id: " + eid + b"\n" if eid else b"") + b"data: " + oa.encode(obj) + b"\n\n"
