"""The worker's engine gauges, registered on the worker's Prometheus registry (the one the
migration metrics use, served at the worker's /metrics).

Values are read at scrape time: the scrape (on the metrics HTTP thread) asks the event loop for
the worker's state and the engine thread for `LLMEngine.stats()`, between two steps, so they are
as fresh as the scrape and never race with the engine. Prometheus adds the target's `instance`
label; `kvferry_worker_info` carries the worker id for joins with the scheduler's per-instance
series (`instance_id`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.log import get_logger
from services.metrics_http import call_on_loop

if TYPE_CHECKING:
    from engine.engine import EngineStats
    from services.worker.context import WorkerContext
    from services.worker.migration.service import MigrationService

log = get_logger(__name__)

SCRAPE_TIMEOUT_S = 5.0  # a step in progress delays the stats read by at most one step

# name -> help; every family this collector yields (tests and docs list them from here)
ENGINE_METRICS = {
    "kvferry_worker_info": "Constant 1, labelled with the worker's id, engine, model and prefill/decode role",
    "kvferry_worker_capacity_blocks": "KV cache blocks of the engine",
    "kvferry_worker_free_blocks": "Free KV cache blocks",
    "kvferry_worker_used_blocks": "KV cache blocks held by requests or migration reservations",
    "kvferry_worker_block_size_tokens": "Tokens per KV cache block",
    "kvferry_worker_running_requests": "Requests in the running batch",
    "kvferry_worker_waiting_requests": "Requests queued for admission",
    "kvferry_worker_head_of_line_blocks": "Blocks the first waiting request needs (0 when none waits)",
    "kvferry_worker_preemptions_total": "Requests preempted (recomputed later) since the worker started",
    "kvferry_worker_migrations_in_flight": "Migrations in progress, by role (out: source, in: destination)",
    "kvferry_worker_draining": "1 while the worker is draining (takes no new requests)",
    "kvferry_worker_registered": "1 while the worker is registered with the scheduler",
    "kvferry_worker_prefix_cache_queries_total": "Prompt tokens of admitted requests looked up in the prefix cache",
    "kvferry_worker_prefix_cache_hits_total": "Of those, tokens whose KV was found cached (not prefilled again)",
    "kvferry_worker_cached_blocks": "KV blocks registered in the prefix cache (unowned ones count as free)",
}
# vLLM's names of the engine gauges dashboards and autoscalers key on (labelled `model_name`)
VLLM_NAMED = {
    "vllm:num_requests_running": "Requests in the running batch (vLLM's name)",
    "vllm:num_requests_waiting": "Requests queued for admission (vLLM's name)",
    "vllm:kv_cache_usage_perc": "KV cache usage, 0 to 1 (vLLM's name)",
}
# Only vLLM workers have these: how migrated requests' KV entered vLLM (the kvferry KV connector).
VLLM_METRICS = {
    "kvferry_worker_vllm_continuations_total": "Migrated (or reattached) requests that started in vLLM",
    "kvferry_worker_vllm_kv_loaded_tokens_total": "Their tokens whose KV was not computed again (loaded, or cached)",
    "kvferry_worker_vllm_kv_local_hit_tokens_total": "... of which vLLM's prefix cache here held already (not copied)",
    "kvferry_worker_vllm_kv_recomputed_tokens_total": "Their tokens computed before the move and again here",
    "kvferry_worker_vllm_kv_recomputed_tokens_max": "Most tokens one of them recomputed (at most a block)",
}


class EngineCollector(Collector):
    """Yields the ENGINE_METRICS families for one worker; nothing when the state cannot be read
    (the worker is stopping), so a scrape never fails."""

    def __init__(self, ctx: "WorkerContext", migration: "MigrationService | None",
                 loop: asyncio.AbstractEventLoop) -> None:
        self.worker = ctx
        self.migration = migration
        self.loop = loop

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no description: collect() is only called at scrape time

    def _read(self) -> tuple["EngineStats", dict[str, float], dict[str, int] | None] | None:
        w = self.worker
        if w.stopping or _on_loop(self.loop):  # on the loop itself the engine read would deadlock
            return None

        def read(e: Any) -> tuple["EngineStats", dict[str, int] | None]:
            counters = getattr(e, "kv_load_counters", None)
            return e.stats(), counters() if counters else None

        fut = asyncio.run_coroutine_threadsafe(w.driver.call(read, timeout_s=SCRAPE_TIMEOUT_S), self.loop)
        stats, kv_load = fut.result(SCRAPE_TIMEOUT_S + 1.0)

        def state() -> dict[str, float]:
            mig = self.migration
            return {"draining": float(w.draining), "registered": float(w.link.registered.is_set()),
                    "out": float(len(mig.source)) if mig else 0.0, "in": float(len(mig.destination)) if mig else 0.0}

        return stats, call_on_loop(self.loop, state, SCRAPE_TIMEOUT_S), kv_load

    def collect(self) -> Iterator[Metric]:
        try:
            read = self._read()
        except Exception as exc:  # noqa: BLE001 - the loop or the engine is gone: no engine series
            log.debug("metrics.engine_unreadable", error=f"{type(exc).__name__}: {exc}")
            read = None
        if read is None:
            return
        stats, state, kv_load = read
        w, h = self.worker, ENGINE_METRICS
        info = GaugeMetricFamily("kvferry_worker_info", h["kvferry_worker_info"],
                                 labels=["worker_id", "engine", "model", "role"])
        info.add_metric([w.worker_id, w.info.kind, w.info.model, w.state.role], 1.0)
        yield info
        for name, value in (
            ("kvferry_worker_capacity_blocks", stats.num_blocks),
            ("kvferry_worker_free_blocks", stats.num_free_blocks),
            ("kvferry_worker_used_blocks", stats.num_blocks - stats.num_free_blocks),
            ("kvferry_worker_block_size_tokens", stats.block_size),
            ("kvferry_worker_running_requests", stats.num_running),
            ("kvferry_worker_waiting_requests", stats.num_waiting),
            ("kvferry_worker_head_of_line_blocks", stats.head_of_line_blocks),
            ("kvferry_worker_draining", state["draining"]),
            ("kvferry_worker_registered", state["registered"]),
            ("kvferry_worker_cached_blocks", stats.num_cached_blocks),
        ):
            yield GaugeMetricFamily(name, h[name], value=float(value))
        used = (stats.num_blocks - stats.num_free_blocks) / stats.num_blocks if stats.num_blocks else 0.0
        for name, value in (("vllm:num_requests_running", stats.num_running),
                            ("vllm:num_requests_waiting", stats.num_waiting), ("vllm:kv_cache_usage_perc", used)):
            g = GaugeMetricFamily(name, VLLM_NAMED[name], labels=["model_name"])
            g.add_metric([w.info.model], float(value))
            yield g
        for name, value in (("kvferry_worker_prefix_cache_queries_total", stats.prefix_query_tokens),
                            ("kvferry_worker_prefix_cache_hits_total", stats.prefix_hit_tokens)):
            yield CounterMetricFamily(name.removesuffix("_total"), h[name], value=float(value))
        # The family name drops `_total`; prometheus_client adds it to the sample.
        yield CounterMetricFamily("kvferry_worker_preemptions", h["kvferry_worker_preemptions_total"],
                                  value=float(stats.num_preemptions))
        mig = GaugeMetricFamily("kvferry_worker_migrations_in_flight", h["kvferry_worker_migrations_in_flight"],
                                labels=["role"])
        mig.add_metric(["out"], state["out"])
        mig.add_metric(["in"], state["in"])
        yield mig
        if kv_load is not None:
            v = VLLM_METRICS
            for key, name in (("continuations", "kvferry_worker_vllm_continuations_total"),
                              ("loaded_tokens", "kvferry_worker_vllm_kv_loaded_tokens_total"),
                              ("local_hit_tokens", "kvferry_worker_vllm_kv_local_hit_tokens_total"),
                              ("recomputed_tokens", "kvferry_worker_vllm_kv_recomputed_tokens_total")):
                yield CounterMetricFamily(name.removesuffix("_total"), v[name], value=float(kv_load[key]))
            yield GaugeMetricFamily("kvferry_worker_vllm_kv_recomputed_tokens_max",
                                    v["kvferry_worker_vllm_kv_recomputed_tokens_max"],
                                    value=float(kv_load["max_recomputed_tokens"]))


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def register_engine_metrics(registry: CollectorRegistry, ctx: "WorkerContext", migration: "MigrationService | None",
                            loop: asyncio.AbstractEventLoop) -> EngineCollector:
    """Add the engine gauges of a worker to `registry` (the worker's migration-metrics registry)."""
    collector = EngineCollector(ctx, migration, loop)
    registry.register(collector)
    return collector


def worker_health(ctx: "WorkerContext", health: Callable[[], tuple[bool, str]],
                  loop: asyncio.AbstractEventLoop) -> tuple[bool, dict[str, object]]:
    """/health of a worker: ok while its event loop answers and `health()` (Worker.health: not
    stopping, the engine thread not stuck) says so. Registration with the scheduler is reported,
    not required (the scheduler may start later)."""
    worker = ctx

    def state() -> tuple[bool, dict[str, object]]:
        ok, why = health()
        details: dict[str, object] = {"worker_id": worker.worker_id, "registered": worker.link.registered.is_set(),
                                      "draining": worker.draining, "requests": len(worker.routes)}
        if not ok:
            details["reason"] = why
        return ok, details

    return call_on_loop(loop, state, 2.0)
