"""One simulated instance: a sim-engine LLMEngine in virtual time plus what the cluster tracks
about it (its step in progress, its last load report, its lifetime)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.block_manager import KvEventBatch, blocks_for
from engine.engine import LLMEngine
from engine.request import RequestOutput, RequestStatus
from policy import InstanceLoad, RequestLoad

if TYPE_CHECKING:
    from simulator.migration import Migration


class SimInstance:
    """An engine whose steps take the latency model's time: `step` runs the engine at once (the
    engine's scheduler decides the batch when the step starts) and the cluster delivers the
    step's tokens when it ends, `last_step_seconds` later."""

    __slots__ = ("id", "engine", "started_s", "ready_s", "stopped_s", "busy", "outputs", "draining",
                 "high", "detach_queue", "migrations", "report", "last_report_s", "preemptions_seen", "steps",
                 "kv_sink", "role")

    def __init__(self, instance_id: str, engine: LLMEngine, started_s: float, ready_s: float) -> None:
        self.id = instance_id
        self.engine = engine
        self.started_s = started_s
        self.ready_s = ready_s
        self.stopped_s: float | None = None
        self.busy = False  # a step is in progress
        self.outputs: list[RequestOutput] = []  # the tokens of the step in progress
        self.draining = False
        self.high: dict[str, None] = {}  # high-priority requests here (ordered, for determinism)
        self.detach_queue: list[Migration] = []  # final migration stages waiting for the step boundary
        self.migrations = 0  # in flight out of or into this instance
        self.last_report_s = -math.inf
        self.preemptions_seen = 0
        self.steps = 0
        # Traces with reuse: the cluster's prefix index, fed the engine's KV events with each report
        # (as a live worker publishes them with its load reports).
        self.kv_sink: Callable[[str, KvEventBatch], None] | None = None
        self.role = "mixed"  # policy.pd
        self.report = self.snapshot()

    def step(self) -> float:
        """Run one engine step now; returns its duration (0: nothing could run)."""
        ex = self.engine.executor
        ex.last_step_seconds = 0.0  # a step that schedules nothing does not call the executor
        self.outputs = self.engine.step()
        self.steps += 1
        return ex.last_step_seconds  # type: ignore[no-any-return]

    @property
    def empty(self) -> bool:
        """No request, reservation or migration left: a draining instance can stop."""
        e = self.engine
        return not e.requests and not e.reservations and not self.migrations and not self.busy

    def blocked(self) -> bool:
        """The queue's head does not fit the free blocks (waiting work next to unusable memory)."""
        s = self.engine.scheduler
        if not s.waiting:
            return False
        b = self.engine.blocks
        return blocks_for(s.waiting[0].num_tokens, b.block_size) > b.num_free - b.watermark_blocks

    def snapshot(self, full: bool = False) -> InstanceLoad:
        """The policy's view of the instance now. Requests are listed only with `full`; otherwise
        only the high-priority ones (what freeness needs for the priority headroom)."""
        e = self.engine
        s = e.scheduler
        b = e.blocks
        head = s.waiting[0] if s.waiting else None
        if full:
            reqs = self.request_loads()
        elif self.high:
            reqs = tuple(RequestLoad(rid, r.priority, b.num_owned(rid), r.num_tokens,
                                     r.status is RequestStatus.RUNNING and rid not in e.detached)
                         for rid in self.high if (r := e.requests.get(rid)) is not None)
        else:
            reqs = ()
        queued = s.queued_prefill_tokens()
        return InstanceLoad(self.id, b.num_blocks, b.num_free, len(s.running), len(s.waiting),
                            blocks_for(head.num_tokens, b.block_size) if head else 0, reqs, draining=self.draining,
                            queued_prefill_tokens=queued, block_size=b.block_size, role=self.role)

    def request_loads(self) -> tuple[RequestLoad, ...]:
        """Every request here as the policy sees it (detached ones count as not running)."""
        e = self.engine
        b = e.blocks
        return tuple(RequestLoad(r.request_id, r.priority, b.num_owned(r.request_id), r.num_tokens,
                                 r.status is RequestStatus.RUNNING and r.request_id not in e.detached)
                     for r in e.requests.values())

    def take_report(self, now: float) -> InstanceLoad:
        self.report = self.snapshot()
        self.last_report_s = now
        if self.kv_sink is not None:
            self.kv_sink(self.id, self.engine.take_kv_events())
        return self.report
