"""The worker's link to the global scheduler: register, heartbeat, load reports, re-register.

The scheduler keeps only soft state and may restart at any time, so registration is a loop, not
a one-off: the link (re-)registers with backoff until a RegisterReply arrives, and goes back to
registering when
- the scheduler answers a report, heartbeat or ping with ErrorReply(code "not_found") (it does not
  know this worker: it restarted),
- a RegisterReply or Pong names a different scheduler_id than the one registered with,
- nothing was heard from the scheduler for `heartbeat_timeout_s` (replies on this link, or a Ping
  it sent to the control socket).
The worker keeps serving its requests while the scheduler is away; only the reports stop.

Liveness: every heartbeat interval the link sends a one-way Heartbeat and a Ping (the Pong is
what proves the scheduler alive). Load reports go out after engine steps (`mark_dirty()`),
at most every report interval, and at least every heartbeat interval when idle; each report is
the worker's KvEvents since the last one followed by its LoadReport.

KV events need a resync (the next batch a reset with the whole cache: `on_resync(reason)`) after
every registration, when the scheduler sends ResyncKvEvents, and when a KvEvents could not leave.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import zmq
import zmq.asyncio

from protocol.base import now_ms
from protocol.common import ErrorCode, ErrorReply, Heartbeat, Ping, Pong
from protocol.errors import ProtocolError, RemoteError, RequestTimeout
from protocol.sockets import MessageSocket, Received, Requester
from protocol.base import Message
from protocol.to_scheduler import Deregister, KvEvents, RegisterWorker
from protocol.to_worker import RegisterReply, ResyncKvEvents, WorkerSchedulerReplies
from services.log import get_logger

log = get_logger(__name__)

SEND_TIMEOUT_S = 0.2  # a one-way message that cannot leave by then is dropped (scheduler away)
REGISTER_BACKOFF_S = (0.05, 2.0)  # first and largest pause between registration attempts
DEALER_HWM = 256


class SchedulerLink:
    """Keeps this worker registered with the scheduler and feeds it heartbeats and load reports.

    `make_register()` builds the RegisterWorker to send (fresh msg_id each call);
    `make_report(seq)` builds one report from the engine's current state: the messages to send in
    order (KvEvents, then the LoadReport numbered `seq`). `on_resync(reason)`: KV events must be
    sent whole again (see the module docstring).
    """

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, worker_id: str,
                 make_register: Callable[[], RegisterWorker],
                 make_report: Callable[[int], Awaitable[Sequence[Message]]],
                 heartbeat_interval_s: float = 0.5, report_interval_s: float = 0.05,
                 heartbeat_timeout_s: float = 2.0, on_resync: Callable[[str], None] | None = None) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.worker_id = worker_id
        self._make_register = make_register
        self._make_report = make_report
        self._on_resync = on_resync or (lambda reason: None)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.report_interval_s = report_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.scheduler_id: str | None = None
        self.registered = asyncio.Event()
        self.registrations = 0
        self.report_seq = 0
        self.heartbeat_seq = 0
        self._last_heard = time.monotonic()
        self._last_report = 0.0
        self._dirty = asyncio.Event()
        self._need_register = asyncio.Event()
        self._need_register.set()
        self._sock: MessageSocket | None = None
        self._requester: Requester | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # ---- public ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._open()
        self._tasks = [asyncio.create_task(self._register_loop(), name="scheduler-register"),
                       asyncio.create_task(self._heartbeat_loop(), name="scheduler-heartbeat"),
                       asyncio.create_task(self._report_loop(), name="scheduler-report")]

    def mark_dirty(self) -> None:
        """The engine's load changed (a step ran, a request came or went): report soon."""
        self._dirty.set()

    def heard_from(self, sender_id: str | None = None) -> None:
        """Something arrived from the scheduler (e.g. a Ping on the control socket)."""
        if sender_id is None or sender_id == self.scheduler_id:
            self._last_heard = time.monotonic()

    def reregister(self, reason: str) -> None:
        """Forget the registration and register again (idempotent while registering)."""
        if self._need_register.is_set() or not self.registered.is_set():
            return
        log.warning("worker.scheduler_lost", worker_id=self.worker_id, scheduler_id=self.scheduler_id, reason=reason)
        self.registered.clear()
        self._need_register.set()

    async def stop(self, reason: str = "stopping") -> None:
        """Deregister (best effort, bounded) and close the socket."""
        self._closing = True  # loops also check this: asyncio.wait_for (3.11) can swallow a cancel
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []
        if self.registered.is_set() and self._requester is not None:
            try:
                await self._requester.send(Deregister(worker_id=self.worker_id, reason=reason),
                                           timeout_s=SEND_TIMEOUT_S)
                log.info("worker.deregistered", worker_id=self.worker_id, scheduler_id=self.scheduler_id)
            except ProtocolError as exc:
                log.warning("worker.deregister_failed", worker_id=self.worker_id, error=str(exc))
        await self._close()

    # ---- socket ----------------------------------------------------------------------------------

    def _open(self) -> None:
        sock = MessageSocket.connect(self.ctx, zmq.DEALER, self.endpoint, WorkerSchedulerReplies,
                                     identity=self.worker_id.encode(), hwm=DEALER_HWM, name="scheduler-link",
                                     server_role="scheduler")
        # Queue nothing for a scheduler that is not connected: a restarted scheduler must not get
        # a burst of stale reports before the new registration.
        sock.raw.setsockopt(zmq.IMMEDIATE, 1)
        self._sock = sock
        self._requester = Requester(sock, on_message=self._on_message).start()

    async def _close(self) -> None:
        if self._requester is not None:
            await self._requester.close()
            self._requester = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _reopen(self) -> None:
        await self._close()
        self._open()

    def _on_message(self, rec: Received) -> None:
        """Unsolicited messages: late replies, ErrorReplies to one-way reports and heartbeats."""
        msg = rec.msg
        self._last_heard = time.monotonic()
        if isinstance(msg, ErrorReply):
            if msg.code == ErrorCode.NOT_FOUND:
                self.reregister(f"scheduler does not know this worker: {msg.message}")
            else:
                log.warning("worker.scheduler_error", code=msg.code, message=msg.message)
        elif isinstance(msg, RegisterReply) and msg.scheduler_id != self.scheduler_id:
            self.reregister(f"a register reply from scheduler {msg.scheduler_id}")
        elif isinstance(msg, ResyncKvEvents):
            self._on_resync(f"scheduler {msg.scheduler_id} asked: {msg.reason}")

    async def send(self, msg: object) -> bool:
        """Send a one-way message (e.g. MigrationResult); False when it could not leave."""
        return await self._send(msg)

    async def _send(self, msg: object) -> bool:
        """Send a one-way message; False when it could not leave (no scheduler, socket reopening)."""
        requester = self._requester
        if requester is None:
            return False
        try:
            await requester.send(msg, timeout_s=SEND_TIMEOUT_S)  # type: ignore[arg-type]
            return True
        except (ProtocolError, zmq.ZMQError) as exc:
            log.debug("worker.scheduler_send_failed", type=type(msg).__name__, error=str(exc))
            return False

    # ---- loops -----------------------------------------------------------------------------------

    async def _register_loop(self) -> None:
        while not self._closing:
            await self._need_register.wait()
            if self.registrations:
                await self._reopen()
            backoff = REGISTER_BACKOFF_S[0]
            attempts = 0
            reply: RegisterReply | None = None
            while not self._closing:
                attempts += 1
                reply = await self._try_register(timeout_s=min(1.0, max(0.25, backoff * 2)), attempt=attempts)
                if reply is not None:
                    break
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, REGISTER_BACKOFF_S[1])
            if reply is None:
                return
            self.scheduler_id = reply.scheduler_id
            self.heartbeat_interval_s = reply.heartbeat_interval_ms / 1000.0
            self.report_interval_s = reply.report_interval_ms / 1000.0
            self.heartbeat_timeout_s = max(self.heartbeat_timeout_s, 3 * self.heartbeat_interval_s)
            self._last_heard = time.monotonic()
            self.registrations += 1
            self._on_resync(f"registered with scheduler {reply.scheduler_id}")  # it knows none of our cache
            self._need_register.clear()
            self.registered.set()
            self._dirty.set()
            log.info("worker.registered", worker_id=self.worker_id, scheduler_id=reply.scheduler_id,
                     attempts=attempts, registrations=self.registrations,
                     heartbeat_interval_ms=reply.heartbeat_interval_ms, report_interval_ms=reply.report_interval_ms)

    async def _try_register(self, timeout_s: float, attempt: int) -> RegisterReply | None:
        requester = self._requester
        if requester is None:
            return None
        try:
            reply = await requester.request(self._make_register(), timeout_s)
        except (ProtocolError, zmq.ZMQError) as exc:
            if attempt == 1 or attempt % 10 == 0:
                log.info("worker.register_retry", worker_id=self.worker_id, endpoint=self.endpoint,
                         attempt=attempt, error=str(exc))
            return None
        if not isinstance(reply, RegisterReply):
            log.warning("worker.register_unexpected_reply", type=type(reply).__name__)
            return None
        if not reply.accepted:
            log.warning("worker.register_refused", worker_id=self.worker_id, reason=reply.reason, attempt=attempt)
            return None
        return reply

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.heartbeat_interval_s)
            if not self.registered.is_set():
                continue
            self.heartbeat_seq += 1
            await self._send(Heartbeat(sender_id=self.worker_id, role="worker", seq=self.heartbeat_seq,
                                       sent_ms=now_ms()))
            await self._ping()
            if self.registered.is_set() and time.monotonic() - self._last_heard > self.heartbeat_timeout_s:
                self.reregister(f"nothing heard from the scheduler for {self.heartbeat_timeout_s:.1f} s")

    async def _ping(self) -> None:
        requester = self._requester
        if requester is None:
            return
        try:
            pong = await requester.request(Ping(sender_id=self.worker_id),
                                                 timeout_s=min(self.heartbeat_interval_s, self.heartbeat_timeout_s))
        except RemoteError as exc:
            self._last_heard = time.monotonic()
            if exc.code == ErrorCode.NOT_FOUND:
                self.reregister(f"scheduler does not know this worker: {exc.message}")
            return
        except (RequestTimeout, ProtocolError, zmq.ZMQError):
            return
        self._last_heard = time.monotonic()
        if isinstance(pong, Pong) and self.scheduler_id is not None and pong.sender_id != self.scheduler_id:
            self.reregister(f"scheduler id changed to {pong.sender_id}")

    async def _report_loop(self) -> None:
        while not self._closing:
            await _wait_event(self._dirty, self.heartbeat_interval_s)
            wait = self._last_report + self.report_interval_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._dirty.clear()  # the report below covers every change so far
            if not self.registered.is_set():
                continue
            self.report_seq += 1
            try:
                messages = await self._make_report(self.report_seq)
            except Exception as exc:  # noqa: BLE001 - e.g. the engine thread is busy; try again next time
                log.warning("worker.report_failed", worker_id=self.worker_id, error=f"{type(exc).__name__}: {exc}")
                continue
            self._last_report = time.monotonic()
            for i, msg in enumerate(messages):
                if not await self._send(msg):
                    if any(isinstance(m, KvEvents) for m in messages[i:]):
                        self._on_resync("KV events could not be sent")
                    break  # the scheduler is away: the rest would not leave either


async def _wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until `event` is set or `timeout_s` passed (without asyncio.wait_for, whose 3.11
    version can swallow a cancellation that races with the event)."""
    if event.is_set():
        return
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
