"""The gateway's HTTP app against an in-memory backend: a fake backend and an
httpx client on the ASGI app (no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from common.config.gateway import GatewayConfig
from ipc.errors import Forbidden, LlmosError, NotFound, Unauthorized
from ipc.protocol import kernel as kp
from ipc.protocol.driver import ModelDescription
from ipc.protocol.scheduler import FinishReason, RequestInfo, Submit, Usage
from sdk.generate import Chunk, GenerationStream
from services.gateway.app import create_app
from services.gateway.backend import Stats
from text.shipped import SHIPPED_FILES
from text.tokenizer import BYTE_TOKENIZER_FILE

USAGE = Usage(prompt_tokens=3, completion_tokens=4, ttft_s=0.01, total_s=0.05)


class FakeBackend:
    def __init__(self, model_dir: str = "") -> None:
        self.submits: list[tuple[str | None, Submit]] = []
        self.cancelled: list[str] = []
        self.fail_with: LlmosError | None = None
        self.pieces = ["Hel", "lo", " wor", "ld"]
        self.model_dir = model_dir
        # What a driver sends of its tokenizer (the gateway never reads model_dir).
        # The directory's tokenizer files, the byte tokenizer where it has none.
        root = Path(model_dir) if model_dir else None
        self.tokenizer_files = {n: (root / n).read_text() for n in SHIPPED_FILES
                                if root is not None and (root / n).is_file()}
        if "tokenizer.json" not in self.tokenizer_files:
            self.tokenizer_files[BYTE_TOKENIZER_FILE] = '{"type": "byte"}'
        self.logins: list[str] = []
        self.known: dict[str, RequestInfo] = {}  # request id -> what the scheduler says of it
        self.detached: list[str] = []
        ready = kp.ChildState.READY
        self.instances = [kp.InstanceInfo("echo", "echo", 5, ready, restarts=2),
                          kp.InstanceInfo("scheduler", "scheduler", 6, ready),
                          kp.InstanceInfo("driver", "cpu", 7, ready)]
        self.status_calls = 0

    async def authenticate(self, api_key: str) -> None:
        self.logins.append(api_key)
        if api_key.startswith("bad"):
            raise Unauthorized("unknown API key")

    async def principal(self, api_key: str | None) -> str:
        return f"tenant-of-{api_key}" if api_key else ""

    async def request_info(self, api_key: str | None, request_id: str) -> RequestInfo | None:
        return self.known.get(request_id)

    async def status(self) -> kp.StatusReply:
        self.status_calls += 1
        return kp.StatusReply(1, 2.0, list(self.instances), kp.KernelCounters(routed=7))

    async def stream(self, api_key: str | None, submit: Submit) -> GenerationStream:
        self.submits.append((api_key, submit))
        stream = GenerationStream(submit.request_id, self.chunks(submit), self.cancel)
        detach = stream.detach

        async def detached() -> None:
            if not stream._over:
                self.detached.append(submit.request_id)
            await detach()

        stream.detach = detached  # type: ignore[method-assign]
        return stream

    async def chunks(self, submit: Submit) -> AsyncIterator[Chunk]:
        """Piece i is token 65 + i ("A"...), of logprob -0.1 (i + 1) + 0.01 j
        where j is the choice's index in its fork group (its last piece ends
        in "#j" then); a re-sent request gets the pieces from its resume_from."""
        if self.fail_with is not None:
            raise self.fail_with
        j = int(submit.request_id.rsplit(".", 1)[1]) if submit.fork_group else 0
        for i in range(submit.resume_from, len(self.pieces)):
            last = i == len(self.pieces) - 1
            lp = -0.1 * (i + 1) + 0.01 * j
            top = [(65 + i, lp), (97 + i, lp - 1.0)][:submit.params.logprobs]
            yield Chunk(submit.request_id, i, [65 + i], self.pieces[i] + (f"#{j}" if last and submit.fork_group else ""),
                        FinishReason.LENGTH if last else None, USAGE if last else None, logprobs=[lp],
                        top_logprobs=[top] if submit.params.logprobs else [])
        if submit.resume_from >= len(self.pieces):  # the client holds every token: only the end is left
            yield Chunk(submit.request_id, len(self.pieces), [], "", FinishReason.LENGTH, USAGE)

    async def call(self, api_key: str | None, service: str, msg: Any) -> Any:
        raise NotFound(f"no session {getattr(msg, 'session', '')!r}")  # the Responses API's tests: none stored

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def model(self, api_key: str | None) -> ModelDescription:
        return ModelDescription("tiny", "LlamaForCausalLM", self.model_dir, 300, 280, 256, 64, 16, [257], 256,
                                "float32", "cpu", 1000, 0, tokenizer_files=self.tokenizer_files)

    async def stats(self, api_key: str | None = None) -> Stats:
        if api_key is not None and not api_key.startswith("ops"):
            raise Forbidden(f"principal {api_key!r} holds no right covering Status on 'kernel'")
        return Stats(await self.status(), None, None)


KEY = {"Authorization": "Bearer k-1"}


def client(backend: FakeBackend, config: GatewayConfig | None = None, key: str | None = "k-1",
           draining: bool = False) -> httpx.AsyncClient:
    app = create_app(backend, config, lambda: draining)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                             headers={"Authorization": f"Bearer {key}"} if key else {})


class SlowBackend(FakeBackend):
    """A generation that goes on for minutes: a client always leaves it first."""

    async def chunks(self, submit: Submit) -> AsyncIterator[Chunk]:
        import anyio

        for i in range(10_000):
            yield Chunk(submit.request_id, i, [i], f"t{i} ")
            await anyio.sleep(0.01)


async def leave_after_first_event(backend: FakeBackend, body: dict[str, Any], headers: dict[str, str],
                                  until: Callable[[], object]) -> None:
    """Over a real socket (uvicorn): open a stream, read its first event, hang
    up, then wait (bounded) until `until()` says the gateway reacted."""
    import anyio
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(backend), host="127.0.0.1", port=0, lifespan="off",
                                           log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            async with c.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
        with anyio.fail_after(10):
            while not until():
                await anyio.sleep(0.01)
        server.should_exit = True
