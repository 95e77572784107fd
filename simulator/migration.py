"""Live migration in virtual time, with the engine's real migration API (design §5).

Stage 0 reserves blocks for the request's KV on the destination and copies its complete blocks
while the request keeps decoding on the source; each later stage copies the blocks completed
meanwhile. Once at most `migration_final_blocks` are left (or after `migration_max_stages`), the
source detaches the request at its next step boundary, the rest is copied (the downtime), the
destination commits it into its batch and the source releases its blocks. A stage takes the
transfer model's time for its blocks. Aborts (the request finished or was preempted on the source,
no room on the destination) leave the request where it is and free the reservation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.block_manager import blocks_for
from engine.errors import OutOfBlocksError
from engine.request import RequestStatus
from policy import PlannedMigration, migration_victim
from simulator.config import SimConfig
from simulator.instance import SimInstance


class Host(Protocol):
    """What the migrator needs from the cluster."""

    def schedule(self, t: float, fn: Callable[[Any, float], None], arg: Any) -> None: ...
    def kick(self, inst: SimInstance, now: float) -> None: ...
    def moved(self, request_id: str, src: SimInstance, dst: SimInstance, now: float) -> None: ...
    def settled(self, inst: SimInstance, now: float) -> None: ...


@dataclass(slots=True)
class Migration:
    request_id: str
    src: SimInstance
    dst: SimInstance
    key: str  # the reservation on the destination
    reason: str
    started_s: float
    preemptions: int = 0  # the request's count at the start: a change means it was preempted
    reserved: int = 0
    copied: int = 0
    skipped: int = 0  # leading blocks the destination's prefix cache held: linked, not sent
    stage: int = 0
    detached_s: float | None = None
    state: dict | None = None


@dataclass
class MigrationStats:
    started: int = 0
    committed: int = 0
    aborted: Counter = field(default_factory=Counter)
    downtime_s: list[float] = field(default_factory=list)
    blocks_moved: int = 0
    blocks_skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = sorted(self.downtime_s)
        return {"started": self.started, "committed": self.committed, "aborted": dict(self.aborted),
                "blocks_moved": self.blocks_moved, "blocks_skipped": self.blocks_skipped,
                "downtime_ms_mean": 1000 * sum(d) / len(d) if d else None,
                "downtime_ms_max": 1000 * d[-1] if d else None}


class Migrator:
    """The migrations in flight and their stages."""

    def __init__(self, host: Host, cfg: SimConfig) -> None:
        self.host = host
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.bytes_per_block = cfg.bytes_per_block
        self.in_flight: dict[str, Migration] = {}  # by request id
        self.stats = MigrationStats()
        self._n = 0

    def pairs(self) -> list[tuple[str, str]]:
        return [(m.src.id, m.dst.id) for m in self.in_flight.values()]

    def _xfer(self, blocks: int) -> float:
        return self.cfg.transfer.seconds(blocks * self.bytes_per_block)

    def start(self, plan: PlannedMigration, src: SimInstance, dst: SimInstance, now: float) -> bool:
        """Begin stage 0 of a planned migration; False if it cannot start (nothing to move, no room)."""
        rid = plan.request_id
        if rid is None:  # the planner left the choice to the source
            victim = migration_victim(src.snapshot(full=True).requests, self.in_flight)
            rid = victim.request_id if victim else None
        view = src.engine.migration_view(rid) if rid is not None else None
        parked = rid in src.engine.parked  # a prefilled request awaiting its hand-off: stop-and-copy
        if view is None or (view.status != RequestStatus.RUNNING.value and not parked) or rid in self.in_flight \
                or view.num_computed_tokens == 0:
            return False
        self._n += 1
        m = Migration(rid, src, dst, f"mig-{self._n}", plan.reason, now, view.num_preemptions)
        complete = view.num_computed_tokens // self.block_size
        need = blocks_for(view.num_computed_tokens, self.block_size)
        self.stats.started += 1
        # As the live workers do: the destination links the leading blocks its cache holds.
        offer = src.engine.shareable_prefix(rid)
        linked = dst.engine.share_cached(m.key, offer[0], offer[1], complete) if offer else []
        try:
            dst.engine.reserve(m.key, need - len(linked))
        except OutOfBlocksError:
            dst.engine.release(m.key)
            self.stats.aborted["no_room"] += 1
            return False
        m.reserved, m.copied, m.skipped = need, complete, len(linked)
        self.in_flight[rid] = m
        src.migrations += 1
        dst.migrations += 1
        if parked:  # out of the batch already: copy everything, then commit
            m.copied, m.state, m.detached_s = 0, src.engine.detach_request(rid), now
            self.host.schedule(now + self._xfer(need - m.skipped) + self.cfg.transfer.overhead_s, self._commit, m)
            return True
        self.host.schedule(now + self._xfer(complete - m.skipped), self._stage_done, m)
        return True

    def _alive(self, m: Migration, now: float) -> bool:
        """The request still runs on the source as when the migration started; else abort."""
        view = m.src.engine.migration_view(m.request_id)
        if view is None:
            self._abort(m, "finished", now)
            return False
        if view.status != RequestStatus.RUNNING.value or view.num_preemptions != m.preemptions:
            self._abort(m, "preempted", now)
            return False
        return True

    def _stage_done(self, m: Migration, now: float) -> None:
        if not self._alive(m, now):
            return
        view = m.src.engine.migration_view(m.request_id)
        complete = view.num_computed_tokens // self.block_size  # type: ignore[union-attr]
        fresh = complete - m.copied
        m.stage += 1
        if fresh <= self.cfg.migration_final_blocks or m.stage >= self.cfg.migration_max_stages:
            if m.src.busy:
                m.src.detach_queue.append(m)  # taken out of the batch between two steps
            else:
                self.final_stage(m, now)
            return
        m.copied = complete
        self.host.schedule(now + self._xfer(fresh), self._stage_done, m)

    def final_stage(self, m: Migration, now: float) -> None:
        """At a step boundary of the source: detach, copy the rest, then commit."""
        if not self._alive(m, now):
            return
        src, dst = m.src, m.dst
        state = src.engine.detach_request(m.request_id)
        need = blocks_for(state.num_computed_tokens, self.block_size)
        if need > m.reserved:
            try:
                dst.engine.reserve(m.key, need - m.reserved)
            except OutOfBlocksError:
                src.engine.reattach_request(m.request_id)
                self._abort(m, "no_room", now)
                return
            m.reserved = need
        m.state = state
        m.detached_s = now
        # The rest: blocks completed since the last stage plus the partial last block, then the commit.
        self.host.schedule(now + self._xfer(need - m.copied) + self.cfg.transfer.overhead_s, self._commit, m)

    def _commit(self, m: Migration, now: float) -> None:
        src, dst = m.src, m.dst
        dst.engine.commit_request(m.state, m.key)  # type: ignore[arg-type]
        src.engine.release(m.request_id)
        del self.in_flight[m.request_id]
        src.migrations -= 1
        dst.migrations -= 1
        self.stats.committed += 1
        self.stats.blocks_moved += m.reserved - m.skipped
        self.stats.blocks_skipped += m.skipped
        self.stats.downtime_s.append(now - m.detached_s)  # type: ignore[operator]
        self.host.moved(m.request_id, src, dst, now)
        self.host.kick(dst, now)
        self.host.kick(src, now)
        self.host.settled(src, now)

    def _abort(self, m: Migration, reason: str, now: float) -> None:
        m.dst.engine.release(m.key)
        del self.in_flight[m.request_id]
        m.src.migrations -= 1
        m.dst.migrations -= 1
        self.stats.aborted[reason] += 1
        self.host.kick(m.dst, now)
        self.host.kick(m.src, now)
        self.host.settled(m.src, now)
        self.host.settled(m.dst, now)
