"""Token streaming: engine outputs → one TokenBatches message per frontend per engine step.

`RouteTable` remembers, per live request, where its tokens go (the frontend's token endpoint) and
the offset of its output indices (AddRequest.first_index, non-zero for resumed requests).
`TokenStreamer` turns one step's RequestOutputs into TokenBatches, one per frontend, and pushes
them on a PUSH socket per frontend endpoint (connected lazily, cached). Sends never block the
event loop: when a frontend's queue is full the message is dropped with a log line (the frontend
sees a gap and treats it as an error).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import zmq

from engine.request import FinishReason, RequestOutput
from protocol.codec import encode
from protocol.errors import ProtocolError
from protocol.fields import MAX_BATCHES_PER_MESSAGE
from protocol.security import CurveKeys, secure, use_curve
from protocol.base import Message
from protocol.to_frontend import RequestMoved, TokenBatch, TokenBatches
from services.log import get_logger

log = get_logger(__name__)

PUSH_SNDHWM = 10_000  # messages queued per frontend before sends are dropped
MAX_PUSH_SOCKETS = 256  # distinct frontend endpoints kept open (least recently used closed first)


@dataclass(slots=True)
class Route:
    """Where one request's tokens go."""

    request_id: str
    frontend_id: str
    reply_address: str
    index_offset: int = 0  # AddRequest.first_index: tokens the frontend already holds
    tokens_sent: int = 0  # the engine's output index of the next token (tokens it produced so far)
    # A migrated-in request: the RequestMoved (this worker's control endpoint) to send before its
    # first tokens, so the frontend's aborts follow the request.
    announce: str | None = None
    frontend_incarnation: str = ""  # the start of the frontend that added it ("" unknown)


class RouteTable:
    """Live requests of this worker and their routes. A request is forgotten when it finishes."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def add(self, route: Route) -> None:
        self._routes[route.request_id] = route

    def get(self, request_id: str) -> Route | None:
        return self._routes.get(request_id)

    def pop(self, request_id: str) -> Route | None:
        return self._routes.pop(request_id, None)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._routes

    def __len__(self) -> int:
        return len(self._routes)

    def ids(self) -> list[str]:
        return list(self._routes)

    def by_frontend(self, frontend_id: str) -> list[str]:
        return [r.request_id for r in self._routes.values() if r.frontend_id == frontend_id]

    def of_earlier_frontend(self, frontend_id: str, incarnation: str) -> list[str]:
        """Requests added by an earlier start of `frontend_id` than `incarnation` (incarnations sort
        by start time): nobody reads their tokens any more (the restarted frontend knows nothing of
        them). Routes of a sender that gave no incarnation ("") are never matched."""
        return [r.request_id for r in self._routes.values()
                if r.frontend_id == frontend_id and "" < r.frontend_incarnation < incarnation]


class TokenStreamer:
    """Sends each step's tokens to the requests' frontends (see the module docstring)."""

    def __init__(self, worker_id: str, routes: RouteTable, ctx: zmq.Context | None = None,
                 curve: CurveKeys | None = None) -> None:
        self.worker_id = worker_id
        self.routes = routes
        # A plain (not asyncio) context: PUSH sends use NOBLOCK and return at once.
        self._ctx = use_curve(ctx or zmq.Context(), curve)
        self._own_ctx = ctx is None
        self._sockets: dict[str, zmq.Socket] = {}
        self._last_used: dict[str, float] = {}
        self.sent_messages = 0
        self.dropped_messages = 0
        self._last_drop_log = 0.0

    # ---- outputs → batches -----------------------------------------------------------------------

    def publish(self, outputs: Iterable[RequestOutput]) -> list[str]:
        """Route one step's outputs; returns the ids of the requests that finished (now forgotten)."""
        per_frontend: dict[str, list[TokenBatch]] = {}
        finished: list[str] = []
        for out in outputs:
            route = self.routes.get(out.request_id)
            if route is None:
                log.warning("request.output_unrouted", request_id=out.request_id)
                continue
            if route.announce is not None:
                self.announce(route)
            batch = TokenBatch(
                request_id=out.request_id, first_index=route.index_offset + out.first_index,
                token_ids=list(out.new_token_ids),
                finish_reason=out.finish_reason.value if out.finish_reason is not None else None,
                error=out.error[:4096] if out.error else None, worker_id=self.worker_id,
                logprobs=out.logprobs, prompt_logprobs=out.prompt_logprobs,
            )
            route.tokens_sent += len(out.new_token_ids)
            per_frontend.setdefault(route.reply_address, []).append(batch)
            if out.finished:
                self.routes.pop(out.request_id)
                finished.append(out.request_id)
                log.info("request.finished", request_id=out.request_id, finish_reason=batch.finish_reason,
                         tokens=route.index_offset + out.first_index + len(out.new_token_ids),
                         error=out.error, frontend_id=route.frontend_id)
        for address, batches in per_frontend.items():
            # Prompt logprobs can be megabytes (a long prompt x 20 alternatives): one message each.
            for big in [b for b in batches if b.prompt_logprobs]:
                self._send(address, TokenBatches(worker_id=self.worker_id, batches=[big]))
            batches = [b for b in batches if not b.prompt_logprobs]
            for i in range(0, len(batches), MAX_BATCHES_PER_MESSAGE):
                self._send(address, TokenBatches(worker_id=self.worker_id,
                                                 batches=batches[i:i + MAX_BATCHES_PER_MESSAGE]))
        return finished

    def announce(self, route: Route, control_endpoint: str | None = None) -> None:
        """Tell the request's frontend that this worker owns it now (RequestMoved), once.

        With `control_endpoint` it is sent now regardless of `route.announce` (a source that
        takes a request back after an unanswered commit)."""
        endpoint = control_endpoint or route.announce
        route.announce = None
        if endpoint is None:
            return
        self._send(route.reply_address, RequestMoved(
            request_id=route.request_id, worker_id=self.worker_id, control_endpoint=endpoint,
            next_index=route.index_offset + route.tokens_sent))

    def fail(self, request_ids: Iterable[str], error: str) -> None:
        """End these requests' streams with an error batch (worker stopping, request lost)."""
        outs = []
        for rid in request_ids:
            route = self.routes.get(rid)
            if route is not None:
                outs.append(RequestOutput(rid, [], route.tokens_sent, finished=True,
                                          finish_reason=FinishReason.ERROR, error=error))
        self.publish(outs)

    # ---- sockets ---------------------------------------------------------------------------------

    def _socket(self, address: str) -> zmq.Socket:
        sock = self._sockets.get(address)
        if sock is None:
            if len(self._sockets) >= MAX_PUSH_SOCKETS:
                oldest = min(self._last_used, key=self._last_used.__getitem__)
                self._sockets.pop(oldest).close(linger=0)
                self._last_used.pop(oldest, None)
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, PUSH_SNDHWM)
            secure(sock, server=False, server_role="frontend")
            sock.connect(address)
            self._sockets[address] = sock
            log.info("worker.frontend_connected", address=address)
        self._last_used[address] = time.monotonic()
        return sock

    def _send(self, address: str, msg: Message) -> None:
        try:
            self._socket(address).send(encode(msg), flags=zmq.NOBLOCK, copy=True)
            self.sent_messages += 1
        except zmq.Again:
            self._dropped(address, msg, "frontend queue full")
        except (zmq.ZMQError, ProtocolError, ValueError) as exc:
            self._dropped(address, msg, str(exc))

    def _dropped(self, address: str, msg: Message, why: str) -> None:
        self.dropped_messages += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:  # a dead frontend must not flood the log
            self._last_drop_log = now
            log.warning("worker.tokens_dropped", address=address, reason=why, dropped_total=self.dropped_messages,
                        request_ids=[b.request_id for b in getattr(msg, "batches", [msg])[:8]
                                     if hasattr(b, "request_id")])

    def close(self, linger_ms: int = 0) -> None:
        """Close every socket; `linger_ms` lets queued batches (final error batches) go out first."""
        for sock in self._sockets.values():
            sock.close(linger=linger_ms)
        self._sockets.clear()
        if self._own_ctx:
            self._ctx.term()
