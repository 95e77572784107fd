"""The worker's Prometheus endpoint: see services.metrics_http (shared with the scheduler)."""

from __future__ import annotations

from services.metrics_http import MetricsServer, start_metrics_server

__all__ = ["MetricsServer", "start_metrics_server"]
