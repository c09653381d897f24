"""`python -m services.gateway [--listen HOST:PORT]`: the HTTP gateway as a
supervised service. It registers with the kernel like any service (so it is
restarted when it dies) and reaches the other services as a client, with each
caller's own capability token.

Under `llmos up` several instances serve one port: the kernel binds it and
hands every instance the listening socket (common/listen.py); run by hand,
the gateway binds `--listen` itself. SIGTERM drains: the instance stops
accepting (the others take the new connections), lets its streams finish
for at most `[gateway] drain_s`, then exits; a stream it must cut is left
running in the scheduler for its client to resume elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskGroup

from ipc.errors import BadRequest
from common.home import front_endpoint
from common.listen import inherited_listener, parse_listen
from common.logs import get_logger
from sdk.service import Service
from services.gateway.app import create_app
from services.gateway.backend import KernelBackend
from common.config.gateway import GatewayConfig, load_gateway_config
from services.gateway.connections import guarded_h11

log = get_logger()

# After it stops accepting, how long a draining instance waits for the
# requests of connections it had just accepted (a client sends its request
# right after connecting) before closing the connections that carry none.
ACCEPTED_GRACE_S = 0.5


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals belong to the Service (it stops the whole process cleanly).
        yield


class GatewayService(Service):
    name = "gateway"

    def __init__(self, argv: list[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        ap = argparse.ArgumentParser(prog="gateway")
        ap.add_argument("--listen", default="127.0.0.1:8000")
        ap.add_argument("--config", help="TOML file; its [gateway] table is read (default: the kernel's)")
        ap.add_argument("--max-tokens", type=int, help="default max_tokens")
        ap.add_argument("--max-body-bytes", type=int, help="largest request body accepted")
        args = ap.parse_args(sys.argv[1:] if argv is None else argv)
        self.listener = inherited_listener()
        self.host, self.port = parse_listen(args.listen)
        if self.listener is not None:
            self.host, self.port = self.listener.getsockname()[:2]
        self.config: GatewayConfig = load_gateway_config(args.config, default_max_tokens=args.max_tokens,
                                                         max_body_bytes=args.max_body_bytes)
        self.backend = KernelBackend(front_endpoint(self.home), self._system_call,
                                     allow_anonymous=self.config.allow_anonymous)
        self.draining = False
        self.app = create_app(self.backend, self.config, lambda: self.draining, self.instance)
        self.server: _Server | None = None

    async def _system_call(self, service: str, msg: Any) -> Any:
        return await self.call(service, msg, timeout=10.0)

    def ready_meta(self) -> dict[str, str | int | float | bool]:
        return {"http": f"http://{self.host}:{self.port}"}

    async def on_start(self) -> None:
        c = self.config
        config = uvicorn.Config(self.app, host=self.host, port=self.port, lifespan="off", log_level="warning",
                                access_log=False, loop="none", http=guarded_h11(c),
                                h11_max_incomplete_event_size=c.max_header_bytes,
                                timeout_keep_alive=c.keep_alive_s, timeout_graceful_shutdown=math.ceil(c.drain_s))
        config.load()
        self.server = _Server(config)
        # uvicorn's serve() split in two: bind before READY (a busy port fails
        # the start, visibly), serve from the service's task group after it.
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup(sockets=[self.listener] if self.listener is not None else None)
        if self.server.should_exit:
            raise BadRequest(f"cannot listen on {self.host}:{self.port}")
        log.info("gateway.listening", url=f"http://{self.host}:{self.port}")

    async def background(self, tg: TaskGroup) -> None:
        assert self.server is not None
        tg.start_soon(self.server.main_loop)

    def stop(self, reason: str) -> None:
        if reason == "signal SIGTERM" and not self.draining and self.server is not None and self._tg is not None:
            self.draining = True
            self._tg.start_soon(self._drain, reason)
            return
        super().stop(reason)

    async def _drain(self, reason: str) -> None:
        """Stop accepting; wait for the open connections (at most drain_s;
        uvicorn then cancels what is left); then stop the service."""
        assert self.server is not None
        log.info("gateway.draining", connections=len(self.server.server_state.connections),
                 drain_s=self.config.drain_s)
        try:
            for listener in self.server.servers:
                listener.close()
            # A connection accepted just before has its request on the way:
            # shutdown() would close it as idle, unanswered.
            await anyio.sleep(ACCEPTED_GRACE_S)
            await self.server.shutdown()
        finally:
            self.server.started = False  # on_stop has nothing left to shut
            super().stop(reason)

    async def on_stop(self) -> None:
        if self.server is not None and self.server.started:
            self.draining = True
            self.server.should_exit = True
            await self.server.shutdown()
        self.backend.close()
