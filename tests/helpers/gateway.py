"""The gateway's HTTP app against an in-memory backend: a fake backend and an
httpx client on the ASGI app (no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from common.config.gateway import GatewayConfig
from ipc.errors import Forbidden, LlmosError, Unauthorized
from ipc.protocol import kernel as kp
from ipc.protocol.driver import ModelDescription
from ipc.protocol.scheduler import FinishReason, RequestInfo, Submit, Usage
from sdk.generate import Chunk, GenerationStream
from services.gateway.app import create_app
from services.gateway.backend import Stats

USAGE = Usage(prompt_tokens=3, completion_tokens=4, ttft_s=0.01, total_s=0.05)


class FakeBackend:
    def __init__(self, model_dir: str = "") -> None:
        self.submits: list[tuple[str | None, Submit]] = []
        self.cancelled: list[str] = []
        self.fail_with: LlmosError | None = None
        self.pieces = ["Hel", "lo", " wor", "ld"]
        self.model_dir = model_dir
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
        """Piece i is token i; a re-sent request gets the pieces from its resume_from."""
        if self.fail_with is not None:
            raise self.fail_with
        for i in range(submit.resume_from, len(self.pieces)):
            last = i == len(self.pieces) - 1
            yield Chunk(submit.request_id, i, [i], self.pieces[i], FinishReason.LENGTH if last else None,
                        USAGE if last else None)
        if submit.resume_from >= len(self.pieces):  # the client holds every token: only the end is left
            yield Chunk(submit.request_id, len(self.pieces), [], "", FinishReason.LENGTH, USAGE)

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def model(self, api_key: str | None) -> ModelDescription:
        return ModelDescription("tiny", "LlamaForCausalLM", self.model_dir, 300, 280, 256, 64, 16, [257], 256,
                                "float32", "cpu", 1000, 0)

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
