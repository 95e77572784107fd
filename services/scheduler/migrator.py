"""Live migration, the scheduler's side (design §5): `ctl migrate`, the periodic migration round
(drains always; load balancing with the migrating policies kvferry and kvferry-nopri), results.

The scheduler never moves KV itself: it sends `MigrateCommand` to the source worker's control
endpoint and the workers do the rest. The source answers `Ack(ok=True, detail=<request id>)` once
the migration has started, or `ErrorReply` (refused / not_found / overloaded) or `Ack(ok=False)`
when it cannot start; it sends `MigrationResult` to the scheduler when the migration ends.

Nothing here blocks the serve loop: each command waits for its answer in a background task (every
wait bounded), and `ctl migrate` is answered from that task through `send(peer, reply)`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

from protocol import (
    Ack,
    CancelMigration,
    ErrorCode,
    ErrorReply,
    MigrateCommand,
    MigrateRequestTo,
    MigrationResult,
    RegisterWorker,
    now_ms,
)
from protocol.base import Message
from protocol.errors import ProtocolError, RequestTimeout
from protocol.fields import MAX_TEXT_LEN

from policy import PlannedMigration, PolicyConfig, plan_migrations
from policy.migration import migration_sources
from services.config import SchedulerConfig
from services.log import get_logger
from services.scheduler.commands import CommandChannels
from services.scheduler.migrations import InFlight, MigrationTracker
from services.scheduler.registry import Registry, WorkerRecord

log = get_logger("kvferry.scheduler.migration")

Sender = Callable[[bytes | None, Message], Awaitable[None]]
"""Sends a reply to a peer of the scheduler's ROUTER socket (set by services.scheduler.main)."""

TIMEOUT_CODE = RequestTimeout.code  # "timeout": the source did not answer in time
CANCEL_TIMEOUT_S = 1.0
DEADLINE_MARGIN_S = 0.05  # answer the ctl a little before it gives up


def layout_key(info: RegisterWorker) -> Hashable:
    """Workers exchange KV blocks only when these are equal (model too: KV of another model is garbage)."""
    return (info.engine, info.model, info.block_size, info.kv_bytes_per_block)


class Migrator:
    """Starts migrations (for ctl, for draining instances and, with a migrating policy, for load
    balancing) and tracks them until they end."""

    def __init__(self, cfg: SchedulerConfig, registry: Registry, commands: CommandChannels | None,
                 clock: Callable[[], float], policy: PolicyConfig | None = None,
                 prefix_lookup: Callable[[], Callable[[str, str], int]] | None = None) -> None:
        self.cfg = cfg
        # A fresh (request id, instance id) → leading prompt blocks cached there, per round.
        self.prefix_lookup = prefix_lookup
        self.policy = policy if policy is not None else cfg.policy_config()
        self.registry = registry
        self.commands = commands
        self.clock = clock
        # Reports come every report_interval_ms: a moved request leaves the source's list by then.
        self.tracker = MigrationTracker(recent_s=max(1.0, 4 * cfg.report_interval_ms / 1000.0))
        self.send: Sender | None = None
        self.ack_timeout_s = cfg.migration_ack_timeout_ms / 1000.0
        self.timeout_s = cfg.migration_timeout_ms / 1000.0

    # ---- ctl migrate ---------------------------------------------------------------------------

    def on_ctl(self, msg: MigrateRequestTo, peer: bytes | None) -> ErrorReply | None:
        """Check and start a ctl migration. An ErrorReply now, or None: the reply follows from the
        background task (Ack(detail="<migration_id>: <request> <src> -> <dst>") or ErrorReply)."""
        def error(code: str, message: str) -> ErrorReply:
            log.info("migration.rejected", request_id=msg.request_id, dst_worker_id=msg.dst_worker_id,
                     code=code, message=message)
            return ErrorReply(reply_to=msg.msg_id, code=code, message=message)

        src = self.holder(msg.request_id)
        if src is None:
            return error(ErrorCode.NOT_FOUND, f"request {msg.request_id} is on no live instance "
                                              "(as of their latest load reports)")
        busy = self.tracker.find_request(msg.request_id)
        if busy is not None:
            return error(ErrorCode.REFUSED, f"request {msg.request_id} is already migrating "
                                            f"({busy.migration_id}: {busy.src} -> {busy.dst})")
        problem = self.check_pair(src, msg.dst_worker_id)
        if problem is not None:
            return error(*problem)
        if self.commands is None or src.worker_id not in self.commands or self.send is None:
            return error(ErrorCode.UNAVAILABLE, f"no command channel to {src.worker_id}")
        # The ctl gives up at its deadline: ask the source for less, so the ctl hears the outcome.
        left_s = (msg.deadline_ms - now_ms()) / 1000.0 - DEADLINE_MARGIN_S
        timeout_s = min(self.ack_timeout_s, max(0.01, left_s))
        entry = self.tracker.start(src.worker_id, msg.dst_worker_id, msg.request_id, "ctl", self.clock(),
                                   self.timeout_s)
        self._issue(entry, timeout_s, reply=(peer, msg.msg_id))
        return None

    def holder(self, request_id: str) -> WorkerRecord | None:
        """The live worker whose latest report lists `request_id`."""
        for rec in self.registry:
            if rec.alive and rec.report is not None and any(e.request_id == request_id for e in rec.report.requests):
                return rec
        return None

    def check_pair(self, src: WorkerRecord, dst_id: str) -> tuple[str, str] | None:
        """(error code, message) when `dst_id` cannot take a migration from `src`; None when it can."""
        dst = self.registry.get(dst_id)
        if dst is None:
            return ErrorCode.NOT_FOUND, f"unknown instance {dst_id}"
        if dst.worker_id == src.worker_id:
            return ErrorCode.REFUSED, f"the request is already on {dst_id}"
        if not dst.alive:
            return ErrorCode.UNAVAILABLE, f"instance {dst_id} is not alive"
        if dst.snapshot.draining:
            return ErrorCode.REFUSED, f"instance {dst_id} is draining"
        if layout_key(src.info) != layout_key(dst.info):
            return ErrorCode.REFUSED, (f"{src.worker_id} and {dst_id} have different KV layouts "
                                       f"(engine, model, block_size, kv_bytes_per_block): "
                                       f"{layout_key(src.info)} vs {layout_key(dst.info)}")
        return None

    # ---- the periodic round --------------------------------------------------------------------

    def round(self) -> list[InFlight]:
        """Forget migrations that can no longer end, then start what the policy plans. Returns the
        migrations started."""
        now = self.clock()
        for e in self.tracker.expire(now):
            log.warning("migration.expired", migration_id=e.migration_id, request_id=e.request_id, src=e.src,
                        dst=e.dst, reason=e.reason, age_s=round(now - e.started, 3), accepted=e.accepted)
        for e in self.tracker:
            if self.registry.live(e.src) is None:  # its result will never come
                self.tracker.drop(e.migration_id)
                log.warning("migration.lost", migration_id=e.migration_id, request_id=e.request_id, src=e.src,
                            dst=e.dst, reason="source is dead or gone")
        if self.commands is None:
            return []
        plans = self.plan()
        started = []
        for p in plans:
            if p.src not in self.commands:
                continue
            entry = self.tracker.start(p.src, p.dst, p.request_id, p.reason, now, self.timeout_s)
            self._issue(entry, self.ack_timeout_s, reply=None)
            started.append(entry)
        return started

    def plan(self) -> list[PlannedMigration]:
        """What policy.plan_migrations plans now: drains always; load balancing (reason "load")
        only with a migrating policy (kvferry, kvferry-nopri), not with rr and load."""
        records = list(self.registry)
        if not self.policy.migrate and not any(r.alive and r.snapshot.draining for r in records):
            return []
        # Find the sources on the small dispatch snapshots first, then list every request only
        # for them (where the planner looks for victims: a report can list thousands).
        sources = {i.instance_id for i in migration_sources([r.snapshot for r in records], self.policy)}
        if not sources:
            return []
        loads = [r.load(include_requests=r.worker_id in sources) for r in records]
        return plan_migrations(loads, self.tracker.pairs(), max_per_instance=self.policy.max_migrations_per_instance,
                               layouts={r.worker_id: layout_key(r.info) for r in records},
                               busy_requests=self.tracker.busy_requests(), cfg=self.policy,
                               prefix_blocks=self.prefix_lookup() if self.prefix_lookup is not None else None)

    def involved(self, worker_id: str) -> bool:
        """Whether a migration in flight goes out of, or into, `worker_id`."""
        return any(worker_id in pair for pair in self.tracker.pairs())

    # ---- results -------------------------------------------------------------------------------

    def on_result(self, m: MigrationResult) -> InFlight | None:
        entry = self.tracker.finish(m, self.clock())
        log.info("migration.result", migration_id=m.migration_id, request_id=m.request_id,
                 src_worker_id=m.src_worker_id, dst_worker_id=m.dst_worker_id, outcome=m.outcome,
                 reason=m.reason, stages=m.stages, blocks=m.blocks, blocks_skipped=m.blocks_skipped,
                 bytes_moved=m.bytes_moved, downtime_ms=m.downtime_ms, known=entry is not None,
                 took_s=round(self.clock() - entry.started, 3) if entry is not None else None,
                 in_flight=len(self.tracker), totals=self.totals())
        return entry

    def totals(self) -> dict[str, int]:
        """Counts of finished migrations by outcome, plus those expired without a result."""
        out: dict[str, int] = {}
        for (outcome, _), n in self.tracker.counts.items():
            out[outcome] = out.get(outcome, 0) + n
        out["expired"] = self.tracker.expired
        return out

    # ---- the command -----------------------------------------------------------------------------

    def _issue(self, entry: InFlight, timeout_s: float, reply: tuple[bytes | None, str] | None) -> None:
        assert self.commands is not None
        self.commands.spawn(self._command(entry, timeout_s, reply), name=f"migrate-{entry.migration_id}")

    async def _command(self, e: InFlight, timeout_s: float, reply: tuple[bytes | None, str] | None) -> None:
        assert self.commands is not None
        dst = self.registry.get(e.dst)
        if dst is None:  # gone since planning
            self.tracker.drop(e.migration_id)
            await self._answer(reply, ErrorCode.NOT_FOUND, f"unknown instance {e.dst}")
            return
        cmd = MigrateCommand(migration_id=e.migration_id, request_id=e.request_id, dst_worker_id=e.dst,
                             dst_endpoint=dst.info.endpoints.migration, reason=e.reason)
        try:
            answer: Message | None = await self.commands.ask(e.src, cmd, timeout_s)
        except (ProtocolError, KeyError):  # no answer in time, or the channel closed meanwhile
            answer = None
        fields = dict(migration_id=e.migration_id, request_id=e.request_id, src=e.src, dst=e.dst, reason=e.reason)
        if isinstance(answer, Ack) and answer.ok:
            # The result may have come first (a quick abort): then the entry is gone already.
            self.tracker.accepted(e.migration_id, answer.detail or None)
            rid = answer.detail or e.request_id or "?"
            log.info("migration.started", **{**fields, "request_id": rid})
            await self._answer(reply, None, f"{e.migration_id}: {rid} {e.src} -> {e.dst}")
            return
        self.tracker.drop(e.migration_id)
        if isinstance(answer, ErrorReply) or isinstance(answer, Ack):
            code = answer.code if isinstance(answer, ErrorReply) else ErrorCode.REFUSED
            text = answer.message if isinstance(answer, ErrorReply) else answer.detail
            # A busy source is simply asked again next round: keep that quiet.
            (log.info if reply is not None else log.debug)("migration.refused", **fields, code=code, message=text)
            await self._answer(reply, code, f"{e.src} did not start {e.migration_id}: {code}: {text}")
            return
        log.warning("migration.no_answer", **fields, timeout_s=round(timeout_s, 3))
        await self._answer(reply, TIMEOUT_CODE, f"{e.src} did not answer MigrateCommand {e.migration_id} "
                                                f"within {timeout_s:.2f} s (cancelled)")
        # It may have started after all (a lost or late Ack): cancel it, best effort.
        try:
            await self.commands.ask(e.src, CancelMigration(migration_id=e.migration_id), CANCEL_TIMEOUT_S)
        except (ProtocolError, KeyError):
            pass

    async def _answer(self, reply: tuple[bytes | None, str] | None, code: str | None, text: str) -> None:
        """Answer the ctl (no-op for the round's own migrations): Ack when `code` is None."""
        if reply is None or self.send is None:
            return
        peer, msg_id = reply
        text = text[:MAX_TEXT_LEN]
        msg: Message = (Ack(reply_to=msg_id, detail=text) if code is None
                        else ErrorReply(reply_to=msg_id, code=code, message=text))
        try:
            await self.send(peer, msg)
        except ProtocolError as exc:
            log.warning("migration.reply_not_sent", reply_to=msg_id, error=str(exc))
