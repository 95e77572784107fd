"""The scheduler's command channels: one DEALER per worker, connected to its control endpoint.

The worker's control ROUTER accepts Ping (→ Pong), Drain, MigrateCommand, CancelMigration and
Shutdown (protocol.to_worker.WorkerControlInbound). Over this channel the scheduler sends its own
heartbeat, a `Ping(sender_id=<scheduler_id>)` every heartbeat interval, so a worker can tell the
scheduler is alive, forwards drain commands, and sends migration commands (`ask`). Every send
and wait is bounded; a worker that is not reachable only costs timeouts (ZMQ_IMMEDIATE: nothing
queues up for an absent peer).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from protocol import Ack, Drain, ErrorReply, Ping, Pong
from protocol.base import Message, RequestMessage
from protocol.errors import ProtocolError
from protocol.security import secure
from protocol.sockets import MessageSocket, Requester, configure_socket
from services.log import get_logger

log = get_logger("kvferry.scheduler.commands")

CommandReplies = (Ack, Pong, ErrorReply)
"""What the scheduler's command DEALERs accept back from workers."""


@dataclass
class _Channel:
    endpoint: str
    sock: MessageSocket
    requester: Requester
    pinger: asyncio.Task[None] | None = None


class CommandChannels:
    """DEALERs to workers' control endpoints, keyed by worker id, each with a Ping heartbeat task.

    `on_pong(worker_id)` is called for each Pong (the registry records it for status).
    """

    def __init__(self, ctx: zmq.asyncio.Context, scheduler_id: str, heartbeat_interval_s: float,
                 on_pong: Callable[[str], None] | None = None) -> None:
        self.ctx = ctx
        self.scheduler_id = scheduler_id
        self.interval_s = heartbeat_interval_s
        self.on_pong = on_pong
        self._channels: dict[str, _Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def open(self, worker_id: str, endpoint: str) -> None:
        """Connect to `endpoint` (reusing an open channel to the same endpoint) and start pinging."""
        ch = self._channels.get(worker_id)
        if ch is not None:
            if ch.endpoint == endpoint:
                return
            self._close_channel(worker_id)
        raw = self.ctx.socket(zmq.DEALER)
        try:
            configure_socket(raw, identity=f"{self.scheduler_id}".encode(), hwm=64)
            secure(raw, server=False, server_role="worker")
            raw.setsockopt(zmq.IMMEDIATE, 1)
            raw.connect(endpoint)
        except BaseException:
            raw.close(linger=0)
            raise
        sock = MessageSocket(raw, CommandReplies, name=f"cmd-{worker_id}")
        ch = _Channel(endpoint, sock, Requester(sock).start())
        ch.pinger = asyncio.get_running_loop().create_task(self._ping_loop(worker_id, ch), name=f"ping-{worker_id}")
        self._channels[worker_id] = ch

    def close(self, worker_id: str) -> None:
        self._close_channel(worker_id)

    async def aclose(self) -> None:
        """Stop every pinger and forward, close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for t in list(self._tasks):
            t.cancel()
        for ch in channels:
            if ch.pinger is not None:
                ch.pinger.cancel()
        await asyncio.gather(*self._tasks, *(ch.pinger for ch in channels if ch.pinger), return_exceptions=True)
        for ch in channels:
            await ch.requester.close()
            ch.sock.close()

    def send_drain(self, worker_id: str, draining: bool, timeout_s: float = 2.0) -> None:
        """Forward Drain(draining) in the background; the outcome is logged."""
        ch = self._channels.get(worker_id)
        if ch is None:
            log.warning("worker.drain_not_forwarded", worker_id=worker_id, reason="no command channel")
            return

        async def forward() -> None:
            try:
                reply = await ch.requester.request(Drain(draining=draining), timeout_s, raise_errors=False)
                log.info("worker.drain_forwarded", worker_id=worker_id, draining=draining,
                         reply=type(reply).__name__, ok=getattr(reply, "ok", None),
                         detail=getattr(reply, "message", getattr(reply, "detail", "")))
            except ProtocolError as exc:
                log.warning("worker.drain_not_forwarded", worker_id=worker_id, draining=draining, reason=str(exc))

        task = asyncio.get_running_loop().create_task(forward())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ask(self, worker_id: str, msg: RequestMessage, timeout_s: float) -> Message:
        """Send `msg` to the worker and return its reply (an ErrorReply is returned, not raised).
        Raises RequestTimeout when it does not answer within `timeout_s`, KeyError without a channel."""
        ch = self._channels.get(worker_id)
        if ch is None:
            raise KeyError(worker_id)
        return await ch.requester.request(msg, timeout_s, raise_errors=False)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str = "") -> asyncio.Task[None]:
        """Run `coro` in the background; `aclose` cancels it. Exceptions are logged, not raised."""
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one failed command must not go unnoticed, nor kill anything
                log.exception("command.task_failed", task=name)

        task = asyncio.get_running_loop().create_task(guarded(), name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._channels

    # ---- internals -----------------------------------------------------------------------------

    async def _ping_loop(self, worker_id: str, ch: _Channel) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            try:
                reply = await ch.requester.request(Ping(sender_id=self.scheduler_id), self.interval_s,
                                                   raise_errors=False)
                if isinstance(reply, Pong) and self.on_pong is not None:
                    self.on_pong(worker_id)
            except ProtocolError:
                pass  # no answer within the interval: the worker's own heartbeats decide liveness
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - start)))

    def _close_channel(self, worker_id: str) -> None:
        ch = self._channels.pop(worker_id, None)
        if ch is None:
            return
        if ch.pinger is not None:
            ch.pinger.cancel()

        async def finish() -> None:
            if ch.pinger is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await ch.pinger
            await ch.requester.close()
            ch.sock.close()

        task = asyncio.get_running_loop().create_task(finish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

