"""The scheduler's book of migrations: those in flight, and a bounded history of how recent ones ended.

Pure bookkeeping (no sockets; callers pass `now`, monotonic seconds). Soft state like the rest of
the scheduler: after a restart, migrations still running on workers end with a MigrationResult
for an id no longer known, which is only logged.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass

from protocol import MigrationResult

MAX_REASON_KEYS = 64  # distinct (outcome, reason) counters kept; reasons are the workers' free text


@dataclass
class InFlight:
    """A migration the scheduler asked for and has not seen end."""

    migration_id: str
    src: str
    dst: str
    request_id: str | None  # None until the source says which request it moves
    reason: str  # drain, ctl, ...
    started: float  # monotonic seconds, when the command was issued
    deadline: float  # monotonic seconds: forgotten then if no MigrationResult came
    accepted: bool = False  # the source acknowledged the command


class MigrationTracker:
    """Migrations in flight by id, recent results (`history`), and counts by (outcome, reason)."""

    def __init__(self, history: int = 256, recent_s: float = 1.0) -> None:
        self.in_flight: dict[str, InFlight] = {}
        self.history: deque[MigrationResult] = deque(maxlen=history)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.expired = 0  # accepted migrations whose result never came
        self.recent_s = recent_s
        self._moved: dict[str, float] = {}  # request id → until when it is not planned again
        self._boot = os.urandom(2).hex()  # ids stay distinct across scheduler restarts
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self.in_flight)

    def __iter__(self) -> Iterator[InFlight]:
        return iter(list(self.in_flight.values()))

    def start(self, src: str, dst: str, request_id: str | None, reason: str, now: float,
              timeout_s: float) -> InFlight:
        """Record a new migration (before its command is sent, so a concurrent round counts it)."""
        mid = f"mig-{self._boot}-{next(self._seq)}"
        entry = InFlight(mid, src, dst, request_id, reason, started=now, deadline=now + timeout_s)
        self.in_flight[mid] = entry
        return entry

    def accepted(self, migration_id: str, request_id: str | None) -> InFlight | None:
        """The source started it (moving `request_id`). None if it already ended."""
        entry = self.in_flight.get(migration_id)
        if entry is not None:
            entry.accepted = True
            entry.request_id = request_id or entry.request_id
        return entry

    def drop(self, migration_id: str) -> InFlight | None:
        """Forget a migration that never started (refused, no answer)."""
        return self.in_flight.pop(migration_id, None)

    def finish(self, result: MigrationResult, now: float) -> InFlight | None:
        """Record how a migration ended; returns its entry (None: not ours or already forgotten)."""
        self.history.append(result)
        key = (result.outcome, result.reason[:64])
        if key not in self.counts and len(self.counts) >= MAX_REASON_KEYS:
            key = (result.outcome, "other")
        self.counts[key] += 1
        if result.outcome == "committed":
            # The source's next report may still list the request: do not plan it again meanwhile.
            self._moved[result.request_id] = now + self.recent_s
        return self.in_flight.pop(result.migration_id, None)

    def expire(self, now: float) -> list[InFlight]:
        """Remove and return migrations past their deadline (their source died or lost the result)."""
        gone = [e for e in self.in_flight.values() if e.deadline <= now]
        for e in gone:
            del self.in_flight[e.migration_id]
        self.expired += len(gone)
        for rid in [r for r, until in self._moved.items() if until <= now]:
            del self._moved[rid]
        return gone

    def pairs(self) -> list[tuple[str, str]]:
        """(src, dst) of every migration in flight (repeats count)."""
        return [(e.src, e.dst) for e in self.in_flight.values()]

    def busy_requests(self) -> set[str]:
        """Request ids the planner must leave alone: migrating now, or just moved."""
        return {e.request_id for e in self.in_flight.values() if e.request_id is not None} | set(self._moved)

    def find_request(self, request_id: str) -> InFlight | None:
        return next((e for e in self.in_flight.values() if e.request_id == request_id), None)
