"""The frontend's Prometheus metrics, in a registry of their own (one per Frontend).

Besides the `kvferry_*` series, the latency histograms and token counters are exported under
vLLM's names too (`vllm:time_to_first_token_seconds`, ..., labelled `model_name`), so dashboards
and autoscalers written for vLLM (production-stack's KEDA recipe, vLLM's Grafana dashboard) read
kvferry unchanged. The workers export vLLM's per-engine gauges (services.worker.engine_metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
DISPATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Both:
    """One observation, recorded in the kvferry series and in its vLLM-named twin."""

    __slots__ = ("ours", "vllm")

    def __init__(self, ours: Any, vllm: Any) -> None:
        self.ours, self.vllm = ours, vllm

    def observe(self, value: float) -> None:
        self.ours.observe(value)
        self.vllm.observe(value)

    def inc(self, amount: float = 1.0) -> None:
        self.ours.inc(amount)
        self.vllm.inc(amount)


# Every outcome's series is served from the start, at 0. A labelled series that first appears with
# its first event already counted hides that event from rate() and increase(): Prometheus sees no
# increase in a series' first sample (the dashboard's requests / s showed 0 for a first burst).
REQUEST_OUTCOMES = ("stop", "length", "cancelled", "timeout", "error", "rejected", "unavailable", "invalid")

# vLLM's names of the series the frontend has (`_total` is added to the counters' samples)
VLLM_NAMES = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")


class FrontendMetrics:
    """TTFT, inter-token, end-to-end and dispatch latency histograms; request and token counters;
    requests in flight. `render()` gives the Prometheus text format."""

    def __init__(self, model_name: str = "") -> None:
        r = self.registry = CollectorRegistry()
        m = ["model_name"]

        def twin_histogram(ours: str, vllm: str, help_: str, buckets: tuple[float, ...]) -> _Both:
            return _Both(Histogram(ours, help_, buckets=buckets, registry=r),
                         Histogram(vllm, help_ + " (vLLM's name)", m, buckets=buckets, registry=r).labels(model_name))

        self.ttft = twin_histogram("kvferry_time_to_first_token_seconds", "vllm:time_to_first_token_seconds",
                                   "Time to first token", LATENCY_BUCKETS)
        self.itl = twin_histogram("kvferry_inter_token_latency_seconds", "vllm:inter_token_latency_seconds",
                                  "Time between streamed tokens", ITL_BUCKETS)
        self.e2e = twin_histogram("kvferry_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds",
                                  "End-to-end latency of finished requests", LATENCY_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of the requests started (vLLM's name)", m,
                                     registry=r).labels(model_name)
        self.dispatch = Histogram("kvferry_dispatch_latency_seconds", "Scheduler dispatch round trip",
                                  buckets=DISPATCH_BUCKETS, registry=r)
        self.requests = Counter("kvferry_requests", "Requests by outcome (stop, length, cancelled, timeout, "
                                "error, rejected, unavailable, invalid)", ["outcome"], registry=r)
        for outcome in REQUEST_OUTCOMES:  # at 0 from the start: see REQUEST_OUTCOMES
            self.requests.labels(outcome=outcome)
        self.generated_tokens = _Both(
            Counter("kvferry_generated_tokens", "Tokens streamed to clients", registry=r),
            Counter("vllm:generation_tokens", "Tokens streamed to clients (vLLM's name)", m, registry=r).labels(model_name))
        self.in_flight = Gauge("kvferry_requests_in_flight", "Requests being generated", registry=r)
        self.queued_bytes = Gauge("kvferry_queued_bytes", "Bytes reserved by the requests in flight "
                                  "(bounded by frontend.max_queued_bytes)", registry=r)
        self.resumes = Counter("kvferry_request_resumes", "Requests taken from a failed worker: resumed on "
                               "another one, or failed with an error", ["outcome"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
