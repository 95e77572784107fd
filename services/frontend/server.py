"""The frontend service: tokenizer + Router + Generator + HTTP app (uvicorn) + SDK endpoint.

    fe = Frontend(cfg)            # loads the tokenizer (no weights)
    await fe.start()              # binds every socket, serves HTTP; fe.http_url, fe.sdk_endpoint
    ...
    await fe.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn
import zmq.asyncio

from engine.weights.tokenizer_source import resolve_tokenizer
from protocol.security import curve_keys, use_curve
from services.config import KvferryConfig
from services.frontend.generation import Generator
from services.frontend.http_api import ApiContext, create_app
from services.frontend.metrics import FrontendMetrics
from services.frontend.params import RequestParser
from services.frontend.router import Router
from services.frontend.sdk_server import SdkServer
from services.log import get_logger

log = get_logger("kvferry.frontend")


class Frontend:
    """One frontend process's services. `tokenizer` may be passed in (tests) to skip loading."""

    def __init__(self, cfg: KvferryConfig, tokenizer=None, model_name: str | None = None,  # noqa: ANN001
                 max_context: int | None = None) -> None:
        self.cfg = cfg
        fcfg = cfg.frontend
        if tokenizer is None:
            tokenizer, model_name, max_context = resolve_tokenizer(fcfg.model)
        self.tokenizer = tokenizer
        self.model_name = fcfg.served_model_name or model_name or fcfg.model
        aliases = tuple(n for n in (fcfg.model, model_name) if n)
        self.ctx = use_curve(zmq.asyncio.Context(), curve_keys(cfg.cluster, "frontend"))  # Curve when configured
        self.metrics = FrontendMetrics(self.model_name)
        self.router = Router(cfg, self.ctx, on_dispatch=self.metrics.dispatch.observe,
                             on_resume=lambda outcome: self.metrics.resumes.labels(outcome=outcome).inc())
        self.generator = Generator(self.router, tokenizer, self.metrics)
        self.parser = RequestParser(fcfg, tokenizer, self.model_name, aliases, max_context)
        self.app = create_app(ApiContext(fcfg, self.model_name, self.parser, self.generator, self.router, self.metrics))
        self.sdk_endpoint = cfg.cluster.frontend_sdk(fcfg.index)
        self.sdk: SdkServer | None = None
        self.server: uvicorn.Server | None = None
        self._serve_task: asyncio.Task | None = None
        self._sock: socket.socket | None = None
        self.http_url = ""

    async def start(self) -> None:
        """Bind the token socket, the SDK endpoint and the HTTP port; returns once all serve."""
        await self.router.start()
        self.sdk = SdkServer(self.cfg.frontend, self.cfg.cluster.bind(self.sdk_endpoint), self.parser,
                             self.generator, self.router.frontend_id, self.ctx)
        self.sdk.start()
        cl = self.cfg.cluster
        self._sock = socket.socket(socket.AF_INET6 if ":" in cl.http_host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((cl.http_host, cl.http_port))
        port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, http="httptools", lifespan="off", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign] # the owner handles signals
        self._serve_task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self._sock]))
        while not self.server.started:
            if self._serve_task.done():
                self._serve_task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        host = f"[{cl.http_host}]" if ":" in cl.http_host else cl.http_host
        self.http_url = f"http://{host}:{port}"
        log.info("frontend.ready", http=self.http_url, sdk=self.sdk_endpoint, tokens=self.router.reply_address,
                 model=self.model_name)

    async def stop(self) -> None:
        """Stop serving: abort in-flight requests on their workers, close every socket."""
        for rid in list(self.router.streams):
            self.router.abort(rid, "frontend stopping")
        if self.server is not None:
            self.server.should_exit = True
        if self._serve_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._serve_task, 5.0)
        if self.sdk is not None:
            await self.sdk.close()
        await self.router.close()
        if self._sock is not None:
            self._sock.close()
        self.ctx.destroy(linger=0)
        log.info("frontend.stopped")
