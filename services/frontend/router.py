"""Request routing, shared by the HTTP API and the SDK endpoint.

For a new request: DispatchRequest to the scheduler (deadline `dispatch_timeout_s`) → the worker;
when the scheduler does not answer, the last known instance with the fewest of this frontend's
requests. Then AddRequest to that worker (one DEALER per worker) with `reply_address` = this
frontend's token endpoint; the worker answers Ack (or ErrorReply: invalid → 400, overloaded → 429,
unavailable → 503) and PUSHes TokenBatch/TokenBatches to the token socket (a PULL), which this
module routes by request id to each request's `RequestStream`. RequestMoved (a migration
committed) changes the request's owner, so aborts always go to the current owner. Aborted
requests are remembered for a while: a RequestMoved or tokens arriving for one re-send the abort
to whoever now has it. The frontend heartbeats every known worker so that workers can abort the
requests of a frontend that died.

Failures (design §6):
- A worker that refuses an AddRequest (draining, stopping, full, internal error) or does not
  answer it in time is excluded and the request dispatched again (at most [frontend] max_add_attempts tries).
- A worker is lost when the scheduler's status says it is not alive, or when it answers no Ping
  for `worker_timeout_s` (so this works while the scheduler is away too). Each of its requests
  is resumed on another worker by recompute: prompt + the tokens this frontend already delivered
  as the new prompt, `first_index` = how many, the lost worker excluded; the client's stream goes
  on without a seam. A final "error"/"abort" batch from a request's owner (worker stopping, step
  failure, a frontend wrongly declared lost) resumes it the same way, and so do a gap in a stream
  that stays open for [frontend] gap_timeout_s (a dropped batch) and a silent request that no live worker
  lists in the scheduler's view. At most `max_resumes` resumptions per request; when no worker
  can take it, the stream ends with an error — never a hang. Greedy output is identical to an
  undisturbed run; seeded sampling goes on from the seed again (the per-request generator state
  died with the worker), so its continuation differs.
- While the scheduler does not answer, requests go to the last known worker with the fewest of
  this frontend's requests at once (no per-request wait for the scheduler); the status loop
  notices its return.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from protocol.base import deadline_in
from protocol.common import Ack, ErrorCode, Heartbeat, Ping, Pong
from protocol.errors import ProtocolError, RemoteError, RequestTimeout
from protocol.payloads import SamplingParams
from protocol.sockets import MessageSocket, Requester
from protocol.to_frontend import (
    DispatchReply,
    FrontendTokenInbound,
    RequestMoved,
    SchedulerReplies,
    StatusReply,
    TokenBatch,
    TokenBatches,
)
from protocol.to_scheduler import DispatchRequest, StatusRequest
from protocol.to_worker import AbortRequest, AddRequest
from services.config import KvferryConfig
from services.frontend.streams import RequestStream
from services.log import get_logger

log = get_logger("kvferry.frontend.router")

# A worker's refusal that another worker may not share: try the next one.
RETRY_CODES = frozenset({ErrorCode.REFUSED, ErrorCode.OVERLOADED, ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE})


class RouteError(Exception):
    """A request could not be started; `status` is the HTTP status, `code` the protocol ErrorCode."""

    STATUS = {ErrorCode.INVALID: 400, ErrorCode.OVERLOADED: 429, ErrorCode.UNAVAILABLE: 503,
              ErrorCode.REFUSED: 503, ErrorCode.EXPIRED: 504}

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = self.STATUS.get(code, 500)


@dataclass(slots=True)
class KnownWorker:
    """A worker this frontend may send requests to (from dispatch replies and scheduler status)."""

    worker_id: str
    address: str
    seen: float


@dataclass(slots=True)
class WorkerHealth:
    """This frontend's own liveness view of one worker address (Ping → Pong)."""

    last_pong: float  # monotonic; set to the time watching began before the first Pong
    pinging: bool = False


def new_incarnation() -> str:
    """This start of the frontend: its start time (hex nanoseconds, fixed width, so later starts
    sort after earlier ones) and a random suffix. Workers abort the requests of an earlier start."""
    return f"{time.time_ns():016x}-{uuid.uuid4().hex[:8]}"


def new_request_id(prefix: str) -> str:
    """A wire request id such as `cmpl-3f9c...`: the HTTP response id and what `kvferry ctl` shows."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Router:
    """Dispatches requests, talks to workers, and demultiplexes their token streams."""

    def __init__(self, cfg: KvferryConfig, ctx: zmq.asyncio.Context | None = None,
                 on_dispatch: Callable[[float], None] | None = None,
                 on_resume: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.fcfg = cfg.frontend
        self.frontend_id = cfg.frontend.resolved_id
        self.incarnation = new_incarnation()
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.reply_address = cfg.cluster.frontend_tokens(cfg.frontend.index)
        self.streams: dict[str, RequestStream] = {}
        self.known: dict[str, KnownWorker] = {}
        self.scheduler_ok: bool | None = None
        self.on_dispatch = on_dispatch
        self.on_resume = on_resume  # called with "resumed" or "failed" per lost request
        self.health: dict[str, WorkerHealth] = {}  # by worker address
        # silent request id → (since when no live worker lists it, its owner's report time then)
        self._unlisted: dict[str, tuple[float, int]] = {}
        # Aborted requests: expiry time and the owners already told, so late tokens or a move
        # re-send the abort only to an owner that has not had it.
        self._tombstones: dict[str, tuple[float, set[str]]] = {}
        self._workers: dict[str, Requester] = {}
        self._tasks: list[asyncio.Task] = []
        self._bg: set[asyncio.Task] = set()
        self._hb_seq = 0
        self.tokens_sock: MessageSocket | None = None
        self.sched: Requester | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.tokens_sock = MessageSocket.bind(self.ctx, zmq.PULL, self.cfg.cluster.bind(self.reply_address),
                                              FrontendTokenInbound, name="frontend-tokens")
        sched_sock = MessageSocket.connect(self.ctx, zmq.DEALER, self.cfg.cluster.scheduler(), SchedulerReplies,
                                           name="frontend-scheduler", server_role="scheduler")
        self.sched = Requester(sched_sock).start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_tokens(), name="frontend-tokens"),
                       loop.create_task(self._refresh_status(), name="frontend-status"),
                       loop.create_task(self._watch_workers(), name="frontend-watch")]

    async def close(self) -> None:
        for rid in list(self.streams):
            self.abort(rid, "frontend stopping")
        if self._bg:
            await asyncio.wait(self._bg, timeout=1.0)
        for t in self._tasks + list(self._bg):
            t.cancel()
        for t in self._tasks + list(self._bg):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for r in [self.sched, *self._workers.values()]:
            if r is not None:
                await r.close()
                r.sock.close()
        if self.tokens_sock is not None:
            self.tokens_sock.close()

    # ---- dispatch --------------------------------------------------------------------------------

    async def dispatch(self, request_id: str, num_prompt_tokens: int, max_tokens: int, priority: int,
                       exclude: list[str] | None = None) -> KnownWorker:
        """Ask the scheduler where `request_id` goes; fall back to the last known instances."""
        assert self.sched is not None
        if self.scheduler_ok is False:
            # The scheduler did not answer lately: no per-request wait for it (the status loop
            # notices its return); the last view, least loaded by this frontend's own count.
            worker = self._fallback(exclude or [])
            if worker is not None:
                log.info("request.dispatch_fallback", request_id=request_id, worker_id=worker.worker_id)
                return worker
        t0 = time.perf_counter()
        msg = DispatchRequest(request_id=request_id, priority=priority, num_prompt_tokens=num_prompt_tokens,
                              max_tokens=max_tokens, frontend_id=self.frontend_id, exclude_workers=exclude or [])
        try:
            reply = await self.sched.request(msg, timeout_s=self.fcfg.dispatch_timeout_s)
        except RemoteError as exc:
            self.scheduler_ok = True
            if exc.code == ErrorCode.UNAVAILABLE:
                # E.g. a scheduler that just restarted and has not heard from every worker yet:
                # a worker that answers this frontend's pings may still take it.
                worker = self._fallback(exclude or [], responsive_only=True)
                if worker is not None:
                    log.info("request.dispatch_fallback", request_id=request_id, worker_id=worker.worker_id,
                             reason=exc.message)
                    return worker
            raise RouteError(exc.code if exc.code in RouteError.STATUS else ErrorCode.UNAVAILABLE,
                             f"scheduler: {exc.message}") from None
        except RequestTimeout:
            self.scheduler_ok = False
            worker = self._fallback(exclude or [])
            log.warning("request.dispatch_fallback", request_id=request_id,
                        worker_id=worker.worker_id if worker else None)
            if worker is None:
                raise RouteError(ErrorCode.UNAVAILABLE, "the scheduler does not answer and no worker is known") from None
            return worker
        finally:
            if self.on_dispatch is not None:
                self.on_dispatch(time.perf_counter() - t0)
        self.scheduler_ok = True
        if not isinstance(reply, DispatchReply):
            raise RouteError(ErrorCode.INTERNAL, f"scheduler answered {type(reply).__name__}")
        worker = KnownWorker(reply.worker_id, reply.worker_address, time.monotonic())
        self.known[reply.worker_id] = worker
        return worker

    def _fallback(self, exclude: list[str], responsive_only: bool = False) -> KnownWorker | None:
        """The known worker with the fewest of this frontend's requests, skipping `exclude`, those
        that do not answer pings and (`responsive_only`) those that have not answered one lately."""
        load: dict[str, int] = {}
        for s in self.streams.values():
            load[s.worker_id] = load.get(s.worker_id, 0) + 1
        now = time.monotonic()
        timeout = self.fcfg.worker_timeout_s

        def ok(w: KnownWorker) -> bool:
            h = self.health.get(w.address)
            if h is None:
                return not responsive_only
            return now - h.last_pong <= (timeout / 2 if responsive_only else timeout)

        candidates = [w for w in self.known.values() if w.worker_id not in exclude and ok(w)]
        if not candidates:
            return None
        return min(candidates, key=lambda w: (load.get(w.worker_id, 0), w.worker_id))

    # ---- workers ---------------------------------------------------------------------------------

    def _worker(self, address: str) -> Requester:
        r = self._workers.get(address)
        if r is None:
            sock = MessageSocket.connect(self.ctx, zmq.DEALER, address, (Ack, Pong, *_error_types()),
                                         name=f"frontend-worker-{address}", server_role="worker")
            r = self._workers[address] = Requester(sock).start()
        return r

    async def submit(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, priority: int,
                     deadline_s: float) -> RequestStream:
        """Dispatch and start `request_id`; returns its stream (tokens flow into `stream.queue`).
        Raises RouteError when no worker takes it."""
        stream = RequestStream(request_id, "", "", num_prompt_tokens=len(prompt_ids), prompt_ids=prompt_ids,
                               sampling=sampling, priority=priority, on_lost=self._on_lost,
                               deadline=time.monotonic() + deadline_s)
        self.streams[request_id] = stream  # before AddRequest: tokens may beat the Ack
        try:
            await self._start(stream, prompt_ids, sampling, 0, set())
        except BaseException:
            if self.streams.get(request_id) is stream:
                del self.streams[request_id]
            raise
        log.info("request.added", request_id=request_id, worker_id=stream.worker_id, prompt_tokens=len(prompt_ids))
        return stream

    async def _start(self, stream: RequestStream, prompt: list[int], sampling: SamplingParams, first_index: int,
                     exclude: set[str]) -> None:
        """Dispatch `stream`'s request and AddRequest it to the chosen worker; a worker that refuses
        (RETRY_CODES) or does not answer in time is excluded and the next one tried, up to
        [frontend] max_add_attempts. Raises RouteError (the last worker's refusal, or the dispatch's)."""
        rid = stream.request_id
        error: RouteError | None = None
        for _ in range(self.fcfg.max_add_attempts):
            left = stream.deadline - time.monotonic()
            if left <= 0:
                raise RouteError(ErrorCode.EXPIRED, "the deadline passed before a worker took the request")
            try:
                worker = await self.dispatch(rid, len(prompt), sampling.max_tokens, stream.priority, sorted(exclude))
            except RouteError:
                if error is not None:  # no worker left once those that refused are excluded: say why they did
                    raise error from None
                raise
            stream.restart_at(worker.worker_id, worker.address)  # aborts go there from now on
            add = AddRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling, priority=stream.priority,
                             frontend_id=self.frontend_id, frontend_incarnation=self.incarnation,
                             reply_address=self.reply_address, first_index=first_index,
                             deadline_ms=deadline_in(left))
            try:
                reply = await self._worker(worker.address).request(add, timeout_s=min(self.fcfg.add_timeout_s, left))
                if isinstance(reply, Ack) and not reply.ok:
                    raise RemoteError(ErrorCode.REFUSED, reply.detail or "refused")
            except RemoteError as exc:
                error = RouteError(exc.code, f"{worker.worker_id}: {exc.message}")
                if exc.code not in RETRY_CODES:
                    raise error from None
                log.info("request.refused", request_id=rid, worker_id=worker.worker_id, code=exc.code)
                exclude.add(worker.worker_id)
                continue
            except (RequestTimeout, zmq.ZMQError):  # (its socket closed: the worker was declared lost)
                # It may have taken the request after all: stop it there and ignore its tokens.
                stream.dead.add(worker.worker_id)
                exclude.add(worker.worker_id)
                self._spawn(self._send_abort(rid, worker.address, "add timed out"))
                error = RouteError(ErrorCode.UNAVAILABLE, f"{worker.worker_id} did not accept the request in time")
                continue
            if self.streams.get(rid) is not stream:  # aborted while the add was on its way
                self._spawn(self._send_abort(rid, worker.address, "aborted by the frontend"))
            return
        assert error is not None
        raise error

    # ---- failures --------------------------------------------------------------------------------

    def _on_lost(self, stream: RequestStream, why: str) -> bool:
        """A final "error"/"abort" batch from the request's owner (RequestStream.on_lost): resume it."""
        return self.resume(stream, why, owner_let_go=True)

    def resume(self, stream: RequestStream, why: str, owner_let_go: bool = False) -> bool:
        """Take `stream`'s request away from its owner and go on elsewhere (in the background).
        False when the stream is not live (it then ends as it would have)."""
        if stream.resuming:
            return True
        if self.streams.get(stream.request_id) is not stream or stream.finished:
            return False
        old_id, old_address = stream.worker_id, stream.worker_address
        stream.dead.add(old_id)
        stream.ahead.clear()
        stream.resuming = True
        self._unlisted.pop(stream.request_id, None)
        if not owner_let_go and old_address:
            # A false alarm (the worker lives on) must not leave a copy running there.
            self._spawn(self._send_abort(stream.request_id, old_address, "resumed on another worker", quiet=True))
        self._spawn(self._resume(stream, old_id, why))
        return True

    async def _resume(self, stream: RequestStream, old_id: str, why: str) -> None:
        rid = stream.request_id
        assert stream.sampling is not None
        delivered = stream.next_index
        left = stream.sampling.max_tokens - delivered
        try:
            if left <= 0:  # every token arrived; only the final batch was lost
                stream.end("length")
                return
            if stream.resumes >= self.fcfg.max_resumes:
                raise RouteError(ErrorCode.UNAVAILABLE, f"resumed {stream.resumes} times already (max_resumes)")
            stream.resumes += 1
            sampling = msgspec.structs.replace(stream.sampling, max_tokens=left)
            await self._start(stream, stream.prompt_ids + stream.output, sampling, delivered, set(stream.dead))
        except RouteError as exc:
            log.warning("request.resume_failed", request_id=rid, lost_worker_id=old_id, reason=why, error=exc.message)
            stream.fail("error", f"{old_id} failed the request ({why}) and no worker could resume it: {exc.message}")
            if self.on_resume is not None:
                self.on_resume("failed")
            return
        except Exception as exc:  # noqa: BLE001 - the stream must end, not hang
            log.exception("request.resume_failed", request_id=rid)
            stream.fail("error", f"{old_id} failed the request ({why}); resuming it failed: {exc}")
            return
        finally:
            stream.resuming = False
        if self.streams.get(rid) is stream:
            log.warning("request.resumed", request_id=rid, lost_worker_id=old_id, worker_id=stream.worker_id,
                        reason=why, first_index=delivered, resumes=stream.resumes)
            if self.on_resume is not None:
                self.on_resume("resumed")

    def worker_lost(self, worker_id: str, address: str, why: str) -> None:
        """`worker_id` at `address` is gone: forget it and resume each of its requests elsewhere."""
        self.known = {k: w for k, w in self.known.items() if w.address != address and k != worker_id}
        self.health.pop(address, None)
        requester = self._workers.pop(address, None)
        if requester is not None:  # pending adds and pings to it fail now, not at their timeout
            self._spawn(_close_requester(requester))
        affected = [s for s in self.streams.values()
                    if (s.worker_address == address or s.worker_id == worker_id) and not s.resuming]
        log.warning("worker.lost", worker_id=worker_id, address=address, reason=why, requests=len(affected))
        for s in affected:
            self.resume(s, f"{worker_id} lost: {why}")

    def finish(self, request_id: str) -> None:
        """Forget a request that ended normally (its worker already freed it)."""
        self.streams.pop(request_id, None)

    def abort(self, request_id: str, reason: str, worker_address: str | None = None) -> None:
        """Stop `request_id` on its current owner (in the background; never blocks)."""
        stream = self.streams.pop(request_id, None)
        address = worker_address or (stream.worker_address if stream else None)
        if stream is not None:
            stream.fail("abort", reason)
        self._tombstones[request_id] = (time.monotonic() + self.fcfg.tombstone_s, set())
        if address:  # "" while its first dispatch is under way: _start aborts it once added
            self._abort_at(request_id, address, reason)

    def _abort_at(self, request_id: str, address: str, reason: str) -> None:
        """Send the abort to `address` unless it was already told about this request."""
        _, told = self._tombstones[request_id]
        if address not in told:
            told.add(address)
            self._spawn(self._send_abort(request_id, address, reason))

    async def _send_abort(self, request_id: str, address: str, reason: str, quiet: bool = False) -> None:
        """`quiet`: a precaution (the worker is most likely dead), so no answer is no news."""
        try:
            await self._worker(address).request(AbortRequest(request_id=request_id, reason=reason[:200]),
                                                timeout_s=self.fcfg.abort_timeout_s)
            log.info("request.aborted", request_id=request_id, worker_address=address, reason=reason)
        except (ProtocolError, zmq.ZMQError) as exc:
            (log.debug if quiet else log.warning)("request.abort_failed", request_id=request_id,
                                                  worker_address=address, error=str(exc))

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ---- tokens ----------------------------------------------------------------------------------

    async def _read_tokens(self) -> None:
        assert self.tokens_sock is not None
        while True:
            try:
                rec = await self.tokens_sock.recv()
            except ProtocolError:
                continue  # logged by recv
            msg = rec.msg
            if isinstance(msg, TokenBatches):
                for b in msg.batches:
                    self._on_batch(b)
            elif isinstance(msg, TokenBatch):
                self._on_batch(msg)
            elif isinstance(msg, RequestMoved):
                self._on_moved(msg)

    def _on_batch(self, b: TokenBatch) -> None:
        stream = self.streams.get(b.request_id)
        if stream is None:
            if b.request_id in self._tombstones and not b.finished:
                worker = self.known.get(b.worker_id)
                if worker is not None:  # it still runs somewhere: abort it there, if not yet told
                    self._abort_at(b.request_id, worker.address, "aborted by the frontend")
            return
        stream.accept(b)

    def _on_moved(self, m: RequestMoved) -> None:
        self.known.setdefault(m.worker_id, KnownWorker(m.worker_id, m.control_endpoint, time.monotonic()))
        stream = self.streams.get(m.request_id)
        if stream is not None:
            stream.worker_id, stream.worker_address = m.worker_id, m.control_endpoint
            log.info("request.moved", request_id=m.request_id, worker_id=m.worker_id, next_index=m.next_index)
        elif m.request_id in self._tombstones:
            self._abort_at(m.request_id, m.control_endpoint, "aborted by the frontend")

    # ---- background ------------------------------------------------------------------------------

    async def _refresh_status(self) -> None:
        assert self.sched is not None
        while True:
            try:
                reply = await self.sched.request(StatusRequest(include_requests=False),
                                                 timeout_s=max(self.fcfg.dispatch_timeout_s, 1.0))
                if isinstance(reply, StatusReply):
                    self._apply_status(reply)
                    self.scheduler_ok = True
                    await self._find_silent()
            except RequestTimeout:
                self.scheduler_ok = False
            except ProtocolError as exc:
                log.warning("frontend.status_failed", error=str(exc))
            now = time.monotonic()
            for rid in [r for r, (t, _) in self._tombstones.items() if t < now]:
                del self._tombstones[rid]
            await asyncio.sleep(self.fcfg.status_interval_s)

    def _apply_status(self, reply: StatusReply) -> None:
        """Adopt the scheduler's view: live, non-draining workers; resume the requests of dead ones.
        A worker missing from the view (a scheduler that restarted and has not heard from it yet)
        stays while it answers this frontend's pings."""
        now = time.monotonic()
        listed = {i.worker_id for i in reply.instances}
        known = {i.worker_id: KnownWorker(i.worker_id, i.endpoints.control, now)
                 for i in reply.instances if i.alive and not i.draining}
        for wid, w in self.known.items():
            h = self.health.get(w.address)
            if wid not in listed and h is not None and now - h.last_pong <= self.fcfg.worker_timeout_s:
                known[wid] = w
        self.known = known
        owners = {s.worker_id for s in self.streams.values() if not s.resuming}
        for i in reply.instances:
            if not i.alive and i.worker_id in owners:
                self.worker_lost(i.worker_id, i.endpoints.control, "the scheduler declared it dead")

    async def _find_silent(self) -> None:
        """Resume requests that stream nothing and that no live worker lists (lost between two
        workers, e.g. a migration's destination died before telling us that it owned it)."""
        assert self.sched is not None
        now = time.monotonic()
        silent = [s for s in self.streams.values() if not s.resuming and now - s.progressed > self.fcfg.silent_s]
        if not silent:
            self._unlisted.clear()
            return
        try:
            reply = await self.sched.request(StatusRequest(include_requests=True),
                                             timeout_s=max(self.fcfg.dispatch_timeout_s, 1.0))
        except ProtocolError:
            return
        if not isinstance(reply, StatusReply):
            return
        listed = {r.request_id for r in reply.requests}
        # Only an owner that reports (alive, registered with this scheduler) can vouch that it does
        # not hold the request; an unlisted owner is the pings' business.
        # And only a report made after we first missed the request counts: a worker stuck in a
        # long step (or paused) reports nothing, and its last report may predate the request.
        reporting = {i.worker_id: i.last_report_ms for i in reply.instances if i.alive and i.last_report_ms > 0}
        now = time.monotonic()
        unlisted: dict[str, tuple[float, int]] = {}
        for s in silent:
            if s.request_id in listed or s.worker_id not in reporting:
                continue
            since, report_ms = self._unlisted.get(s.request_id, (now, reporting[s.worker_id]))
            if (now - since >= self.fcfg.unlisted_s and reporting[s.worker_id] > report_ms
                    and self.streams.get(s.request_id) is s):
                self.resume(s, "listed on no live worker")
            else:
                unlisted[s.request_id] = (since, report_ms)
        self._unlisted = unlisted

    async def _watch_workers(self) -> None:
        """Heartbeat and Ping every known worker and every worker holding a request of ours; a
        worker that answers no Ping for `worker_timeout_s` is lost. Also resumes streams stuck
        behind a gap."""
        while True:
            await asyncio.sleep(self.fcfg.heartbeat_interval_s)
            self._hb_seq += 1
            now = time.monotonic()
            targets = {w.address: w.worker_id for w in self.known.values()}
            for s in self.streams.values():
                if s.worker_address and not s.resuming:
                    targets.setdefault(s.worker_address, s.worker_id)
            for address in [a for a in self.health if a not in targets]:
                del self.health[address]
            for address, wid in targets.items():
                h = self.health.get(address)
                if h is None:
                    h = self.health[address] = WorkerHealth(last_pong=now)
                if now - h.last_pong > self.fcfg.worker_timeout_s:
                    self.worker_lost(wid, address, f"no answer to pings for {now - h.last_pong:.1f} s")
                elif not h.pinging:
                    h.pinging = True
                    self._spawn(self._ping(address, h))
            for s in list(self.streams.values()):
                if s.ahead and not s.resuming and now - s.progressed > self.fcfg.gap_timeout_s:
                    self.resume(s, f"tokens from index {s.next_index} never arrived")

    async def _ping(self, address: str, h: WorkerHealth) -> None:
        try:
            r = self._worker(address)
            with contextlib.suppress(ProtocolError):
                await r.send(Heartbeat(sender_id=self.frontend_id, role="frontend", seq=self._hb_seq,
                                       incarnation=self.incarnation), timeout_s=0.05)
            reply = await r.request(Ping(sender_id=self.frontend_id), timeout_s=self.fcfg.worker_timeout_s)
            if isinstance(reply, Pong):
                h.last_pong = time.monotonic()
        except (ProtocolError, zmq.ZMQError):
            pass
        finally:
            h.pinging = False

    @property
    def healthy(self) -> bool:
        """At least one worker is known (from the scheduler, or the last view while it is away)."""
        return bool(self.known)


async def _close_requester(r: Requester) -> None:
    await r.close()
    r.sock.close()


def _error_types() -> tuple[type, ...]:
    from protocol.common import ErrorReply

    return (ErrorReply,)
