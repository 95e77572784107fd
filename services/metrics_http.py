"""A Prometheus /metrics and /health endpoint over HTTP, on a thread of its own.

The scheduler and the workers have no web framework (their traffic is ZeroMQ); prometheus_client's
WSGI app on a wsgiref server is enough for a scraper and a health probe, and a thread keeps
scrapes off the event loop. (The frontend serves both paths on its API port.)

GET /metrics: the registry in the Prometheus text format. GET /health: 200 with a small JSON body
while `health()` says ok, else 503 (no `health`: always 200).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

T = TypeVar("T")
HealthFn = Callable[[], tuple[bool, dict[str, Any]]]
"""Returns (ok, details for the JSON body); called on the HTTP thread."""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not news
        pass


class MetricsServer:
    """A running /metrics (+ /health) endpoint; `close()` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


def _app(registry: CollectorRegistry, health: HealthFn | None) -> Callable[..., Any]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "/").rstrip("/") != "/health":
            return metrics_app(environ, start_response)
        try:
            ok, details = health() if health is not None else (True, {})
        except Exception as exc:  # noqa: BLE001 - a failing probe is an unhealthy service
            ok, details = False, {"error": f"{type(exc).__name__}: {exc}"}
        body = json.dumps({"status": "ok" if ok else "unavailable", **details}).encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def start_metrics_server(host: str, port: int, registry: CollectorRegistry,
                         health: HealthFn | None = None) -> MetricsServer:
    """Serve `registry` at http://host:port/metrics (any path but /health answers with the metrics)."""
    server = make_server(host, port, _app(registry, health), handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(server, thread)


def call_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout_s: float = 2.0) -> T:
    """Run `fn` on `loop`'s thread and return its result: how a scrape reads state that only the
    event loop mutates. Runs `fn` directly when called on that thread. Raises TimeoutError when
    the loop does not get to it within `timeout_s` (it is stuck or gone)."""
    try:
        if asyncio.get_running_loop() is loop:
            return fn()
    except RuntimeError:  # no loop running on this thread
        pass
    fut: Future[T] = Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            fut.set_exception(exc)

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError as exc:  # the loop is closed
        raise TimeoutError(f"event loop closed: {exc}") from None
    try:
        return fut.result(timeout_s)
    except FutureTimeout:
        fut.cancel()
        raise TimeoutError(f"the event loop did not answer within {timeout_s} s") from None
