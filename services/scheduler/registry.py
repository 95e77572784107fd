"""The scheduler's soft state: registered workers by id, their latest load report and liveness.

Pure bookkeeping (no sockets, no clocks of its own: callers pass `now`, monotonic seconds), so
it is tested without processes. Everything here is rebuilt from the workers' next messages after
a scheduler restart.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from protocol import LoadReport, RegisterWorker

from policy import InstanceLoad
from services.scheduler.load import instance_load


class ReportOutcome(Enum):
    """What `Registry.apply_report` did with a LoadReport."""

    APPLIED = "applied"
    STALE = "stale"  # seq not above the latest one: ignored
    UNKNOWN = "unknown"  # not registered, or declared dead: it must register again


@dataclass
class WorkerRecord:
    """One registered worker as the scheduler knows it."""

    info: RegisterWorker  # its registration (endpoints, engine, blocks, ...)
    peer: bytes | None  # the ROUTER routing id of its DEALER to the scheduler
    registered_ms: int  # wall clock, epoch ms
    last_heard: float  # monotonic seconds: registration, report or heartbeat
    alive: bool = True
    draining: bool = False  # set by the scheduler (ctl drain); the worker may also report draining
    report: LoadReport | None = None
    last_seq: int = -1
    last_report_ms: int = 0  # wall clock when the latest report was applied
    last_pong_ms: int = 0  # wall clock of the latest Pong to the scheduler's Ping
    # Which requests the dispatch snapshot lists (by priority): the high-priority ones when the
    # policy has priority headroom, else none.
    keep_priority: Callable[[int], bool] | None = None
    role: str = ""  # its role as the scheduler sees it ("": the registered one; ctl role / adaptive change it)
    snapshot: InstanceLoad = field(init=False)

    def __post_init__(self) -> None:
        self.role = self.role or self.info.role
        self.refresh()

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def refresh(self) -> None:
        """Recompute the dispatch snapshot after any change."""
        self.snapshot = instance_load(self.info, self.report, alive=self.alive, draining=self.draining,
                                      keep_priority=self.keep_priority, role=self.role)

    def load(self, include_requests: bool = False) -> InstanceLoad:
        """The InstanceLoad, optionally with every per-request entry (for status and migration)."""
        if not include_requests:
            return self.snapshot
        return instance_load(self.info, self.report, alive=self.alive, draining=self.draining,
                             include_requests=True, role=self.role)


class Registry:
    """Workers by id. Keeps the dispatch snapshots in id order and rebuilds that list only after a
    change, so a dispatch costs O(n) with no sorting (the policy's sort of a sorted list is linear).

    Also accounts instance-seconds: for every worker, the seconds from its registration until it
    deregisters or is declared dead (again from a later registration), summed over workers.
    `keep_priority`: which requests dispatch snapshots list (see WorkerRecord.keep_priority).
    """

    def __init__(self, timeout_s: float, max_workers: int = 4096,
                 keep_priority: Callable[[int], bool] | None = None) -> None:
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.keep_priority = keep_priority
        self._workers: dict[str, WorkerRecord] = {}
        self._ids: list[str] = []  # sorted
        self._snapshots: list[InstanceLoad] | None = None
        self._block_size: int = 16
        self._up_since: dict[str, float] = {}  # live workers: when they (last) registered
        self._closed_s = 0.0  # instance-seconds of the periods already ended

    # ---- membership ----------------------------------------------------------------------------

    def register(self, info: RegisterWorker, peer: bytes | None, now: float, now_ms: int) -> tuple[WorkerRecord, bool]:
        """Add or refresh a worker (idempotent). Returns (record, was_known_and_alive).

        A re-registration starts a new report sequence (the worker may have restarted) and revives
        a dead worker; the scheduler's own draining flag is kept.
        """
        old = self._workers.get(info.worker_id)
        if old is None and len(self._workers) >= self.max_workers:
            raise OverflowError(f"{self.max_workers} workers already registered")
        rec = WorkerRecord(info=info, peer=peer, registered_ms=now_ms, last_heard=now,
                           draining=old.draining if old is not None else False, keep_priority=self.keep_priority)
        self._workers[info.worker_id] = rec
        self._up_since.setdefault(info.worker_id, now)  # a live worker registering again keeps its start
        if old is None:
            bisect.insort(self._ids, info.worker_id)
        self._membership_changed()
        return rec, old is not None and old.alive

    def remove(self, worker_id: str, now: float | None = None) -> WorkerRecord | None:
        """Forget a worker (it deregistered, or was dead long enough); its up time ends at `now`
        (default: when it was last heard from)."""
        rec = self._workers.pop(worker_id, None)
        if rec is not None:
            self._close(worker_id, rec.last_heard if now is None else now)
            self._ids.remove(worker_id)
            self._membership_changed()
        return rec

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[WorkerRecord]:
        """Records in id order."""
        return (self._workers[i] for i in self._ids)

    @property
    def num_alive(self) -> int:
        return sum(1 for r in self._workers.values() if r.alive)

    # ---- messages from workers -----------------------------------------------------------------

    def live(self, worker_id: str) -> WorkerRecord | None:
        """The record if the worker is registered and alive (the only ones whose messages count)."""
        rec = self._workers.get(worker_id)
        return rec if rec is not None and rec.alive else None

    def apply_report(self, report: LoadReport, now: float, now_ms: int) -> ReportOutcome:
        """Keep `report` if its seq is the highest so far. Any report (even stale) counts as heard."""
        rec = self.live(report.worker_id)
        if rec is None:
            return ReportOutcome.UNKNOWN
        rec.last_heard = now
        if report.seq <= rec.last_seq:
            return ReportOutcome.STALE
        rec.last_seq = report.seq
        rec.report = report
        rec.last_report_ms = now_ms
        rec.refresh()
        self._changed()
        return ReportOutcome.APPLIED

    def heard(self, worker_id: str, now: float) -> bool:
        """A heartbeat: False when the worker is unknown or dead (it must register again)."""
        rec = self.live(worker_id)
        if rec is None:
            return False
        rec.last_heard = now
        return True

    # ---- scheduler decisions -------------------------------------------------------------------

    def set_role(self, worker_id: str, role: str) -> WorkerRecord | None:
        rec = self._workers.get(worker_id)
        if rec is not None and rec.role != role:
            rec.role = role
            rec.refresh()
            self._changed()
        return rec

    def set_draining(self, worker_id: str, draining: bool) -> WorkerRecord | None:
        rec = self._workers.get(worker_id)
        if rec is not None and rec.draining != draining:
            rec.draining = draining
            rec.refresh()
            self._changed()
        return rec

    def excuse_silence(self, seconds: float) -> None:
        """Move every alive worker's last-heard time `seconds` later: the scheduler itself was not
        running, so their heartbeats were waiting unread."""
        for rec in self._workers.values():
            if rec.alive:
                rec.last_heard += seconds

    def sweep(self, now: float) -> list[WorkerRecord]:
        """Mark dead every alive worker silent for longer than `timeout_s`; returns them."""
        dead = []
        limit = now - self.timeout_s
        for rec in self._workers.values():
            if rec.alive and rec.last_heard < limit:
                rec.alive = False
                rec.refresh()
                self._close(rec.worker_id, now)
                dead.append(rec)
        if dead:
            self._changed()
        return dead

    def forget_dead(self, now: float, after_s: float) -> list[str]:
        """Drop workers dead for longer than `after_s` (so the table does not grow forever)."""
        gone = [r.worker_id for r in self._workers.values() if not r.alive and r.last_heard < now - after_s]
        for wid in gone:
            self.remove(wid)
        return gone

    # ---- instance-seconds ----------------------------------------------------------------------

    def _close(self, worker_id: str, now: float) -> None:
        start = self._up_since.pop(worker_id, None)
        if start is not None:
            self._closed_s += max(0.0, now - start)

    def instance_seconds(self, now: float) -> float:
        """Seconds workers were registered and alive, summed over workers, up to `now`."""
        return self._closed_s + sum(max(0.0, now - t) for t in self._up_since.values())

    # ---- views ---------------------------------------------------------------------------------

    def snapshots(self) -> list[InstanceLoad]:
        """Every worker's dispatch snapshot, in id order (cached until the next change)."""
        if self._snapshots is None:
            self._snapshots = [self._workers[i].snapshot for i in self._ids]
        return self._snapshots

    @property
    def block_size(self) -> int:
        """The smallest registered block size (demand in blocks is counted conservatively)."""
        return self._block_size

    def _changed(self) -> None:
        self._snapshots = None

    def _membership_changed(self) -> None:
        self._snapshots = None
        if self._workers:
            self._block_size = min(r.info.block_size for r in self._workers.values())
