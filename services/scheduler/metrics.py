"""The scheduler's Prometheus metrics (served at /metrics on `[scheduler] metrics_port`).

Two kinds:
- Events, counted as they happen by wrapping the message handler (`SchedulerMetrics.wrap`):
  dispatches by outcome and the decision time, the prefix hit each dispatch chose (the prompt
  tokens the chosen instance holds cached), worker registrations / deregistrations, deaths
  (`on_dead`, from the liveness sweep), migration results by outcome, reason and trigger, and the
  downtime the source measured.
- State, read at scrape time on the event loop (the HTTP thread never touches the scheduler's
  structures): per-instance gauges from `SchedulerCore.status()` (label `instance_id`: the worker
  id; not `instance`, which Prometheus sets to the scrape target) with the prefix index's entries,
  migrations in flight and expired, instance-seconds, scaling actions, KV-event messages applied
  and dropped, resyncs asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protocol import (
    Deregister,
    DispatchReply,
    DispatchRequest,
    ErrorCode,
    ErrorReply,
    MigrationResult,
    RegisterReply,
    RegisterWorker,
)
from protocol.base import Message
from protocol.sockets import Received
from services.log import get_logger
from services.metrics_http import call_on_loop

log = get_logger("kvferry.scheduler.metrics")

DECISION_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
HIT_TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536)
DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
DISPATCH_OUTCOMES = ("dispatched", "unavailable", "overloaded", "error")
MIGRATION_TRIGGERS = ("ctl", "drain", "load")
MAX_REASONS = 32  # distinct abort reasons kept as label values (workers send short labels; the rest: "other")
SCRAPE_TIMEOUT_S = 2.0

# Families read at scrape time: name -> help (the event metrics are declared in SchedulerMetrics).
STATE_METRICS = {
    "kvferry_instance_capacity_blocks": "KV cache blocks of the instance (as of its latest load report)",
    "kvferry_instance_free_blocks": "Free KV cache blocks of the instance",
    "kvferry_instance_used_blocks": "Used KV cache blocks of the instance",
    "kvferry_instance_running_requests": "Requests running on the instance",
    "kvferry_instance_waiting_requests": "Requests queued on the instance",
    "kvferry_instance_freeness": "The policy's freeness of the instance (decode steps its free blocks last)",
    "kvferry_instance_up": "1 while the instance is registered and alive, 0 once declared dead",
    "kvferry_instance_draining": "1 while the instance is draining",
    "kvferry_instance_cached_blocks": "KV blocks in the instance's prefix cache (as of its latest load report)",
    "kvferry_instance_prefix_index_blocks": "Of those, the block hashes the scheduler's prefix index holds",
    "kvferry_scheduler_instances": "Registered instances",
    "kvferry_scheduler_migrations_in_flight": "Migrations commanded and not yet ended",
    "kvferry_scheduler_migrations_expired_total": "Accepted migrations whose result never came",
    "kvferry_scheduler_instance_seconds_total": "Seconds instances were registered and alive, summed over instances",
    "kvferry_scheduler_scale_actions_total": "Auto-scaling actions, by direction (up, down)",
    "kvferry_scheduler_kv_events_total": "KvEvents messages from workers, by outcome (applied; dropped: out of "
                                         "order, awaiting a reset, malformed or unreadable, unknown worker)",
    "kvferry_scheduler_kv_resyncs_total": "Resyncs of a worker's KV events asked by the scheduler (ResyncKvEvents)",
}

Handler = Callable[[Received], Awaitable[Message | None]]


class SchedulerMetrics:
    """The scheduler's registry: event counters here, state through a collector (`attach`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.dispatches = Counter("kvferry_scheduler_dispatches", "Dispatch requests by outcome (dispatched, "
                                  "unavailable, overloaded, error)", ["outcome"], registry=r)
        self.decision = Histogram("kvferry_scheduler_dispatch_decision_seconds", "Time the scheduler took to "
                                  "answer a dispatch request (in process, without the network)",
                                  buckets=DECISION_BUCKETS, registry=r)
        self.registrations = Counter("kvferry_scheduler_worker_registrations", "Worker registrations (first "
                                     "and repeated)", registry=r)
        self.deregistrations = Counter("kvferry_scheduler_worker_deregistrations", "Workers that deregistered "
                                       "(stopped cleanly)", registry=r)
        self.deaths = Counter("kvferry_scheduler_worker_deaths", "Workers declared dead (silent past the "
                              "heartbeat timeout)", registry=r)
        self.migrations = Counter("kvferry_scheduler_migrations", "Migration results by outcome (committed, "
                                  "aborted), abort reason (none when committed) and trigger (ctl, drain, load, "
                                  "unknown)", ["outcome", "reason", "trigger"], registry=r)
        self.hit_tokens = Histogram("kvferry_scheduler_dispatch_hit_tokens", "Prompt tokens the chosen "
                                    "instance holds cached, per dispatch that sent block hashes",
                                    buckets=HIT_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kvferry_scheduler_dispatch_prompt_tokens", "Prompt tokens of the "
                                     "dispatches that sent block hashes (hit rate: hit tokens sum / this)",
                                     registry=r)
        self.downtime = Histogram("kvferry_scheduler_migration_downtime_seconds", "Downtime of committed "
                                  "migrations as the source measured it (all workers)", buckets=DOWNTIME_BUCKETS,
                                  registry=r)
        # The series of the known label values exist from the start, at 0, so that rate() and
        # increase() see each one's first event (a series first scraped at 1 shows no increase).
        # Abort reasons are open-ended (at most MAX_REASONS): their series start with their first.
        for outcome in DISPATCH_OUTCOMES:
            self.dispatches.labels(outcome=outcome)
        for trigger in MIGRATION_TRIGGERS:
            self.migrations.labels(outcome="committed", reason="none", trigger=trigger)
        self._reasons: set[str] = {"none"}

    # ---- events --------------------------------------------------------------------------------

    def wrap(self, handler: Handler, trigger_of: Callable[[str], str | None] = lambda _: None,
             hit_of: Callable[[str], int | None] = lambda _: None) -> Handler:
        """`handler` (SchedulerCore.handle) counting what passes through it. `trigger_of(migration_id)`
        gives the reason a migration was started (read before the handler forgets it), `hit_of(request_id)`
        the prefix hit (tokens) a dispatch chose (None: it sent no block hashes)."""
        async def handle(rec: Received) -> Message | None:
            msg = rec.msg
            if isinstance(msg, DispatchRequest):
                t0 = time.perf_counter()
                reply = await handler(rec)
                self.decision.observe(time.perf_counter() - t0)
                if isinstance(reply, DispatchReply):
                    outcome = "dispatched"
                    hit = hit_of(msg.request_id) if msg.block_hashes else None
                    if hit is not None:
                        self.hit_tokens.observe(hit)
                        self.prompt_tokens.inc(msg.num_prompt_tokens)
                elif isinstance(reply, ErrorReply) and reply.code in (ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED):
                    outcome = reply.code  # unavailable: no live instance; overloaded: every one is full
                else:
                    outcome = "error"
                self.dispatches.labels(outcome=outcome).inc()
                return reply
            if isinstance(msg, MigrationResult):
                self.on_migration_result(msg, trigger_of(msg.migration_id))
                return await handler(rec)
            reply = await handler(rec)
            if isinstance(msg, RegisterWorker) and isinstance(reply, RegisterReply):
                self.registrations.inc()
            elif isinstance(msg, Deregister):
                self.deregistrations.inc()
            return reply

        return handle

    def on_migration_result(self, m: MigrationResult, trigger: str | None) -> None:
        reason = "none" if m.outcome == "committed" else (m.reason.split(":")[0].strip()[:32] or "unknown")
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                reason = "other"
            else:
                self._reasons.add(reason)
        self.migrations.labels(outcome=m.outcome, reason=reason, trigger=trigger or "unknown").inc()
        if m.outcome == "committed":
            self.downtime.observe(m.downtime_ms / 1000.0)

    def on_dead(self, n: int) -> None:
        if n:
            self.deaths.inc(n)

    # ---- state ---------------------------------------------------------------------------------

    def attach(self, core: Any, loop: asyncio.AbstractEventLoop) -> "StateCollector":
        """Serve `core`'s (a SchedulerCore's) state from this registry."""
        collector = StateCollector(core, loop)
        self.registry.register(collector)
        return collector


class StateCollector(Collector):
    """The STATE_METRICS families, read on the event loop at scrape time."""

    def __init__(self, core: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.loop = loop

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected at scrape time only

    def _read(self) -> dict[str, Any]:
        core = self.core
        status = core.status("metrics", include_requests=False)
        tracker = core.migrator.tracker
        return {"status": status, "in_flight": len(tracker), "expired": tracker.expired,
                "ups": core.scaler.scale_ups, "downs": core.scaler.scale_downs,
                "kv": (core.kv.applied, core.kv.dropped, core.kv.resyncs)}

    def collect(self) -> Iterator[Metric]:
        try:
            s = call_on_loop(self.loop, self._read, SCRAPE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a stuck or stopped loop: no state series
            log.debug("metrics.state_unreadable", error=f"{type(exc).__name__}: {exc}")
            return
        h = STATE_METRICS
        per_instance = {name: GaugeMetricFamily(name, h[name], labels=["instance_id"]) for name in (
            "kvferry_instance_capacity_blocks", "kvferry_instance_free_blocks", "kvferry_instance_used_blocks",
            "kvferry_instance_running_requests", "kvferry_instance_waiting_requests", "kvferry_instance_freeness",
            "kvferry_instance_up", "kvferry_instance_draining", "kvferry_instance_cached_blocks",
            "kvferry_instance_prefix_index_blocks")}
        alive = 0
        for i in s["status"].instances:
            alive += i.alive
            for name, value in (("kvferry_instance_capacity_blocks", i.total_blocks),
                                ("kvferry_instance_free_blocks", i.free_blocks),
                                ("kvferry_instance_used_blocks", i.total_blocks - i.free_blocks),
                                ("kvferry_instance_running_requests", i.num_running),
                                ("kvferry_instance_waiting_requests", i.num_waiting),
                                ("kvferry_instance_freeness", _finite(i.freeness)),
                                ("kvferry_instance_up", i.alive), ("kvferry_instance_draining", i.draining),
                                ("kvferry_instance_cached_blocks", i.cached_blocks),
                                ("kvferry_instance_prefix_index_blocks", i.indexed_blocks)):
                per_instance[name].add_metric([i.worker_id], float(value))
        yield from per_instance.values()
        instances = GaugeMetricFamily("kvferry_scheduler_instances", h["kvferry_scheduler_instances"],
                                      labels=["state"])
        instances.add_metric(["alive"], float(alive))
        instances.add_metric(["dead"], float(len(s["status"].instances) - alive))
        yield instances
        yield GaugeMetricFamily("kvferry_scheduler_migrations_in_flight",
                                h["kvferry_scheduler_migrations_in_flight"], value=float(s["in_flight"]))
        # Counter families are named without `_total`; prometheus_client adds it to the sample.
        yield CounterMetricFamily("kvferry_scheduler_migrations_expired",
                                  h["kvferry_scheduler_migrations_expired_total"], value=float(s["expired"]))
        yield CounterMetricFamily("kvferry_scheduler_instance_seconds",
                                  h["kvferry_scheduler_instance_seconds_total"],
                                  value=float(s["status"].instance_seconds))
        scale = CounterMetricFamily("kvferry_scheduler_scale_actions", h["kvferry_scheduler_scale_actions_total"],
                                    labels=["direction"])
        scale.add_metric(["up"], float(s["ups"]))
        scale.add_metric(["down"], float(s["downs"]))
        yield scale
        applied, dropped, resyncs = s["kv"]
        events = CounterMetricFamily("kvferry_scheduler_kv_events", h["kvferry_scheduler_kv_events_total"],
                                     labels=["outcome"])
        events.add_metric(["applied"], float(applied))
        events.add_metric(["dropped"], float(dropped))
        yield events
        yield CounterMetricFamily("kvferry_scheduler_kv_resyncs", h["kvferry_scheduler_kv_resyncs_total"],
                                  value=float(resyncs))


def _finite(x: float) -> float:
    """Freeness is +inf for an idle instance and -inf for a draining or dead one: capped at ±1e9
    (Prometheus takes infinities, but dashboards and averages do not)."""
    return x if x == x and abs(x) < 1e9 else (1e9 if x > 0 else -1e9)


def scheduler_health(core: Any, loop: asyncio.AbstractEventLoop) -> tuple[bool, dict[str, object]]:
    """/health of the scheduler: ok while its event loop answers (workers are reported, not required:
    they register after the scheduler starts)."""
    def state() -> tuple[bool, dict[str, object]]:
        return True, {"scheduler_id": core.scheduler_id, "workers": len(core.registry),
                      "alive": core.registry.num_alive}

    return call_on_loop(loop, state, SCRAPE_TIMEOUT_S)
