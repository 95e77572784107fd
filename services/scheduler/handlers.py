"""The scheduler's message handlers: one method per SchedulerInbound type.

`SchedulerCore.handle(received)` returns the reply (or None for one-way messages that need
none, or whose reply a background task sends later); protocol.sockets.serve sends it back to the
sender. Handlers never block: forwarding a command to a worker runs as a background task
(services.scheduler.commands).

Conventions other services follow:
- A LoadReport or Heartbeat from a worker the scheduler does not know (never registered, or
  declared dead after `heartbeat_timeout_ms` of silence) is answered with
  `ErrorReply(code="not_found", reply_to=None, message="unknown worker <id>: register again")`;
  the worker then sends RegisterWorker again (registering is idempotent).
- Dispatch answers `ErrorReply(code="overloaded")` when every live, non-draining worker is full
  (its running + waiting requests at its max_running: the frontend says 429), and
  `ErrorReply(code="unavailable")` when there is no live, non-draining worker (503).
- MigrateRequestTo is answered later, from a background task, once the source worker has accepted
  (Ack) or refused (ErrorReply) the MigrateCommand; invalid requests at once (services.scheduler.migrator).
- ScaleQuery (from a pool manager) is answered by ScaleAdvice (services.scheduler.scaler).
- KvEvents feed the prefix index (services.scheduler.kv_index); one that cannot be applied (a gap
  in its worker's sequence, a reset still owed) is answered by ResyncKvEvents, and so is a
  malformed one (`on_invalid`, from the serve loop). Dispatch matches a request's block hashes
  against the index and lets the policy weigh each instance's cached prefix (policy.dispatch);
  DispatchReply tells the frontend the cluster's hashing parameters.

The policy (`SchedulerConfig.policy`, one of policy.POLICY_NAMES, with the config's thresholds)
drives dispatch (with the request's priority), the migration round and the scaling decisions.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from engine.block_manager import blocks_for
from policy import DispatchState, dispatch, freeness, hit_tokens
from policy.request_prefixes import RequestPrefixes
from protocol import (
    Ack,
    Deregister,
    DispatchReply,
    DispatchRequest,
    DrainInstance,
    SetInstanceRole,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    InstanceStatus,
    KvEvents,
    LoadReport,
    MigrateRequestTo,
    MigrationResult,
    Ping,
    Pong,
    RegisterReply,
    RegisterWorker,
    RequestLocation,
    ResyncKvEvents,
    ScaleQuery,
    StatusReply,
    StatusRequest,
    UndrainInstance,
    now_ms,
)
from protocol.base import Message
from protocol.errors import ProtocolError
from protocol.sockets import Received
from services.config import SchedulerConfig
from services.log import get_logger
from services.scheduler.commands import CommandChannels
from services.scheduler.kv_index import KvIndex
from services.scheduler.migrator import Migrator
from services.scheduler.roles import Roles
from services.scheduler.registry import Registry, ReportOutcome, WorkerRecord
from services.scheduler.scaler import Scaler

log = get_logger("kvferry.scheduler")

UNKNOWN_WORKER_LOG_EVERY_S = 5.0  # an unknown worker reports every few ms: log it now and then
MAX_REMEMBERED_HITS = 1 << 16  # dispatched requests whose chosen prefix hit is remembered (the latest)


class SchedulerCore:
    """Registry + dispatch state + migrator + scaler + handlers. `commands` may be None (no
    forwarding, e.g. in tests)."""

    def __init__(self, cfg: SchedulerConfig, commands: CommandChannels | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy_cfg = cfg.policy_config()  # ValueError: unknown policy, inconsistent thresholds
        if min(cfg.heartbeat_interval_ms, cfg.heartbeat_timeout_ms, cfg.report_interval_ms, cfg.migration_interval_ms,
               cfg.migration_ack_timeout_ms, cfg.migration_timeout_ms) <= 0:
            raise ValueError("scheduler intervals and timeouts must be positive")
        if cfg.max_migrations_per_instance < 0:
            raise ValueError("max_migrations_per_instance must be 0 (no drain migrations) or more")
        if cfg.prefix_index_max_entries < 1:
            raise ValueError("prefix_index_max_entries must be at least 1")
        self.cfg = cfg
        self.scheduler_id = cfg.scheduler_id
        self.policy = cfg.policy
        pc = self.policy_cfg
        # Dispatch snapshots list the high-priority requests only: all the headroom needs.
        self.registry = Registry(timeout_s=cfg.heartbeat_timeout_ms / 1000.0,
                                 keep_priority=pc.is_high if pc.priority_headroom else None)
        self.state = DispatchState()
        self.kv = KvIndex(cfg.prefix_index_max_entries)
        # request id → prompt tokens the chosen instance holds cached (dispatches that sent block
        # hashes; the latest MAX_REMEMBERED_HITS), for metrics and logs.
        self.dispatch_hits: OrderedDict[str, int] = OrderedDict()
        # request id → its prompt's block hashes (bounded), for the migration round's cache affinity.
        self.prefixes = RequestPrefixes()
        self.commands = commands
        self.clock = clock
        self.migrator = Migrator(cfg, self.registry, commands, clock, policy=pc,
                                 prefix_lookup=lambda: self.prefixes.prefix_blocks(self.kv.match))
        self.scaler = Scaler(cfg, pc, self.registry, self.migrator, commands, clock)
        self.roles = Roles(pc, self.registry, commands, clock)
        self._unknown_logged: dict[str, float] = {}
        self._handlers: dict[type, Callable[[Received], Any]] = {
            RegisterWorker: self.on_register,
            LoadReport: self.on_load_report,
            KvEvents: self.on_kv_events,
            Heartbeat: self.on_heartbeat,
            Deregister: self.on_deregister,
            MigrationResult: self.on_migration_result,
            DispatchRequest: self.on_dispatch,
            StatusRequest: self.on_status,
            MigrateRequestTo: self.on_migrate_request,
            DrainInstance: self.on_drain,
            UndrainInstance: self.on_undrain,
            ScaleQuery: self.on_scale_query,
            SetInstanceRole: self.on_set_role,
            Ping: self.on_ping,
        }

    async def handle(self, rec: Received) -> Message | None:
        """The reply to `rec.msg` (None: no reply)."""
        handler = self._handlers.get(type(rec.msg))
        if handler is None:  # cannot happen with SchedulerInbound as the socket's allowed types
            return ErrorReply(reply_to=getattr(rec.msg, "msg_id", None), code=ErrorCode.UNKNOWN_TYPE,
                              message=f"the scheduler does not handle {type(rec.msg).__name__}")
        return handler(rec)

    # ---- workers -------------------------------------------------------------------------------

    def on_register(self, rec: Received) -> Message:
        msg: RegisterWorker = rec.msg
        if self.registry.get(msg.worker_id) is None and len(self.registry) >= self.registry.max_workers:
            return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.OVERLOADED,
                              message=f"{self.registry.max_workers} workers already registered")
        if self.commands is not None:
            try:
                self.commands.open(msg.worker_id, msg.endpoints.control)
            except zmq.ZMQError as exc:
                log.warning("worker.rejected", worker_id=msg.worker_id, control=msg.endpoints.control, error=str(exc))
                return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.INVALID,
                                  message=f"cannot connect to control endpoint {msg.endpoints.control!r}: {exc}")
        record, known = self.registry.register(msg, rec.peer, self.clock(), now_ms())
        self.state.on_report(msg.worker_id)
        self.kv.register(msg.worker_id, msg.kv_namespace, msg.block_size, self.clock())
        self._unknown_logged.pop(msg.worker_id, None)
        if self.commands is not None:
            if record.draining:  # a drain the operator asked for survives the worker's restart
                self.commands.send_drain(msg.worker_id, True)
        (log.debug if known else log.info)(
            "worker.registered", worker_id=msg.worker_id, control=msg.endpoints.control,
            migration=msg.endpoints.migration, host=msg.host, engine=msg.engine, model=msg.model,
            total_blocks=msg.total_blocks, block_size=msg.block_size, again=known)
        return RegisterReply(reply_to=msg.msg_id, scheduler_id=self.scheduler_id,
                             heartbeat_interval_ms=self.cfg.heartbeat_interval_ms,
                             report_interval_ms=self.cfg.report_interval_ms)

    def on_load_report(self, rec: Received) -> Message | None:
        msg: LoadReport = rec.msg
        outcome = self.registry.apply_report(msg, self.clock(), now_ms())
        if outcome is ReportOutcome.APPLIED:
            self.state.on_report(msg.worker_id)
            return None
        if outcome is ReportOutcome.STALE:
            return None
        return self._unknown_worker(msg.worker_id, "LoadReport")

    def on_kv_events(self, rec: Received) -> Message | None:
        msg: KvEvents = rec.msg
        if self.registry.live(msg.worker_id) is None:
            self.kv.dropped += 1
            return self._unknown_worker(msg.worker_id, "KvEvents")
        reason = self.kv.apply(msg, self.clock())
        return None if reason is None else self._resync(msg.worker_id, reason)

    def on_invalid(self, exc: ProtocolError) -> Message | None:
        """A message the serve loop could not decode (it logged it and sent an ErrorReply): a
        worker's malformed KvEvents, or one whose type could not even be read (it may have been
        one), leaves its part of the index unknown, so resync it."""
        if exc.msg_type not in (None, KvEvents.tag()) or exc.peer is None:
            return None
        record = self.registry.get(exc.peer.decode("utf-8", "replace"))  # a worker's DEALER id: its worker id
        if record is None or record.peer != exc.peer or not record.alive:
            self.kv.dropped += 1
            return None
        reason = self.kv.invalid(record.worker_id, self.clock())
        return None if reason is None else self._resync(record.worker_id, reason)

    def _resync(self, worker_id: str, reason: str) -> ResyncKvEvents:
        log.info("kv.resync_asked", worker_id=worker_id, reason=reason)
        return ResyncKvEvents(scheduler_id=self.scheduler_id, reason=reason[:256])

    def on_heartbeat(self, rec: Received) -> Message | None:
        msg: Heartbeat = rec.msg
        if msg.role != "worker":
            return None  # only workers' heartbeats matter to the scheduler
        if self.registry.heard(msg.sender_id, self.clock()):
            return None
        return self._unknown_worker(msg.sender_id, "Heartbeat")

    def _unknown_worker(self, worker_id: str, what: str) -> ErrorReply:
        now = self.clock()
        if now - self._unknown_logged.get(worker_id, -math.inf) >= UNKNOWN_WORKER_LOG_EVERY_S:
            self._unknown_logged[worker_id] = now
            if len(self._unknown_logged) > 10_000:
                self._unknown_logged.clear()
            known = self.registry.get(worker_id) is not None
            log.warning("worker.unknown", worker_id=worker_id, message=what,
                        reason="declared dead" if known else "not registered")
        return ErrorReply(code=ErrorCode.NOT_FOUND, message=f"unknown worker {worker_id}: register again")

    def on_deregister(self, rec: Received) -> None:
        msg: Deregister = rec.msg
        record = self.registry.remove(msg.worker_id, now=self.clock())
        self.state.on_report(msg.worker_id)
        self.kv.forget(msg.worker_id)
        if self.commands is not None:
            self.commands.close(msg.worker_id)
        log.info("worker.deregistered", worker_id=msg.worker_id, reason=msg.reason, known=record is not None)
        return None

    def on_migration_result(self, rec: Received) -> None:
        m: MigrationResult = rec.msg
        self.migrator.on_result(m)
        return None

    def on_pong(self, worker_id: str) -> None:
        record = self.registry.get(worker_id)
        if record is not None:
            record.last_pong_ms = now_ms()

    def excuse_silence(self, seconds: float) -> None:
        """This scheduler did not run for `seconds` (services.stall): not the workers' silence."""
        self.registry.excuse_silence(seconds)

    def sweep(self) -> list[WorkerRecord]:
        """Declare silent workers dead (called on a timer); forget long-dead ones."""
        now = self.clock()
        dead = self.registry.sweep(now)
        for record in dead:
            self.state.on_report(record.worker_id)
            self.kv.forget(record.worker_id)
            log.warning("worker.dead", worker_id=record.worker_id,
                        silent_s=round(now - record.last_heard, 3), alive_workers=self.registry.num_alive)
        for wid in self.registry.forget_dead(now, after_s=max(60.0, 10 * self.registry.timeout_s)):
            self.kv.forget(wid)
            if self.commands is not None:
                self.commands.close(wid)
            log.info("worker.forgotten", worker_id=wid)
        return dead

    # ---- frontends -----------------------------------------------------------------------------

    def choose(self, msg: DispatchRequest) -> WorkerRecord | None:
        """Run the dispatch policy for `msg` (with its priority); None when no instance can take it."""
        snapshots = self.registry.snapshots()
        if msg.exclude_workers:
            excluded = set(msg.exclude_workers)
            snapshots = [s for s in snapshots if s.instance_id not in excluded]
        bs = self.registry.block_size
        demand = blocks_for(msg.num_prompt_tokens, bs)
        # The prefix each instance holds (only those hashing as the frontend did), for the policy.
        hash_bs = msg.kv_block_size or bs
        cached = self.kv.match(msg.block_hashes, msg.kv_namespace, hash_bs) if msg.block_hashes else {}
        wid = dispatch(self.policy_cfg, snapshots, self.state, demand, msg.priority,
                       prompt_tokens=msg.num_prompt_tokens, cached_blocks=cached, block_size=hash_bs)
        if wid is not None and msg.block_hashes:
            self.prefixes.remember(msg.request_id, msg.kv_namespace, hash_bs, msg.block_hashes)
            self.dispatch_hits[msg.request_id] = hit_tokens(cached.get(wid, 0), msg.num_prompt_tokens, hash_bs)
            self.dispatch_hits.move_to_end(msg.request_id)
            if len(self.dispatch_hits) > MAX_REMEMBERED_HITS:
                self.dispatch_hits.popitem(last=False)
        return None if wid is None else self.registry.get(wid)

    def on_dispatch(self, rec: Received) -> Message:
        msg: DispatchRequest = rec.msg
        record = self.choose(msg)
        if record is None:
            excluded = set(msg.exclude_workers)
            serving = [s for s in self.registry.snapshots()
                       if s.alive and not s.draining and s.instance_id not in excluded]
            full = bool(serving) and all(s.full for s in serving)
            log.info("request.overloaded" if full else "request.unavailable", request_id=msg.request_id,
                     frontend_id=msg.frontend_id, workers=len(self.registry), alive=self.registry.num_alive)
            if full:
                return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.OVERLOADED,
                                  message=f"every instance is full ({len(serving)} serving; their waiting queues "
                                          "are at max_waiting); retry later")
            return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.UNAVAILABLE,
                              message=f"no worker can take the request ({len(self.registry)} registered, "
                                      f"{self.registry.num_alive} alive; draining or full ones excluded)")
        log.info("request.dispatched", request_id=msg.request_id, worker_id=record.worker_id,
                 frontend_id=msg.frontend_id, priority=msg.priority, prompt_tokens=msg.num_prompt_tokens,
                 hit_tokens=self.dispatch_hits.get(msg.request_id) if msg.block_hashes else None)
        namespace, block_size = self.kv.hashing()
        return DispatchReply(reply_to=msg.msg_id, request_id=msg.request_id, worker_id=record.worker_id,
                             worker_address=record.info.endpoints.control, kv_namespace=namespace,
                             kv_block_size=block_size)

    def on_status(self, rec: Received) -> Message:
        msg: StatusRequest = rec.msg
        return self.status(msg.msg_id, include_requests=msg.include_requests)

    def status(self, reply_to: str, include_requests: bool = True) -> StatusReply:
        """Every instance and (with `include_requests`) every request on a live instance."""
        instances: list[InstanceStatus] = []
        requests: list[RequestLocation] = []
        for r in self.registry:
            snap = r.snapshot
            info = r.info
            instances.append(InstanceStatus(
                worker_id=info.worker_id, endpoints=info.endpoints, host=info.host, engine=info.engine,
                model=info.model, total_blocks=snap.total_blocks, free_blocks=snap.free_blocks,
                block_size=info.block_size, num_running=snap.num_running, num_waiting=snap.num_waiting,
                freeness=freeness(snap, cfg=self.policy_cfg), alive=r.alive, draining=snap.draining,
                last_report_ms=r.last_report_ms, registered_ms=r.registered_ms, pid=info.pid,
                cached_blocks=r.report.num_cached_blocks if r.report is not None else 0,
                indexed_blocks=self.kv.entries(info.worker_id), role=r.role))  # type: ignore[arg-type]
            if include_requests and r.alive and r.report is not None:
                requests.extend(RequestLocation(request_id=e.request_id, worker_id=info.worker_id,
                                                priority=e.priority, num_tokens=e.num_tokens, running=e.running)
                                for e in r.report.requests)
        return StatusReply(reply_to=reply_to, scheduler_id=self.scheduler_id, instances=instances,
                           requests=requests, policy=self.policy,
                           instance_seconds=self.registry.instance_seconds(self.clock()),
                           scaling=self.scaler.status())

    # ---- operator commands ---------------------------------------------------------------------

    def _set_draining(self, msg_id: str, worker_id: str, draining: bool) -> Message:
        record = self.registry.set_draining(worker_id, draining)
        if record is None:
            return ErrorReply(reply_to=msg_id, code=ErrorCode.NOT_FOUND, message=f"unknown worker {worker_id}")
        if self.commands is not None:
            self.commands.send_drain(worker_id, draining)
        if not draining:
            self.scaler.cancel(worker_id)
        log.info("worker.draining" if draining else "worker.undrained", worker_id=worker_id)
        return Ack(reply_to=msg_id, detail=f"{worker_id}: {'draining' if draining else 'dispatch resumed'}")

    def on_drain(self, rec: Received) -> Message:
        return self._set_draining(rec.msg.msg_id, rec.msg.worker_id, True)

    def on_undrain(self, rec: Received) -> Message:
        return self._set_draining(rec.msg.msg_id, rec.msg.worker_id, False)

    def on_migrate_request(self, rec: Received) -> Message | None:
        """An ErrorReply at once, or None: the Ack (or the source's refusal) is sent later, when the
        source worker has answered (services.scheduler.migrator)."""
        return self.migrator.on_ctl(rec.msg, rec.peer)

    def on_set_role(self, rec: Received) -> Message:
        return self.roles.on_ctl(rec.msg)

    def migration_round(self) -> None:
        """Called on a timer (`migration_interval_ms`): move requests off draining instances and,
        with a migrating policy, from overloaded instances to free ones; keep the prefill workers'
        decode targets fresh (and, adaptive, the roles)."""
        self.roles.round()
        self.migrator.round()

    def scale_round(self) -> None:
        """Called on a timer (`scaler.tick_s`) when scaling is on: decide, drain, advise."""
        self.scaler.tick()

    def on_scale_query(self, rec: Received) -> Message:
        return self.scaler.on_query(rec.msg, self.scheduler_id)

    def on_ping(self, rec: Received) -> Message:
        """Pong to anyone (ctl, frontends, workers); a live worker's Ping also counts as heard from it."""
        self.registry.heard(rec.msg.sender_id, self.clock())
        return Pong.to(rec.msg, sender_id=self.scheduler_id)
