"""The frontend's connections to workers: one DEALER (with a Requester) per worker control
address, opened on first use, and the AbortRequests sent over them."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import zmq
import zmq.asyncio

from protocol.common import Ack, ErrorReply, Pong
from protocol.errors import ProtocolError
from protocol.sockets import MessageSocket, Requester
from protocol.to_worker import AbortRequest
from services.log import get_logger

log = get_logger("kvferry.frontend.router")


class WorkerLinks:
    """The connection pool to workers, by control address."""

    def __init__(self, ctx: zmq.asyncio.Context, abort_timeout_s: float,
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.ctx = ctx
        self.abort_timeout_s = abort_timeout_s
        self._spawn = spawn
        self._requesters: dict[str, Requester] = {}

    def get(self, address: str) -> Requester:
        r = self._requesters.get(address)
        if r is None:
            sock = MessageSocket.connect(self.ctx, zmq.DEALER, address, (Ack, Pong, ErrorReply),
                                         name=f"frontend-worker-{address}", server_role="worker")
            r = self._requesters[address] = Requester(sock).start()
        return r

    def drop(self, address: str) -> None:
        """Close the connection to a lost worker: pending adds and pings to it fail now, not at
        their timeout (a later `get` opens a fresh one)."""
        r = self._requesters.pop(address, None)
        if r is not None:
            self._spawn(_close(r))

    async def send_abort(self, request_id: str, address: str, reason: str, quiet: bool = False) -> None:
        """`quiet`: a precaution (the worker is most likely dead), so no answer is no news."""
        try:
            await self.get(address).request(AbortRequest(request_id=request_id, reason=reason[:200]),
                                            timeout_s=self.abort_timeout_s)
            log.info("request.aborted", request_id=request_id, worker_address=address, reason=reason)
        except (ProtocolError, zmq.ZMQError) as exc:
            (log.debug if quiet else log.warning)("request.abort_failed", request_id=request_id,
                                                  worker_address=address, error=str(exc))

    async def close(self) -> None:
        requesters, self._requesters = list(self._requesters.values()), {}
        for r in requesters:
            await _close(r)


async def _close(r: Requester) -> None:
    await r.close()
    r.sock.close()
