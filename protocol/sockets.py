"""Typed asyncio wrappers over pyzmq sockets.

A message on the wire is one multipart ZeroMQ message: `[envelope, *data frames]` (ROUTER
sockets add the peer's routing id in front, as ZeroMQ does; DEALER clients send no empty
delimiter frame). Receiving sockets set ZMQ_MAXMSGSIZE, so ZeroMQ itself drops a peer that sends
an oversized frame (it closes that connection; the socket keeps serving the others), and every
socket has LINGER 0, so closing never hangs on unsent messages to a dead peer.

Typical use:

    ctx = zmq.asyncio.Context.instance()
    server = MessageSocket.bind(ctx, zmq.ROUTER, addrs.scheduler_bind(), SchedulerInbound)
    await serve(server, handler)          # handler(received) -> reply message or None

    client = MessageSocket.connect(ctx, zmq.DEALER, addrs.scheduler(), SchedulerReplies)
    reply = await request(client, DispatchRequest(...), timeout_s=1.0)

For many concurrent requests on one DEALER, use `Requester` (one reader task, replies matched to
requests by `reply_to`).
"""

from __future__ import annotations

import asyncio
from collections import deque
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from protocol.base import Message, RequestMessage, deadline_in, expired
from protocol.codec import Allowed, decode, encode
from protocol.common import ErrorCode, ErrorReply, error_reply
from protocol.errors import MalformedMessage, MessageTooLarge, ProtocolError, RemoteError, RequestTimeout
from protocol.fields import DEFAULT_MAX_MESSAGE_BYTES, MAX_TENSORS
from protocol.security import secure

log = logging.getLogger("kvferry.protocol")

MAX_INVALID_LOGS_PER_S = 20  # a flood of garbage must not turn into a flood of log lines


@dataclass(slots=True)
class Received:
    """One incoming message: `msg` (decoded), its data `frames` (zmq.Frame or bytes), and for
    ROUTER sockets the sender's routing id `peer` (pass it back to reply)."""

    msg: Any
    frames: list[Any] = field(default_factory=list)
    peer: bytes | None = None

    def tensors(self) -> list[Any]:
        """The tensors `msg.tensors` describes, as views of `frames` (see protocol.frames).
        Raises MalformedMessage when the frames do not match the header."""
        from protocol.frames import tensors_from_frames  # torch only where tensors travel

        return tensors_from_frames(self.msg, self.frames, max_frame_bytes=1 << 62)  # sizes checked on receipt


class _LogLimiter:
    """At most `rate` warnings per second; counts what it suppressed."""

    def __init__(self, rate: int) -> None:
        self.rate, self.window, self.count, self.suppressed = rate, 0.0, 0, 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self.window >= 1.0:
            if self.suppressed:
                log.warning("suppressed %d invalid-message log lines", self.suppressed)
            self.window, self.count, self.suppressed = now, 0, 0
        self.count += 1
        if self.count > self.rate:
            self.suppressed += 1
            return False
        return True


def configure_socket(sock: zmq.Socket, *, max_msg_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
                     identity: bytes | None = None, hwm: int | None = None,
                     heartbeat_ms: tuple[int, int] | None = None) -> None:
    """Options every kvferry socket gets: LINGER 0, MAXMSGSIZE (per frame) when receiving, and
    ROUTER_HANDOVER so a restarted peer reusing its identity takes over its old connection.
    `heartbeat_ms` (interval, timeout): ZMTP heartbeats, so a peer that stops answering (frozen,
    or the network cut) drops the connection (a monitor sees EVENT_DISCONNECTED) instead of
    leaving it open forever."""
    sock.setsockopt(zmq.LINGER, 0)
    if heartbeat_ms is not None:
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms[0])
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms[1])
    if max_msg_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    if sock.type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)


class MessageSocket:
    """A zmq.asyncio socket that sends and receives typed messages.

    `allowed`: the message types `recv` accepts (a Union such as SchedulerInbound, a tuple, or a
    class). `max_bytes` bounds the envelope frame; `max_frame_bytes` (default: max_bytes) bounds
    each data frame and is what ZMQ_MAXMSGSIZE is set to. `zero_copy` receives frames without
    copying (use on sockets that carry tensor frames).
    """

    def __init__(self, sock: zmq.asyncio.Socket, allowed: Allowed = None, *,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_frame_bytes: int | None = None,
                 zero_copy: bool = False, name: str = "") -> None:
        self.raw = sock
        self.allowed = allowed
        self.max_bytes = max_bytes
        self.max_frame_bytes = max_frame_bytes if max_frame_bytes is not None else max_bytes
        self.zero_copy = zero_copy
        self.name = name or zmq.SocketType(sock.type).name
        self.is_router = sock.type == zmq.ROUTER
        self._limiter = _LogLimiter(MAX_INVALID_LOGS_PER_S)

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def open(cls, ctx: zmq.asyncio.Context, socket_type: int, allowed: Allowed = None, *,
             bind: str | None = None, connect: str | Sequence[str] | None = None,
             identity: bytes | None = None, hwm: int | None = None,
             max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_frame_bytes: int | None = None,
             zero_copy: bool = False, name: str = "", server_role: str | None = None,
             heartbeat_ms: tuple[int, int] | None = None) -> "MessageSocket":
        """Create, configure (see `configure_socket`), and bind and/or connect a socket.
        `identity` sets a DEALER's routing id (e.g. the worker id, so a ROUTER can address it).
        With Curve on (keys on `ctx`, protocol.security) a binding socket is a Curve server and a
        connecting one a client of a `server_role` server ("scheduler", "frontend", "worker")."""
        sock = ctx.socket(socket_type)
        try:
            receives = socket_type not in (zmq.PUSH, zmq.PUB)
            max_frame = max_frame_bytes or max_bytes
            configure_socket(sock, max_msg_bytes=max(max_bytes, max_frame) if receives else None,
                             identity=identity, hwm=hwm, heartbeat_ms=heartbeat_ms)
            secure(sock, server=bind is not None, server_role=server_role)
            if bind is not None:
                sock.bind(bind)
            for ep in [connect] if isinstance(connect, str) else (connect or []):
                sock.connect(ep)
        except BaseException:
            sock.close(linger=0)
            raise
        return cls(sock, allowed, max_bytes=max_bytes, max_frame_bytes=max_frame_bytes, zero_copy=zero_copy,
                   name=name)

    @classmethod
    def bind(cls, ctx: zmq.asyncio.Context, socket_type: int, endpoint: str, allowed: Allowed = None,
             **kw: Any) -> "MessageSocket":
        return cls.open(ctx, socket_type, allowed, bind=endpoint, **kw)

    @classmethod
    def connect(cls, ctx: zmq.asyncio.Context, socket_type: int, endpoint: str | Sequence[str],
                allowed: Allowed = None, **kw: Any) -> "MessageSocket":
        return cls.open(ctx, socket_type, allowed, connect=endpoint, **kw)

    @property
    def last_endpoint(self) -> str:
        """The endpoint actually bound (useful after binding to port 0 or `*`)."""
        return self.raw.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        self.raw.close(linger=0)

    # ---- sending ---------------------------------------------------------------------------------

    async def send(self, msg: Message, *, frames: Sequence[Any] = (), peer: bytes | None = None,
                   timeout_s: float | None = None, track: bool = False) -> zmq.MessageTracker | None:
        """Send `msg` followed by data `frames` (sent without copies). ROUTER sockets need `peer`.

        On DEALER/PUSH sockets a send waits while no peer is connected or the queue is full:
        `timeout_s` bounds that wait (RequestTimeout). `track=True` returns a MessageTracker that
        tells when ZeroMQ no longer needs the frames' memory.
        """
        parts: list[Any] = [encode(msg, max_bytes=self.max_bytes), *frames]
        if self.is_router:
            if peer is None:
                raise ValueError("a ROUTER socket needs the peer's routing id to send")
            parts.insert(0, peer)
        sending = self.raw.send_multipart(parts, copy=not frames, track=track)
        # pyzmq completes a send that ZeroMQ queued at once: only a blocked one needs a deadline
        # (a timer per message, on the token path, otherwise).
        if timeout_s is None or sending.done():
            return await sending
        try:
            async with asyncio.timeout(timeout_s):
                return await sending
        except TimeoutError:
            raise RequestTimeout(f"{self.name}: could not send {type(msg).__name__} within {timeout_s} s") from None

    def send_nowait(self, msg: Message, *, peer: bytes | None = None) -> None:
        """Queue `msg` now, in call order, without awaiting: for a ROUTER, whose sends never block
        (ZeroMQ drops messages to a peer past its high-water mark). Encoding errors raise here; a
        failed send is logged."""
        if not self.is_router or peer is None:
            raise ValueError("send_nowait is for ROUTER sockets, with the peer's routing id")
        sending = self.raw.send_multipart([peer, encode(msg, max_bytes=self.max_bytes)])
        if not sending.done():
            sending.add_done_callback(self._log_failed_send)
        elif sending.exception() is not None:
            self._log_failed_send(sending)

    def _log_failed_send(self, fut: "asyncio.Future[Any]") -> None:
        if not fut.cancelled() and (exc := fut.exception()) is not None and self._limiter.allow():
            log.warning("%s: a send failed: %s: %s", self.name, type(exc).__name__, exc)

    async def send_tensors(self, header: Message, tensors: Sequence[Any], *, peer: bytes | None = None,
                           timeout_s: float | None = None, track: bool = False) -> zmq.MessageTracker | None:
        """Send `header` (its `tensors` field filled in) and each tensor as a data frame, without
        copying contiguous CPU tensors: do not modify them until sent (`track=True`)."""
        from protocol.frames import tensor_buffer, with_tensor_specs

        header = with_tensor_specs(header, tensors)
        return await self.send(header, frames=[tensor_buffer(t) for t in tensors], peer=peer,
                               timeout_s=timeout_s, track=track)

    async def reply(self, to: Received, msg: Message, *, frames: Sequence[Any] = ()) -> None:
        """Send `msg` back to the sender of `to` (ROUTER: to its peer id)."""
        await self.send(msg, frames=frames, peer=to.peer)

    async def send_error(self, exc: BaseException, *, peer: bytes | None = None, reply_to: str | None = None) -> None:
        """Answer with an ErrorReply for `exc` (peer and reply_to default to what the error knows)."""
        if isinstance(exc, ProtocolError):
            peer = peer if peer is not None else exc.peer
        if self.is_router and peer is None:
            return  # nobody to answer
        try:
            await self.send(error_reply(exc, reply_to), peer=peer, timeout_s=1.0)
        except ProtocolError as send_exc:
            log.warning("%s: could not send error reply: %s", self.name, send_exc)

    # ---- receiving -------------------------------------------------------------------------------

    async def recv(self) -> Received:
        """The next valid message. Invalid input is logged (one line) and raised as a ProtocolError
        with `peer` (and `reply_to` when readable) set, so the caller can answer with
        `send_error(exc)` and keep receiving."""
        return self._check(await self.raw.recv_multipart(copy=not self.zero_copy))

    async def recv_queued(self, limit: int) -> list[Received | ProtocolError]:
        """Up to `limit` messages already queued, taken without waiting (each a Received, or the
        ProtocolError its frames raised)."""
        out: list[Received | ProtocolError] = []
        while len(out) < limit:
            try:
                # NOBLOCK completes the future at once: no trip through the event loop.
                parts = await self.raw.recv_multipart(flags=zmq.NOBLOCK, copy=not self.zero_copy)
            except zmq.Again:
                break
            try:
                out.append(self._check(parts))
            except ProtocolError as exc:
                out.append(exc)
        return out

    def _check(self, parts: list[Any]) -> Received:
        peer = None
        if self.is_router:
            peer = _to_bytes(parts[0])
            parts = parts[1:]
        try:
            return self._parse(parts, peer)
        except ProtocolError as exc:
            exc.peer = peer
            if self._limiter.allow():
                log.warning("%s: invalid message from %s: %s: %s", self.name, peer.hex() if peer else "peer",
                            type(exc).__name__, exc.message, extra={"error_type": type(exc).__name__})
            raise

    def _parse(self, parts: list[Any], peer: bytes | None) -> Received:
        if not parts:
            raise MalformedMessage("empty multipart message")
        if len(parts) > MAX_TENSORS + 1:
            raise MalformedMessage(f"{len(parts) - 1} data frames exceed the limit of {MAX_TENSORS}")
        envelope = parts[0].buffer if isinstance(parts[0], zmq.Frame) else parts[0]
        msg = decode(envelope, self.allowed, self.max_bytes)
        frames = parts[1:]
        if frames and not hasattr(msg, "tensors"):
            raise MalformedMessage(f"{type(msg).__name__} carries no data frames, got {len(frames)}",
                                   reply_to=getattr(msg, "msg_id", None))
        for f in frames:
            n = len(f.buffer) if isinstance(f, zmq.Frame) else len(f)
            if n > self.max_frame_bytes:
                raise MessageTooLarge(n, self.max_frame_bytes, reply_to=getattr(msg, "msg_id", None))
        return Received(msg, list(frames), peer)


def _to_bytes(part: Any) -> bytes:
    return part.bytes if isinstance(part, zmq.Frame) else part


# ---- request / reply -----------------------------------------------------------------------------

def _with_deadline(msg: RequestMessage, timeout_s: float) -> RequestMessage:
    # The responder should not work past the moment the requester gives up.
    deadline = deadline_in(timeout_s)
    if msg.deadline_ms > deadline:
        msg = msgspec.structs.replace(msg, deadline_ms=deadline)
    return msg


def _result(reply: Any, raise_errors: bool) -> Any:
    if raise_errors and isinstance(reply, ErrorReply):
        raise RemoteError(reply.code, reply.message, reply_to=reply.reply_to)
    return reply


async def request(sock: "MessageSocket | Requester", msg: RequestMessage, timeout_s: float, *,
                  frames: Sequence[Any] = (), raise_errors: bool = True) -> Any:
    """Send `msg` and wait at most `timeout_s` for the reply whose `reply_to` is `msg.msg_id`.

    On a plain MessageSocket (DEALER) this reads the socket itself and drops (logs) other
    messages: use it when this is the socket's only reader. On a Requester it is concurrency-safe.
    An ErrorReply raises RemoteError (unless `raise_errors=False`); no reply raises RequestTimeout.
    The message's deadline is lowered to now + timeout_s if it was later.
    """
    if isinstance(sock, Requester):
        return await sock.request(msg, timeout_s, frames=frames, raise_errors=raise_errors)
    msg = _with_deadline(msg, timeout_s)

    async def exchange() -> Any:
        await sock.send(msg, frames=frames)
        while True:
            try:
                rec = await sock.recv()
            except ProtocolError:
                continue  # logged by recv; the real reply may still come
            if getattr(rec.msg, "reply_to", None) == msg.msg_id:
                return rec.msg
            log.debug("%s: dropped %s while waiting for the reply to %s", sock.name, type(rec.msg).__name__, msg.msg_id)

    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: in 3.11 it can swallow a cancellation
            reply = await exchange()
    except TimeoutError:
        raise RequestTimeout(f"no reply to {type(msg).__name__} {msg.msg_id} within {timeout_s} s",
                             reply_to=msg.msg_id) from None
    return _result(reply, raise_errors)


async def request_once(endpoint: str, msg: RequestMessage, replies: Allowed, timeout_s: float, *,
                       raise_errors: bool = True) -> Any:
    """`request` over a DEALER opened to `endpoint` for this one message, then closed (tools,
    benchmarks and tests asking a service one question)."""
    ctx = zmq.asyncio.Context()
    sock = MessageSocket.connect(ctx, zmq.DEALER, endpoint, replies)
    try:
        return await request(sock, msg, timeout_s, raise_errors=raise_errors)
    finally:
        sock.close()
        ctx.destroy(linger=0)


class Requester:
    """Concurrent request/reply over one DEALER socket.

    A reader task resolves each pending request by `reply_to`; anything else (one-way messages,
    late replies, commands pushed by a ROUTER peer) goes to `on_message` if given, else is logged
    and dropped. Use as `async with Requester(sock) as r: reply = await r.request(msg, 1.0)`.
    """

    def __init__(self, sock: MessageSocket,
                 on_message: Callable[[Received], Awaitable[None] | None] | None = None) -> None:
        self.sock = sock
        self.on_message = on_message
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> "Requester":
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(), name=f"requester-{self.sock.name}")
        return self

    async def close(self) -> None:
        """Stop the reader and fail pending requests; the socket stays open (close it yourself)."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RequestTimeout("requester closed"))
        self._pending.clear()

    async def __aenter__(self) -> "Requester":
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, msg: Message, *, frames: Sequence[Any] = (), timeout_s: float | None = None) -> None:
        """Send a one-way message."""
        await self.sock.send(msg, frames=frames, timeout_s=timeout_s)

    async def request(self, msg: RequestMessage, timeout_s: float, *, frames: Sequence[Any] = (),
                      raise_errors: bool = True) -> Any:
        """Like `request()`, safe to call from many tasks at once."""
        self.start()
        msg = _with_deadline(msg, timeout_s)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg.msg_id] = fut
        try:
            async def exchange() -> Any:
                await self.sock.send(msg, frames=frames)
                return await fut

            # Not wait_for: in 3.11 a cancellation that meets the reply is swallowed, and a loop
            # that awaits requests (a pinger) then never stops.
            async with asyncio.timeout(timeout_s):
                reply = await exchange()
        except TimeoutError:
            raise RequestTimeout(f"no reply to {type(msg).__name__} {msg.msg_id} within {timeout_s} s",
                                 reply_to=msg.msg_id) from None
        finally:
            self._pending.pop(msg.msg_id, None)
        return _result(reply, raise_errors)

    async def _read(self) -> None:
        while True:
            try:
                rec = await self.sock.recv()
            except ProtocolError:
                continue  # logged by recv
            fut = self._pending.get(getattr(rec.msg, "reply_to", None) or "")
            if fut is not None:
                if not fut.done():
                    fut.set_result(rec.msg)
            elif self.on_message is not None:
                try:
                    result = self.on_message(rec)
                    if result is not None:
                        await result
                except Exception:  # noqa: BLE001 - a handler bug must not kill the reader
                    log.exception("%s: on_message handler failed", self.sock.name)
            else:
                log.debug("%s: dropped unsolicited %s", self.sock.name, type(rec.msg).__name__)


# ---- serving -------------------------------------------------------------------------------------

Handler = Callable[[Received], Awaitable[Message | None]]
InvalidHandler = Callable[[ProtocolError], Message | None]


async def serve(sock: MessageSocket, handler: Handler, *, reject_expired: bool = True,
                first: tuple[type, ...] = (), batch: int = 256, on_invalid: InvalidHandler | None = None) -> None:
    """Receive forever, calling `handler` for each valid message; its return value (if any) is
    sent back to the sender. Invalid input, handler exceptions and expired requests become an
    ErrorReply to the sender (ROUTER sockets; other socket types only log). Never returns unless
    cancelled. Handlers run one at a time: start a task inside for long work.

    Each wake-up takes every message already queued (up to `batch`); those whose type is in
    `first` are handled before the rest, so latency-critical requests do not wait behind a burst
    of bulk traffic (the scheduler's dispatches behind load reports).

    `on_invalid(error)` sees each invalid message's ProtocolError (with `peer`, and `msg_type` when
    the type was known) after the ErrorReply; a message it returns goes to that peer too."""
    can_reply = sock.is_router or sock.raw.type in (zmq.DEALER, zmq.PAIR)
    while True:
        try:
            items: list[Received | ProtocolError] = [await sock.recv()]
        except ProtocolError as exc:
            items = [exc]
        items.extend(await sock.recv_queued(batch - 1))
        if not first:
            for item in items:
                await _serve_one(sock, handler, item, reject_expired, can_reply, on_invalid)
            continue
        pending = deque(_urgent_first(items, first))
        while pending:
            await _serve_one(sock, handler, pending.popleft(), reject_expired, can_reply, on_invalid)
            if pending and sock.raw.get(zmq.EVENTS) & zmq.POLLIN:
                # Something arrived while we worked through the batch: an urgent one jumps ahead.
                pending = deque(_urgent_first([*pending, *await sock.recv_queued(batch)], first))


def _urgent_first(items: list[Received | ProtocolError], first: tuple[type, ...]) -> list[Received | ProtocolError]:
    return sorted(items, key=lambda it: not (isinstance(it, Received) and isinstance(it.msg, first)))


async def _serve_one(sock: MessageSocket, handler: Handler, item: Received | ProtocolError,
                     reject_expired: bool, can_reply: bool, on_invalid: InvalidHandler | None = None) -> None:
    if isinstance(item, ProtocolError):
        if sock.is_router:
            await sock.send_error(item)
        if on_invalid is not None:
            try:
                extra = on_invalid(item)
                if extra is not None and sock.is_router and item.peer is not None:
                    await sock.send(extra, peer=item.peer, timeout_s=1.0)
            except ProtocolError as exc:
                log.warning("%s: could not answer an invalid message: %s", sock.name, exc)
            except Exception:  # noqa: BLE001 - the loop keeps serving
                log.exception("%s: on_invalid failed", sock.name)
        return
    rec = item
    msg_id = getattr(rec.msg, "msg_id", None)
    if reject_expired and expired(rec.msg):
        log.info("%s: %s %s arrived past its deadline", sock.name, type(rec.msg).__name__, msg_id)
        if can_reply:
            await sock.send(ErrorReply(reply_to=msg_id, code=ErrorCode.EXPIRED, message="deadline passed"),
                            peer=rec.peer, timeout_s=1.0)
        return
    try:
        reply = await handler(rec)
    except ProtocolError as exc:
        reply = error_reply(exc, msg_id)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the loop keeps serving; the sender learns of it
        log.exception("%s: handler failed on %s", sock.name, type(rec.msg).__name__)
        reply = error_reply(exc, msg_id) if isinstance(rec.msg, RequestMessage) else None
    if reply is not None and can_reply:
        try:
            await sock.send(reply, peer=rec.peer, timeout_s=1.0)
        except ProtocolError as exc:
            log.warning("%s: could not send %s: %s", sock.name, type(reply).__name__, exc)
