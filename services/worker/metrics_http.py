"""The worker's Prometheus endpoint: GET /metrics over HTTP on a thread of its own.

The worker has no web framework (its traffic is ZeroMQ); prometheus_client's WSGI app on a
wsgiref server is enough for a scraper, and a thread keeps scrapes off the event loop.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not news
        pass


class MetricsServer:
    """A running /metrics endpoint; `close()` stops it."""

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


def start_metrics_server(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` at http://host:port/metrics (any path answers with the metrics)."""
    server = make_server(host, port, make_wsgi_app(registry), handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
