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
from protocol.common import Ack, ErrorCode, Heartbeat
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

TOMBSTONE_S = 30.0
STATUS_INTERVAL_S = 2.0
HEARTBEAT_INTERVAL_S = 1.0
ADD_TIMEOUT_S = 5.0
ABORT_TIMEOUT_S = 2.0


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


def new_request_id(prefix: str) -> str:
    """A wire request id such as `cmpl-3f9c...`: the HTTP response id and what `kvferry ctl` shows."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Router:
    """Dispatches requests, talks to workers, and demultiplexes their token streams."""

    def __init__(self, cfg: KvferryConfig, ctx: zmq.asyncio.Context | None = None,
                 on_dispatch: Callable[[float], None] | None = None) -> None:
        self.cfg = cfg
        self.fcfg = cfg.frontend
        self.frontend_id = cfg.frontend.resolved_id
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.reply_address = cfg.cluster.frontend_tokens(cfg.frontend.index)
        self.streams: dict[str, RequestStream] = {}
        self.known: dict[str, KnownWorker] = {}
        self.scheduler_ok: bool | None = None
        self.on_dispatch = on_dispatch
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
                       loop.create_task(self._heartbeats(), name="frontend-heartbeats")]

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
        t0 = time.perf_counter()
        msg = DispatchRequest(request_id=request_id, priority=priority, num_prompt_tokens=num_prompt_tokens,
                              max_tokens=max_tokens, frontend_id=self.frontend_id, exclude_workers=exclude or [])
        try:
            reply = await self.sched.request(msg, timeout_s=self.fcfg.dispatch_timeout_s)
        except RemoteError as exc:
            self.scheduler_ok = True
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

    def _fallback(self, exclude: list[str]) -> KnownWorker | None:
        load: dict[str, int] = {}
        for s in self.streams.values():
            load[s.worker_id] = load.get(s.worker_id, 0) + 1
        candidates = [w for w in self.known.values() if w.worker_id not in exclude]
        if not candidates:
            return None
        return min(candidates, key=lambda w: (load.get(w.worker_id, 0), w.worker_id))

    # ---- workers ---------------------------------------------------------------------------------

    def _worker(self, address: str) -> Requester:
        r = self._workers.get(address)
        if r is None:
            sock = MessageSocket.connect(self.ctx, zmq.DEALER, address, (Ack, *_error_types()),
                                         name=f"frontend-worker-{address}", server_role="worker")
            r = self._workers[address] = Requester(sock).start()
        return r

    async def submit(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, priority: int,
                     deadline_s: float) -> RequestStream:
        """Dispatch and start `request_id`; returns its stream (tokens flow into `stream.queue`).
        Raises RouteError when it cannot start."""
        worker = await self.dispatch(request_id, len(prompt_ids), sampling.max_tokens, priority)
        stream = RequestStream(request_id, worker.worker_id, worker.address, num_prompt_tokens=len(prompt_ids))
        self.streams[request_id] = stream  # before AddRequest: tokens may beat the Ack
        add = AddRequest(request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling, priority=priority,
                         frontend_id=self.frontend_id, reply_address=self.reply_address, first_index=0,
                         deadline_ms=deadline_in(deadline_s))
        try:
            reply = await self._worker(worker.address).request(add, timeout_s=min(ADD_TIMEOUT_S, deadline_s))
            if isinstance(reply, Ack) and not reply.ok:
                raise RemoteError(ErrorCode.REFUSED, reply.detail or "refused")
        except RemoteError as exc:
            self.streams.pop(request_id, None)
            raise RouteError(exc.code, f"{worker.worker_id}: {exc.message}") from None
        except RequestTimeout:
            self.streams.pop(request_id, None)
            self.abort(request_id, "add timed out", worker_address=worker.address)
            raise RouteError(ErrorCode.UNAVAILABLE, f"{worker.worker_id} did not accept the request in time") from None
        log.info("request.added", request_id=request_id, worker_id=worker.worker_id, prompt_tokens=len(prompt_ids))
        return stream

    def finish(self, request_id: str) -> None:
        """Forget a request that ended normally (its worker already freed it)."""
        self.streams.pop(request_id, None)

    def abort(self, request_id: str, reason: str, worker_address: str | None = None) -> None:
        """Stop `request_id` on its current owner (in the background; never blocks)."""
        stream = self.streams.pop(request_id, None)
        address = worker_address or (stream.worker_address if stream else None)
        if stream is not None:
            stream.fail("abort", reason)
        self._tombstones[request_id] = (time.monotonic() + TOMBSTONE_S, set())
        if address is not None:
            self._abort_at(request_id, address, reason)

    def _abort_at(self, request_id: str, address: str, reason: str) -> None:
        """Send the abort to `address` unless it was already told about this request."""
        _, told = self._tombstones[request_id]
        if address not in told:
            told.add(address)
            self._spawn(self._send_abort(request_id, address, reason))

    async def _send_abort(self, request_id: str, address: str, reason: str) -> None:
        try:
            await self._worker(address).request(AbortRequest(request_id=request_id, reason=reason[:200]),
                                                timeout_s=ABORT_TIMEOUT_S)
            log.info("request.aborted", request_id=request_id, worker_address=address, reason=reason)
        except ProtocolError as exc:
            log.warning("request.abort_failed", request_id=request_id, worker_address=address, error=str(exc))

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
                    now = time.monotonic()
                    self.known = {i.worker_id: KnownWorker(i.worker_id, i.endpoints.control, now)
                                  for i in reply.instances if i.alive and not i.draining}
                    self.scheduler_ok = True
            except RequestTimeout:
                self.scheduler_ok = False
            except ProtocolError as exc:
                log.warning("frontend.status_failed", error=str(exc))
            now = time.monotonic()
            for rid in [r for r, (t, _) in self._tombstones.items() if t < now]:
                del self._tombstones[rid]
            await asyncio.sleep(STATUS_INTERVAL_S)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            self._hb_seq += 1
            for w in list(self.known.values()):
                hb = Heartbeat(sender_id=self.frontend_id, role="frontend", seq=self._hb_seq)
                with contextlib.suppress(ProtocolError):
                    await self._worker(w.address).send(hb, timeout_s=0.05)

    @property
    def healthy(self) -> bool:
        """At least one worker is known (from the scheduler, or the last view while it is away)."""
        return bool(self.known)


def _error_types() -> tuple[type, ...]:
    from protocol.common import ErrorReply

    return (ErrorReply,)
