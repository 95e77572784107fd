"""Request routing, shared by the HTTP API and the SDK endpoint: dispatch and token routing.

For a new request: DispatchRequest to the scheduler (deadline `dispatch_timeout_s`), with the
prompt's block hashes once a DispatchReply has told how the cluster hashes them
(services.frontend.prompt_hashes), → the worker; when the scheduler does not answer, the last
known instance with the fewest of this frontend's requests. Then AddRequest to that worker (one DEALER per worker) with `reply_address` = this
frontend's token endpoint; the worker answers Ack (or ErrorReply: invalid → 400, overloaded → 429,
unavailable → 503) and PUSHes TokenBatch/TokenBatches to the token socket (a PULL), which this
module routes by request id to each request's `RequestStream`. RequestMoved (a migration
committed) changes the request's owner, so aborts always go to the current owner. Aborted
requests are remembered for a while: a RequestMoved or tokens arriving for one re-send the abort
to whoever now has it. The frontend heartbeats every known worker so that workers can abort the
requests of a frontend that died (services.frontend.liveness). The connections to workers are
services.frontend.worker_links; resumption after failures is services.frontend.resumption.

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
- A lost worker may come back (a network partition shorter than its [worker] frontend_timeout_s)
  still running a request that was resumed elsewhere, and the abort sent on resumption may have
  reached it past its deadline (dropped). Its tokens for that request (while the stream runs, or
  within `tombstone_s` after it ended) send it an AbortRequest, again every `abort_timeout_s`
  while they keep coming, so no copy outlives the partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from protocol.base import deadline_in
from protocol.common import Ack, ErrorCode
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
from protocol.to_worker import AddRequest
from services.config import KvferryConfig
from services.frontend.errors import RouteError
from services.frontend.liveness import WorkerLiveness
from services.frontend.prompt_hashes import PromptHasher, PromptHashes
from services.frontend.resumption import Resumer
from services.frontend.streams import RequestStream
from services.frontend.worker_links import WorkerLinks
from services.log import get_logger
from services.stall import StallWatch

log = get_logger("kvferry.frontend.router")

# A worker's refusal that another worker may not share: try the next one.
RETRY_CODES = frozenset({ErrorCode.REFUSED, ErrorCode.OVERLOADED, ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE})


@dataclass(slots=True)
class KnownWorker:
    """A worker this frontend may send requests to (from dispatch replies and scheduler status)."""

    worker_id: str
    address: str
    seen: float


def new_incarnation() -> str:
    """This start of the frontend: its start time (hex nanoseconds, fixed width, so later starts
    sort after earlier ones) and a random suffix. Workers abort the requests of an earlier start."""
    return f"{time.time_ns():016x}-{uuid.uuid4().hex[:8]}"


def new_request_id(prefix: str) -> str:
    """A wire request id such as `cmpl-3f9c...`: the HTTP response id and what `kvferry ctl` shows."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Router:
    """Dispatches requests, talks to workers, and demultiplexes their token streams. Worker
    liveness (`self.liveness`) and resumption (`self.resumer`) are its two collaborators."""

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
        self.hasher = PromptHasher()
        # Aborted requests: expiry time and the owners already told, so late tokens or a move
        # re-send the abort only to an owner that has not had it.
        self._tombstones: dict[str, tuple[float, set[str]]] = {}
        # Workers a request was taken from that still send tokens for it: when each was last told
        # to stop, (request id, worker id) -> monotonic; requests that ended after being taken from
        # workers, request id -> (expiry, those workers); the control address of each lost worker.
        self._orphan_aborts: dict[tuple[str, str], float] = {}
        self._ended_taken: dict[str, tuple[float, frozenset[str]]] = {}
        self._lost_addresses: dict[str, str] = {}
        self._tasks: list[asyncio.Task] = []
        self._bg: set[asyncio.Task] = set()
        self.links = WorkerLinks(self.ctx, self.fcfg.abort_timeout_s, self._spawn)
        self.liveness = WorkerLiveness(self.links, self.frontend_id, self.incarnation, self.fcfg.worker_timeout_s,
                                       self._spawn)
        # on_resume: called with "resumed" or "failed" per lost request
        self.resumer = Resumer(self.fcfg, self.streams, self._start, self.links.send_abort, self._spawn, on_resume)
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
        if self.sched is not None:
            await self.sched.close()
            self.sched.sock.close()
        await self.links.close()
        if self.tokens_sock is not None:
            self.tokens_sock.close()

    # ---- dispatch --------------------------------------------------------------------------------

    async def dispatch(self, request_id: str, num_prompt_tokens: int, max_tokens: int, priority: int,
                       exclude: list[str] | None = None, hashes: PromptHashes | None = None) -> KnownWorker:
        """Ask the scheduler where `request_id` goes (`hashes`: its prompt's block hashes, if the
        cluster's hashing is known); fall back to the last known instances."""
        assert self.sched is not None
        if self.scheduler_ok is False:
            # The scheduler did not answer lately: no per-request wait for it (the status loop
            # notices its return); the last view, least loaded by this frontend's own count.
            worker = self._fallback(exclude or [])
            if worker is not None:
                log.info("request.dispatch_fallback", request_id=request_id, worker_id=worker.worker_id)
                return worker
        t0 = time.perf_counter()
        h = hashes or PromptHashes()
        msg = DispatchRequest(request_id=request_id, priority=priority, num_prompt_tokens=num_prompt_tokens,
                              max_tokens=max_tokens, frontend_id=self.frontend_id, exclude_workers=exclude or [],
                              block_hashes=h.hashes, kv_namespace=h.namespace, kv_block_size=h.block_size)
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
        self.hasher.learn(reply.kv_namespace, reply.kv_block_size)
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
            pong = self.liveness.last_pong(w.address)
            if pong is None:
                return not responsive_only
            return now - pong <= (timeout / 2 if responsive_only else timeout)

        candidates = [w for w in self.known.values() if w.worker_id not in exclude and ok(w)]
        if not candidates:
            return None
        return min(candidates, key=lambda w: (load.get(w.worker_id, 0), w.worker_id))

    # ---- workers ---------------------------------------------------------------------------------

    async def submit(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, priority: int,
                     deadline_s: float, cache_salt: str = "") -> RequestStream:
        """Dispatch and start `request_id`; returns its stream (tokens flow into `stream.queue`).
        Raises RouteError when no worker takes it."""
        stream = RequestStream(request_id, "", "", num_prompt_tokens=len(prompt_ids), prompt_ids=prompt_ids,
                               sampling=sampling, priority=priority, cache_salt=cache_salt,
                               on_lost=self.resumer.owner_let_go,
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
        # Once per start (the retries below reuse them); a resumption extends the earlier ones.
        stream.block_hashes = self.hasher.hashes(stream.block_hashes, prompt, stream.cache_salt)
        for _ in range(self.fcfg.max_add_attempts):
            left = stream.deadline - time.monotonic()
            if left <= 0:
                raise RouteError(ErrorCode.EXPIRED, "the deadline passed before a worker took the request")
            try:
                worker = await self.dispatch(rid, len(prompt), sampling.max_tokens, stream.priority, sorted(exclude),
                                             stream.block_hashes)
            except RouteError:
                if error is not None:  # no worker left once those that refused are excluded: say why they did
                    raise error from None
                raise
            stream.restart_at(worker.worker_id, worker.address)  # aborts go there from now on
            add = AddRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling, priority=stream.priority,
                             frontend_id=self.frontend_id, frontend_incarnation=self.incarnation,
                             reply_address=self.reply_address, first_index=first_index,
                             cache_salt=stream.cache_salt,
                             deadline_ms=deadline_in(left))
            try:
                reply = await self.links.get(worker.address).request(add, timeout_s=min(self.fcfg.add_timeout_s, left))
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
                stream.taken_from(worker.worker_id)
                exclude.add(worker.worker_id)
                self._spawn(self.links.send_abort(rid, worker.address, "add timed out"))
                error = RouteError(ErrorCode.UNAVAILABLE, f"{worker.worker_id} did not accept the request in time")
                continue
            if self.streams.get(rid) is not stream:  # aborted while the add was on its way
                self._spawn(self.links.send_abort(rid, worker.address, "aborted by the frontend"))
            return
        assert error is not None
        raise error

    # ---- failures --------------------------------------------------------------------------------

    def worker_lost(self, worker_id: str, address: str, why: str, silent_since: float | None = None) -> None:
        """`worker_id` at `address` is gone: forget it and resume each of its requests elsewhere
        (with `silent_since`, those it had before it fell silent: Resumer.resume_all)."""
        self.known = {k: w for k, w in self.known.items() if w.address != address and k != worker_id}
        self._lost_addresses[worker_id] = address
        self.liveness.forget(address)
        self.links.drop(address)
        resumed = self.resumer.resume_all(worker_id, address, why, silent_since)
        log.warning("worker.lost", worker_id=worker_id, address=address, reason=why, requests=resumed)

    def finish(self, request_id: str) -> None:
        """Forget a request that ended normally (its worker already freed it). For one that was
        taken from lost workers, remember them for `tombstone_s`: one may be back and still run it."""
        stream = self.streams.pop(request_id, None)
        if stream is not None and stream.dead:
            self._ended_taken[request_id] = (time.monotonic() + self.fcfg.tombstone_s, frozenset(stream.dead))

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
            self._spawn(self.links.send_abort(request_id, address, reason))

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
            if not b.finished and b.worker_id in self._ended_taken.get(b.request_id, (0.0, frozenset()))[1]:
                self._stop_orphan(b.request_id, b.worker_id)
            elif b.request_id in self._tombstones and not b.finished:
                address = self._address_of(b.worker_id)
                if address is not None:  # it still runs somewhere: abort it there, if not yet told
                    self._abort_at(b.request_id, address, "aborted by the frontend")
            return
        if b.worker_id in stream.dead and b.worker_id != stream.worker_id and not b.finished:
            self._stop_orphan(b.request_id, b.worker_id)
        elif b.worker_id == stream.worker_id and stream.worker_address:
            self.liveness.heard(stream.worker_address, time.monotonic())  # it runs: tokens are a Pong
        stream.accept(b)

    def _address_of(self, worker_id: str) -> str | None:
        worker = self.known.get(worker_id)
        return worker.address if worker is not None else self._lost_addresses.get(worker_id)

    def _stop_orphan(self, request_id: str, worker_id: str) -> None:
        """`worker_id` still runs `request_id`, which was taken from it and goes on elsewhere (it
        was lost and came back): abort it there, at most once per `abort_timeout_s`."""
        address = self._address_of(worker_id)
        now = time.monotonic()
        if address is None or now - self._orphan_aborts.get((request_id, worker_id), -1e9) < self.fcfg.abort_timeout_s:
            return
        self._orphan_aborts[(request_id, worker_id)] = now
        log.info("request.orphan_abort", request_id=request_id, worker_id=worker_id, worker_address=address)
        self._spawn(self.links.send_abort(request_id, address, "resumed on another worker"))

    def _on_moved(self, m: RequestMoved) -> None:
        self.known.setdefault(m.worker_id, KnownWorker(m.worker_id, m.control_endpoint, time.monotonic()))
        stream = self.streams.get(m.request_id)
        if stream is not None:
            stream.moved_to(m.worker_id, m.control_endpoint)
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
            for rid in [r for r, (t, _) in self._ended_taken.items() if t < now]:
                del self._ended_taken[rid]
            for key in [k for k, t in self._orphan_aborts.items() if t < now - self.fcfg.tombstone_s]:
                del self._orphan_aborts[key]
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
            pong = self.liveness.last_pong(w.address)
            if wid not in listed and pong is not None and now - pong <= self.fcfg.worker_timeout_s:
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
        silent = self.resumer.silent(time.monotonic())
        if not silent:
            return
        try:
            reply = await self.sched.request(StatusRequest(include_requests=True),
                                             timeout_s=max(self.fcfg.dispatch_timeout_s, 1.0))
        except ProtocolError:
            return
        if isinstance(reply, StatusReply):
            self.resumer.check_silent(silent, reply, time.monotonic())

    async def _watch_workers(self) -> None:
        """Each [frontend] heartbeat_interval_s: heartbeat and Ping every known worker and every
        worker holding a request of ours (one that answers none for `worker_timeout_s` is lost),
        and resume streams stuck behind a gap."""
        stall = StallWatch(self.fcfg.heartbeat_interval_s)
        while True:
            await asyncio.sleep(self.fcfg.heartbeat_interval_s)
            late = stall.late()
            if late:
                log.warning("frontend.stalled", seconds=round(late, 3), watched_workers=len(self.liveness.health))
                self.liveness.excuse(late)
            targets = {w.address: w.worker_id for w in self.known.values()}
            for s in self.streams.values():
                if s.worker_address and not s.resuming:
                    targets.setdefault(s.worker_address, s.worker_id)
            now = time.monotonic()
            for wid, address, silent_s in self.liveness.tick(targets, now):
                self.worker_lost(wid, address, f"no answer to pings for {silent_s:.1f} s", silent_since=now - silent_s)
            self.resumer.check_gaps(time.monotonic())

    @property
    def healthy(self) -> bool:
        """At least one worker is known (from the scheduler, or the last view while it is away)."""
        return bool(self.known)
