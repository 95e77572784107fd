"""The frontend's Prometheus metrics, in a registry of their own (one per Frontend)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
DISPATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class FrontendMetrics:
    """TTFT, inter-token, end-to-end and dispatch latency histograms; request and token counters;
    requests in flight. `render()` gives the Prometheus text format."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("kvferry_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("kvferry_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("kvferry_e2e_request_latency_seconds", "End-to-end latency of finished requests",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.dispatch = Histogram("kvferry_dispatch_latency_seconds", "Scheduler dispatch round trip",
                                  buckets=DISPATCH_BUCKETS, registry=r)
        self.requests = Counter("kvferry_requests", "Requests by outcome (stop, length, cancelled, timeout, "
                                "error, rejected, unavailable, invalid)", ["outcome"], registry=r)
        self.generated_tokens = Counter("kvferry_generated_tokens", "Tokens streamed to clients", registry=r)
        self.in_flight = Gauge("kvferry_requests_in_flight", "Requests being generated", registry=r)
        self.queued_bytes = Gauge("kvferry_queued_bytes", "Bytes reserved by the requests in flight "
                                  "(bounded by frontend.max_queued_bytes)", registry=r)
        self.resumes = Counter("kvferry_request_resumes", "Requests taken from a failed worker: resumed on "
                               "another one, or failed with an error", ["outcome"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
