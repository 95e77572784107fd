"""The worker's control socket: requests from frontends and commands from the scheduler.

A ROUTER bound at the worker's control endpoint serving WorkerControlInbound:

- AddRequest → Ack, or ErrorReply: INVALID (the engine's reason), OVERLOADED (waiting queue at
  `max_waiting`), REFUSED (draining or stopping, duplicate request id).
- AbortRequest → Ack(ok=True) after the request is stopped (its stream ends with finish_reason
  "abort"), or Ack(ok=False) when this worker does not hold it (unknown or already finished).
- Ping → Pong; Heartbeat (frontends) → no reply; Drain → Ack; Shutdown → Ack, then the worker stops.
- SetRole → Ack (prefill/decode disaggregation); DecodeTarget → Ack (a prefill worker's hand-off
  target: services/worker/handoff.py).
- MigrateCommand → Ack(ok=True, detail=<the request id being moved>) once the migration started,
  or ErrorReply (refused / not_found / overloaded: too many migrations / invalid).
- CancelMigration → Ack(ok=True) when the migration was stopped before its commit (the request
  stays here), Ack(ok=False, detail) when unknown or already committing.
- An AbortRequest for a request that is migrating out first cancels the migration; if the
  commit already went through, the answer is Ack(ok=False, "moved to <worker>") and the
  frontend re-sends the abort to the new owner (it learns of it by RequestMoved).

Add and abort run as tasks (they wait for the engine thread's next step boundary), so one slow
engine step does not serialise the control socket: every add that arrives during a step is
applied at the same boundary. Invalid frames are answered by protocol.sockets.serve.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine.errors import InvalidRequestError
from engine.request import SamplingParams as EngineSamplingParams
from protocol.common import Ack, ErrorCode, ErrorReply, Heartbeat, Ping, Pong
from protocol.sockets import MessageSocket, Received
from protocol.to_worker import (AbortRequest, AddRequest, CancelMigration, DecodeTarget, Drain, MigrateCommand, SetRole,
                                Shutdown)
from services.log import get_logger
from services.worker.handoff import set_parking
from services.worker.streams import Route

if TYPE_CHECKING:
    from services.worker.context import WorkerContext
    from services.worker.migration.source import MigrationSource

log = get_logger(__name__)

CANCEL_WAIT_S = 30.0  # an abort waits this long at most for a migration of its request to settle


class Overloaded(Exception):
    """The engine's waiting queue is full."""


class ControlHandler:
    """Handles one control message at a time (the `serve` handler); add/abort reply from tasks.

    Collaborators: the worker's context, the control socket (replies from tasks), the migration
    source (MigrateCommand, CancelMigration, aborts of a request being moved), and the two
    lifecycle calls the Worker owns: `set_draining(bool)` and `request_stop(drain_first, reason)`.
    """

    def __init__(self, ctx: "WorkerContext", sock: MessageSocket, source: "MigrationSource",
                 set_draining: Callable[[bool], None], request_stop: Callable[..., None]) -> None:
        self.w = ctx
        self.sock = sock
        self.source = source
        self._set_draining = set_draining
        self._request_stop = request_stop
        self._tasks: set[asyncio.Task[None]] = set()
        self.frontend_seen: dict[str, float] = {}  # frontend id → monotonic time of its last heartbeat
        self.frontend_start: dict[str, str] = {}  # frontend id → its latest incarnation heard of

    async def __call__(self, rec: Received) -> object | None:
        msg = rec.msg
        w = self.w
        if isinstance(msg, AddRequest):
            refusal = self._check_add(msg)
            if refusal is not None:
                return refusal
            # A frontend that sends its incarnation heartbeats too (kvferry's does): watch it from
            # its first request, so one that dies before its first heartbeat still loses them.
            if msg.frontend_id in self.frontend_seen or msg.frontend_incarnation:
                self.frontend_seen[msg.frontend_id] = time.monotonic()
            self._heard_start(msg.frontend_id, msg.frontend_incarnation)
            # Routed at once (not in the task), so a second AddRequest with this id is refused.
            w.routes.add(Route(msg.request_id, msg.frontend_id, msg.reply_address, index_offset=msg.first_index,
                               frontend_incarnation=msg.frontend_incarnation))
            self._spawn(self._add(rec, msg))
            return None
        if isinstance(msg, AbortRequest):
            self._spawn(self._abort(rec, msg))
            return None
        if isinstance(msg, Ping):
            w.link.heard_from(msg.sender_id)
            return Pong.to(msg, sender_id=w.worker_id)
        if isinstance(msg, Heartbeat):
            self.frontend_seen[msg.sender_id] = time.monotonic()
            self._heard_start(msg.sender_id, msg.incarnation)
            return None
        if isinstance(msg, Drain):
            self._set_draining(msg.draining)
            return Ack(reply_to=msg.msg_id, detail="draining" if msg.draining else "not draining")
        if isinstance(msg, Shutdown):
            log.info("worker.shutdown_requested", worker_id=w.worker_id, drain_first=msg.drain_first,
                     reason=msg.reason)
            await self.sock.send(Ack(reply_to=msg.msg_id, detail="shutting down"), peer=rec.peer, timeout_s=1.0)
            self._request_stop(drain_first=msg.drain_first, reason=msg.reason or "shutdown command")
            return None
        if isinstance(msg, SetRole):
            old, w.state.role = w.state.role, msg.role
            if msg.role != "prefill":
                w.state.decode_target = None
            # A prefill worker parks its prefilled requests for their hand-off; others decode them.
            await w.driver.call(lambda e: set_parking(e, msg.role == "prefill"))
            w.link.mark_dirty()
            log.info("worker.role_set", worker_id=w.worker_id, role=msg.role, was=old)
            return Ack(reply_to=msg.msg_id, detail=f"{old} -> {msg.role}")
        if isinstance(msg, DecodeTarget):
            w.state.decode_target = ((msg.worker_id, msg.migration_endpoint)
                                     if msg.worker_id is not None and msg.migration_endpoint is not None else None)
            return Ack(reply_to=msg.msg_id, detail=f"decode target {msg.worker_id}")
        if isinstance(msg, MigrateCommand):
            return await self._migrate(msg)
        if isinstance(msg, CancelMigration):
            return self._cancel_migration(msg)
        log.warning("worker.unhandled_message", type=type(msg).__name__)
        mid = getattr(msg, "msg_id", None)
        return ErrorReply(reply_to=mid, code=ErrorCode.UNKNOWN_TYPE, message=f"{type(msg).__name__} is not handled")

    # ---- add / abort -----------------------------------------------------------------------------

    def _check_add(self, msg: AddRequest) -> ErrorReply | None:
        w = self.w
        why = None
        if w.stopping:
            why = "the worker is stopping"
        elif w.draining:
            why = "the worker is draining"
        elif msg.request_id in w.routes:
            why = f"request id {msg.request_id!r} is already running on this worker"
        if why is None:
            return None
        log.info("request.refused", request_id=msg.request_id, reason=why)
        return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.REFUSED, message=why)

    async def _add(self, rec: Received, msg: AddRequest) -> None:
        w = self.w
        rid = msg.request_id
        sampling = EngineSamplingParams.from_dict(msg.sampling.to_dict())
        prompt = list(msg.prompt_token_ids)
        max_waiting = w.cfg.max_waiting

        def add(engine) -> None:  # noqa: ANN001 - runs on the engine thread
            if (waiting := engine.num_waiting()) >= max_waiting:
                raise Overloaded(f"{waiting} requests are waiting (limit {max_waiting})")
            engine.add_request(rid, prompt, sampling, msg.priority, cache_salt=msg.cache_salt)

        reply: object
        try:
            await w.driver.call(add)
        except Overloaded as exc:
            w.routes.pop(rid)
            log.info("request.refused", request_id=rid, reason="overloaded")
            reply = ErrorReply(reply_to=msg.msg_id, code=ErrorCode.OVERLOADED, message=str(exc))
        except InvalidRequestError as exc:
            w.routes.pop(rid)
            log.info("request.invalid", request_id=rid, error=str(exc))
            reply = ErrorReply(reply_to=msg.msg_id, code=ErrorCode.INVALID, message=str(exc)[:4096])
        except Exception as exc:  # noqa: BLE001 - e.g. the engine thread did not answer in time
            log.exception("request.add_failed", request_id=rid)
            await self._forget(rid)
            reply = ErrorReply(reply_to=msg.msg_id, code=ErrorCode.INTERNAL,
                               message=f"{type(exc).__name__}: {exc}"[:4096])
        else:
            log.info("request.added", request_id=rid, worker_id=w.worker_id, frontend_id=msg.frontend_id,
                     prompt_tokens=len(prompt), max_tokens=sampling.max_tokens, priority=msg.priority,
                     first_index=msg.first_index)
            w.link.mark_dirty()
            reply = Ack(reply_to=msg.msg_id, detail="added")
        await self._reply(rec, reply)

    async def _migrate(self, msg: MigrateCommand) -> object:
        from services.worker.migration.source import Refused

        try:
            m = await self.source.start(msg)
        except Refused as exc:
            log.info("migration.refused", migration_id=msg.migration_id, request_id=msg.request_id, reason=str(exc))
            return ErrorReply(reply_to=msg.msg_id, code=exc.code, message=str(exc))
        return Ack(reply_to=msg.msg_id, detail=m.request_id)

    def _cancel_migration(self, msg: CancelMigration) -> object:
        m = self.source.cancel(msg.migration_id, "cancelled by the scheduler")
        if m is None:
            return Ack(reply_to=msg.msg_id, ok=False, detail=f"no migration {msg.migration_id} here")
        if m.cancel_reason is None:
            return Ack(reply_to=msg.msg_id, ok=False, detail=f"migration {msg.migration_id} is committing")
        return Ack(reply_to=msg.msg_id, ok=True, detail="cancelling")

    async def _abort(self, rec: Received, msg: AbortRequest) -> None:
        w = self.w
        rid = msg.request_id
        m = self.source.cancel(rid, "aborted by the frontend")
        if m is not None:
            try:
                await asyncio.wait_for(m.done.wait(), CANCEL_WAIT_S)
            except asyncio.TimeoutError:
                log.warning("request.abort_waiting_migration", request_id=rid, migration_id=m.migration_id)
            if m.outcome == "committed":
                await self._reply(rec, Ack(reply_to=msg.msg_id, ok=False, detail=f"moved to {m.dst_worker_id}"))
                return
        if rid not in w.routes:
            await self._reply(rec, Ack(reply_to=msg.msg_id, ok=False, detail=f"request {rid!r} is not on this worker"))
            return
        try:
            out = await w.driver.call(lambda e: e.abort_request(rid))
        except Exception as exc:  # noqa: BLE001
            log.exception("request.abort_failed", request_id=rid)
            await self._reply(rec, ErrorReply(reply_to=msg.msg_id, code=ErrorCode.INTERNAL,
                                              message=f"{type(exc).__name__}: {exc}"[:4096]))
            return
        if out is None:  # it finished at the same step boundary; its last batch is already sent
            await self._reply(rec, Ack(reply_to=msg.msg_id, ok=False, detail=f"request {rid!r} already finished"))
            return
        log.info("request.aborted", request_id=rid, reason=msg.reason, tokens=out.first_index)
        w.streamer.publish([out])  # the final batch: finish_reason "abort"
        w.link.mark_dirty()
        await self._reply(rec, Ack(reply_to=msg.msg_id, ok=True, detail="aborted"))

    async def abort_lost_frontends(self, timeout_s: float) -> None:
        """Abort the requests of frontends that heartbeated before and fell silent for `timeout_s`
        (design §6: a frontend that disappears gets its requests aborted, freeing their blocks)."""
        now = time.monotonic()
        for fid, seen in list(self.frontend_seen.items()):
            if now - seen <= timeout_s:
                continue
            del self.frontend_seen[fid]
            rids = self.w.routes.by_frontend(fid)
            log.warning("worker.frontend_lost", frontend_id=fid, silent_s=round(now - seen, 1), requests=len(rids))
            await self._abort_all(rids, "frontend lost")

    def _heard_start(self, frontend_id: str, incarnation: str) -> None:
        """A frontend restarted under its id (a newer incarnation than the last one heard of): the
        requests its earlier start added have no reader any more. Abort them now; the silence rule
        above would miss a restart quicker than its timeout. Incarnations sort by start time."""
        if not incarnation or incarnation <= self.frontend_start.get(frontend_id, ""):
            return
        self.frontend_start[frontend_id] = incarnation
        rids = self.w.routes.of_earlier_frontend(frontend_id, incarnation)
        if rids:
            log.warning("worker.frontend_restarted", frontend_id=frontend_id, requests=len(rids))
            self._spawn(self._abort_all(rids, "frontend restarted"))

    async def _abort_all(self, rids: list[str], reason: str) -> None:
        """Abort `rids` (their final batch goes out with finish_reason "abort"); a failure is logged."""
        for rid in rids:
            try:
                out = await self.w.driver.call(lambda e, rid=rid: e.abort_request(rid))
            except Exception:  # noqa: BLE001
                log.exception("request.abort_failed", request_id=rid)
                continue
            if out is not None:
                log.info("request.aborted", request_id=rid, reason=reason, tokens=out.first_index)
                self.w.streamer.publish([out])
        if rids:
            self.w.link.mark_dirty()

    async def _forget(self, rid: str) -> None:
        """Make sure a request whose add failed half-way is neither in the engine nor routed."""
        try:
            await self.w.driver.call(lambda e: e.abort_request(rid), timeout_s=30.0)
        except Exception:  # noqa: BLE001
            log.exception("request.forget_failed", request_id=rid)
        self.w.routes.pop(rid)

    # ---- helpers ---------------------------------------------------------------------------------

    async def _reply(self, rec: Received, msg: object) -> None:
        try:
            await self.sock.send(msg, peer=rec.peer, timeout_s=1.0)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the socket may be closing
            log.warning("worker.reply_failed", type=type(msg).__name__, error=str(exc))

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
