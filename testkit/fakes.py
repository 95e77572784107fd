"""The services a test or a bench plays around real workers, on real sockets:

- FakeScheduler: a ROUTER at the scheduler endpoint that answers RegisterWorker (RegisterReply)
  and Ping (Pong) and records every message (LoadReports, Heartbeats, MigrationResults, ...);
- TokenSink: a PULL at the requests' reply address that stitches each request's stream by
  `first_index` (testkit.streams.Stream) and records final batches and RequestMoved notices.

Each receives in a task of its own; a failure there (a repeated index, say) is raised by the
next wait on that object. Waits are testkit.wait.until, woken by each message received.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import zmq
import zmq.asyncio

from protocol import (
    ErrorCode,
    ErrorReply,
    FrontendTokenInbound,
    Heartbeat,
    LoadReport,
    MigrationResult,
    Ping,
    Pong,
    RegisterReply,
    RegisterWorker,
    RequestMoved,
    SchedulerInbound,
    TokenBatch,
    TokenBatches,
)
from protocol.errors import ProtocolError
from protocol.sockets import MessageSocket
from testkit.streams import Stream
from testkit.wait import Description, until

WAIT_S = 10.0  # default bound of a wait: generous for anything that should take well under a second
BIND_RETRY_S = 3.0  # a just-closed socket on the port is released by ZeroMQ's I/O thread shortly after


def bind(ctx: zmq.asyncio.Context, kind: int, endpoint: str, inbound: Any, name: str) -> MessageSocket:
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        try:
            return MessageSocket.bind(ctx, kind, endpoint, inbound, name=name)
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class _Receiver:
    """A bound socket served by a task; `until` waits on what it received."""

    def __init__(self, sock: MessageSocket, wait_s: float, error_type: type[Exception], label: str) -> None:
        self.sock = sock
        self.wait_s, self.error_type, self.label = wait_s, error_type, label
        self.failure: BaseException | None = None  # what ended the receive loop
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while True:
                try:
                    rec = await self.sock.recv()
                except ProtocolError:  # logged by the socket; not expected from a worker
                    continue
                await self._handle(rec)
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - raised by the next wait
            self.failure = exc if isinstance(exc, self.error_type) else \
                self.error_type(f"{self.label} failed: {type(exc).__name__}: {exc}")
            self._changed.set()

    async def _handle(self, rec: Any) -> None:
        raise NotImplementedError

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def until(self, pred: Callable[[], Any], timeout: float | None = None, what: Description = "") -> Any:
        """Until `pred()` holds (bounded: `timeout`, else this object's wait_s); its value."""
        def check() -> Any:
            self._check()
            return pred()
        return await until(check, self.wait_s if timeout is None else timeout, what or self._state,
                           changed=self._changed)

    def _state(self) -> str:
        return f"a condition on {self.label}"

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.sock.close()


class FakeScheduler(_Receiver):
    """A ROUTER at the scheduler endpoint: answers RegisterWorker and Ping, records everything:
    `messages` (all, in order), `workers` (RegisterWorker by worker id), `results`
    (MigrationResult by migration id) and `latest_reports` (worker id → (perf_counter at arrival,
    its latest LoadReport)).

    With `not_found=True` it answers LoadReports and Heartbeats from workers that have not
    registered with it with ErrorReply(not_found), as a restarted scheduler does."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, scheduler_id: str = "sched-1",
                 not_found: bool = False, heartbeat_ms: int = 200, report_ms: int = 20, *,
                 name: str = "fake-scheduler", wait_s: float = WAIT_S, error_type: type[Exception] = AssertionError,
                 label: str = "the fake scheduler") -> None:
        self.scheduler_id, self.not_found = scheduler_id, not_found
        self.heartbeat_ms, self.report_ms = heartbeat_ms, report_ms
        self.messages: list[Any] = []
        self.workers: dict[str, RegisterWorker] = {}
        self.results: dict[str, MigrationResult] = {}
        self.latest_reports: dict[str, tuple[float, LoadReport]] = {}
        super().__init__(bind(ctx, zmq.ROUTER, endpoint, SchedulerInbound, name), wait_s, error_type, label)

    async def _handle(self, rec: Any) -> None:
        msg = rec.msg
        self.messages.append(msg)
        if isinstance(msg, RegisterWorker):
            self.workers[msg.worker_id] = msg
            await self.sock.send(RegisterReply(reply_to=msg.msg_id, scheduler_id=self.scheduler_id,
                                               heartbeat_interval_ms=self.heartbeat_ms,
                                               report_interval_ms=self.report_ms), peer=rec.peer)
        elif isinstance(msg, Ping):
            await self.sock.send(Pong.to(msg, self.scheduler_id), peer=rec.peer)
        elif isinstance(msg, MigrationResult):
            self.results[msg.migration_id] = msg
        if isinstance(msg, LoadReport):
            self.latest_reports[msg.worker_id] = (time.perf_counter(), msg)
        if isinstance(msg, (LoadReport, Heartbeat)) and self.not_found:
            wid = getattr(msg, "worker_id", None) or getattr(msg, "sender_id", "")
            if wid not in self.workers:
                await self.sock.send(ErrorReply(code=ErrorCode.NOT_FOUND, message=f"unknown worker {wid}"),
                                     peer=rec.peer)

    async def wait_for(self, pred: Callable[[Any], bool], timeout: float | None = None, start: int = 0) -> Any:
        """The first recorded message (from index `start`) matching `pred`."""
        i = start

        def match() -> Any:
            nonlocal i
            while i < len(self.messages):
                if pred(self.messages[i]):
                    return (self.messages[i],)
                i += 1
            return None

        def what() -> str:
            return f"a matching message; got {[type(m).__name__ for m in self.messages[-10:]]}"

        (msg,) = await self.until(match, timeout, what)
        return msg

    def reports(self, start: int = 0) -> list[LoadReport]:
        return [m for m in self.messages[start:] if isinstance(m, LoadReport)]


class TokenLists(Mapping):
    """A TokenSink's tokens per request: `tokens[rid]` is the stream's list so far (in order);
    `tokens(rid)` the same, checked for gaps ([] for an unknown request); `tokens[rid] = [...]`
    sets what the frontend already holds (a resumed request's indices continue after it)."""

    def __init__(self, sink: TokenSink) -> None:
        self._sink = sink

    def __getitem__(self, rid: str) -> list[int]:
        return self._sink.streams[rid].tokens

    def __setitem__(self, rid: str, tokens: list[int]) -> None:
        self._sink.stream(rid).hold(tokens)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sink.streams)

    def __len__(self) -> int:
        return len(self._sink.streams)

    def __call__(self, rid: str) -> list[int]:
        s = self._sink.streams.get(rid)
        return [] if s is None else s.ordered()

    def __repr__(self) -> str:
        return repr(dict(self))


class TokenSink(_Receiver):
    """A PULL at the reply address: each request's Stream (`streams`, `tokens`), its first final
    batch (`finish`), later final batches (`extra_finals`), RequestMoved notices (`moved`) and
    every message (`messages`), each stamped on arrival with time.perf_counter.

    `in_order` / `record_repeats`: how strictly streams are read (testkit.streams)."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, *, in_order: bool = False,
                 record_repeats: bool = False, stream_type: type[Stream] = Stream, name: str = "token-sink",
                 wait_s: float = WAIT_S, error_type: type[Exception] = AssertionError,
                 label: str = "the token sink") -> None:
        self.endpoint = endpoint
        self.in_order, self.record_repeats, self.stream_type = in_order, record_repeats, stream_type
        self.streams: dict[str, Stream] = {}
        self.tokens = TokenLists(self)
        self.finish: dict[str, TokenBatch] = {}
        self.extra_finals: list[TokenBatch] = []
        self.moved: list[RequestMoved] = []
        self.messages: list[Any] = []
        super().__init__(bind(ctx, zmq.PULL, endpoint, FrontendTokenInbound, name), wait_s, error_type, label)

    def stream(self, request_id: str) -> Stream:
        s = self.streams.get(request_id)
        if s is None:
            s = self.streams[request_id] = self.stream_type(request_id, in_order=self.in_order,
                                                            record_repeats=self.record_repeats)
        return s

    async def _handle(self, rec: Any) -> None:
        t = time.perf_counter()
        msg = rec.msg
        self.messages.append(msg)
        if isinstance(msg, RequestMoved):
            self.moved.append(msg)
            return
        for b in msg.batches if isinstance(msg, TokenBatches) else [msg]:
            self.stream(b.request_id).feed(b.first_index, list(b.token_ids), b.worker_id, t, b.finish_reason,
                                           b.error)
            if b.finish_reason is not None:
                if b.request_id in self.finish:
                    self.extra_finals.append(b)
                else:
                    self.finish[b.request_id] = b

    def count(self, rid: str) -> int:
        """Distinct output indices received for `rid` (gaps or not)."""
        s = self.streams.get(rid)
        return 0 if s is None else s.received()

    @property
    def senders(self) -> dict[str, list[str]]:
        """Per request: the workers that sent it tokens, in arrival order (one entry per run)."""
        return {rid: s.senders for rid, s in self.streams.items() if s.senders}

    @property
    def duplicates(self) -> list[tuple[str, int]]:
        """(request, index) of every index delivered more than once (record_repeats)."""
        return [(rid, i) for rid, s in self.streams.items() for i in s.duplicates]

    def _state(self) -> str:
        return f"a condition on {self.label} (finished: {sorted(self.finish)}; tokens: " \
               f"{ {rid: len(s) for rid, s in self.streams.items()} })"

    async def finished(self, rid: str, timeout: float | None = None) -> TokenBatch:
        await self.until(lambda: rid in self.finish, timeout, f"{rid} to finish")
        return self.finish[rid]
