"""The gateway's HTTP app against an in-memory backend: a fake backend and an
httpx client on the ASGI app (no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from common.config.gateway import GatewayConfig
from ipc.errors import Forbidden, LlmosError, Unauthorized
from ipc.protocol import kernel as kp
from ipc.protocol.driver import ModelDescription
from ipc.protocol.scheduler import FinishReason, Submit, Usage
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

    async def authenticate(self, api_key: str) -> None:
        self.logins.append(api_key)
        if api_key.startswith("bad"):
            raise Unauthorized("unknown API key")

    rid = "r1"

    async def stream(self, api_key: str | None, submit: Submit) -> GenerationStream:
        self.submits.append((api_key, submit))
        return GenerationStream(self.rid, self.chunks(submit), self.cancel)

    async def chunks(self, submit: Submit) -> AsyncIterator[Chunk]:
        if self.fail_with is not None:
            raise self.fail_with
        for i, p in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            yield Chunk("r1", i, [i], p, FinishReason.LENGTH if last else None, USAGE if last else None)

    async def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def model(self, api_key: str | None) -> ModelDescription:
        return ModelDescription("tiny", "LlamaForCausalLM", self.model_dir, 300, 280, 256, 64, 16, [257], 256,
                                "float32", "cpu", 1000, 0)

    async def stats(self, api_key: str | None = None) -> Stats:
        if api_key is not None and not api_key.startswith("ops"):
            raise Forbidden(f"principal {api_key!r} holds no right covering Status on 'kernel'")
        st = kp.StatusReply(1, 2.0, [kp.InstanceInfo("echo", "echo", 5, kp.ChildState.READY, restarts=2)],
                            kp.KernelCounters(routed=7))
        return Stats(st, None, None)


KEY = {"Authorization": "Bearer k-1"}


def client(backend: FakeBackend, config: GatewayConfig | None = None, key: str | None = "k-1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(backend, config)), base_url="http://t",
                             headers={"Authorization": f"Bearer {key}"} if key else {})
