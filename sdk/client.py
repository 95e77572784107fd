"""AsyncClient and Client (a synchronous wrapper) over a frontend's SDK endpoint (a ZeroMQ ROUTER).

One DEALER per client; a reader task routes each GenerateChunk / ErrorReply by `reply_to` to the
call waiting for it, so many generations can run at once over one client. Leaving a `stream`
early (break, close, cancellation, timeout) sends CancelGenerate, which aborts the request on
the worker that runs it.

A lost frontend (its process died, or it stopped answering ZMTP heartbeats for
HEARTBEAT_TIMEOUT_MS) ends every generation in flight with `Unavailable` at once instead of at its
timeout: the frontend that held them is gone, and a restarted one does not know them. New calls
reconnect by themselves (same endpoint).

Security: `api_key` (the frontend's [frontend] api_key) travels in every GenerateRequest; with
CurveZMQ on the cluster, pass the frontends' public key and a client keypair the frontends accept
(`**curve_keys_from_dir("keys/")` reads `frontend.key` and `client.key_secret` from a
`kvferry keys generate` directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from protocol.base import deadline_in
from protocol.client import (CancelGenerate, ChatMessage, ClientInbound, GenerateChunk, GenerateChunks, GenerateRequest,
                             Usage)
from protocol.common import ErrorCode, ErrorReply
from protocol.errors import ProtocolError, RequestTimeout
from protocol.payloads import SamplingParams
from protocol.security import CurveKeys, read_keypair, read_public_key, use_curve
from protocol.sockets import MessageSocket


class SdkError(Exception):
    """The frontend refused or failed a request; `code` is the protocol ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class InvalidRequest(SdkError):
    """Bad parameters, prompt too long (HTTP 400)."""


class Overloaded(SdkError):
    """Too many requests in flight; retry later (HTTP 429)."""


class Unavailable(SdkError):
    """No worker can take the request (HTTP 503)."""


class Unauthorized(SdkError):
    """The frontend requires an API key and this client's is missing or wrong (HTTP 401)."""


class GenerateTimeout(SdkError, TimeoutError):
    """No (complete) answer within the timeout; the request was cancelled."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.EXPIRED, message)


_ERRORS = {ErrorCode.INVALID: InvalidRequest, ErrorCode.OVERLOADED: Overloaded,
           ErrorCode.UNAVAILABLE: Unavailable, ErrorCode.REFUSED: Unavailable, ErrorCode.UNAUTHORIZED: Unauthorized}

Key = bytes | str  # a Z85 CurveZMQ key (40 characters)

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000  # a frontend that answers no heartbeat this long counts as lost


@dataclass(frozen=True)
class _Lost:
    """Put in every waiting queue when the connection to the frontend drops."""

    message: str


def curve_keys_from_dir(directory: str, name: str = "client") -> dict[str, Any]:
    """`server_key` and `client_keypair` for AsyncClient/Client from a `kvferry keys generate`
    directory: the frontends' public key (`frontend.key`) and the keypair `NAME.key_secret`."""
    return {"server_key": read_public_key(directory, "frontend"), "client_keypair": read_keypair(directory, name)}


def _curve(server_key: Key | None, client_keypair: tuple[Key, Key] | None) -> CurveKeys | None:
    if server_key is None and client_keypair is None:
        return None
    if server_key is None or client_keypair is None:
        raise ValueError("CurveZMQ needs both server_key (the frontend's public key) and client_keypair")

    def b(k: Key) -> bytes:
        return k.encode("ascii") if isinstance(k, str) else bytes(k)

    public, secret = client_keypair
    return CurveKeys(public=b(public), secret=b(secret), server_keys={"frontend": b(server_key)})


def _error(reply: ErrorReply) -> SdkError:
    if reply.code == ErrorCode.EXPIRED:
        return GenerateTimeout(reply.message)
    return _ERRORS.get(reply.code, SdkError)(reply.code, reply.message)


@dataclass
class Chunk:
    """Part of a streamed answer: new text and the tokens it came from; the last chunk has
    `finish_reason` ("stop" or "length") and `usage`."""

    request_id: str
    text: str
    token_ids: list[int]
    first_index: int
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Result:
    """A whole answer. `request_id` is the id `kvferry ctl status` shows."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    request_id: str = ""


def _request(prompt: str | None, prompt_token_ids: Sequence[int] | None, messages: Sequence[dict] | None,
             max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
             stop: str | Sequence[str] | None, priority: int, ignore_eos: bool, stream: bool,
             timeout: float, api_key: str | None, cache_salt: str = "") -> GenerateRequest:
    if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
        raise ValueError("give exactly one of prompt=, prompt_token_ids=, messages=")
    msgs = None if messages is None else [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              ignore_eos=ignore_eos)
    return GenerateRequest(prompt=prompt, prompt_token_ids=None if prompt_token_ids is None else list(prompt_token_ids),
                           messages=msgs, sampling=sampling, stop=stops, priority=priority, stream=stream,
                           deadline_ms=deadline_in(timeout), api_key=api_key, batch_chunks=True,
                           cache_salt=cache_salt)


class AsyncClient:
    """asyncio client of one frontend's SDK endpoint (e.g. tcp://127.0.0.1:17101).

    `timeout` (seconds) bounds each whole generation unless a call passes its own. `api_key`: the
    frontend's API key, if it has one. `server_key` + `client_keypair` (Z85): CurveZMQ, for a
    cluster with `curve_keys_dir` set (see `curve_keys_from_dir`).
    """

    def __init__(self, endpoint: str, timeout: float = 600.0, *, api_key: str | None = None,
                 server_key: Key | None = None, client_keypair: tuple[Key, Key] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.api_key = api_key
        self._curve = _curve(server_key, client_keypair)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: MessageSocket | None = None
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._queues: dict[str, asyncio.Queue] = {}

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure(self) -> MessageSocket:
        if self._sock is None:
            self._ctx = use_curve(zmq.asyncio.Context(), self._curve)
            self._sock = MessageSocket.connect(self._ctx, zmq.DEALER, self.endpoint, ClientInbound, name="sdk-client",
                                               server_role="frontend",
                                               heartbeat_ms=(HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS))
            self._monitor = self._sock.raw.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read())
            self._watcher = loop.create_task(self._watch(self._monitor))
        return self._sock

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Fail the generations in flight when an established connection to the frontend drops (a
        refused handshake, e.g. without the Curve keys, is no lost frontend: those calls time out)."""
        from zmq.utils.monitor import parse_monitor_message

        connected = False
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                connected = True
                continue
            if event["event"] != zmq.EVENT_DISCONNECTED or not connected:
                continue
            connected = False
            lost = _Lost(f"lost the connection to the frontend {self.endpoint} (it stopped or stopped "
                         "answering); the request's state there is gone")
            for q in list(self._queues.values()):
                q.put_nowait(lost)

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                rec = await self._sock.recv()
            except ProtocolError:
                continue
            for msg in rec.msg.chunks if isinstance(rec.msg, GenerateChunks) else (rec.msg,):
                q = self._queues.get(getattr(msg, "reply_to", None) or "")
                if q is not None:
                    q.put_nowait(msg)

    async def close(self) -> None:
        """Cancel running generations, stop the reader and close the socket."""
        linger = 0
        if self._sock is not None:
            for msg_id in list(self._queues):
                with contextlib.suppress(Exception):
                    await self._sock.send(CancelGenerate(target=msg_id), timeout_s=0.5)
                    linger = 500  # let the cancels leave before the socket closes
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reader = self._watcher = None
        if self._monitor is not None:  # here, not in the watcher: a task cancelled before it ran has no finally
            with contextlib.suppress(zmq.ZMQError):
                self._sock.raw.disable_monitor()  # type: ignore[union-attr]
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.raw.close(linger=linger)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _chunks(self, req: GenerateRequest, timeout: float) -> AsyncIterator[GenerateChunk]:
        sock = self._ensure()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        q: asyncio.Queue = asyncio.Queue()
        self._queues[req.msg_id] = q
        done = False
        try:
            try:
                await sock.send(req, timeout_s=timeout)
            except RequestTimeout:
                done = True  # never sent: nothing to cancel
                # No frontend took it in time (none connected, or a refused Curve handshake that
                # tore the pipe down): the same timeout as an answer that never came.
                raise GenerateTimeout(f"could not send the request within {timeout:g} s") from None
            while True:
                left = end - loop.time()
                try:
                    if left <= 0:
                        raise asyncio.TimeoutError
                    if q.empty():
                        async with asyncio.timeout(left):  # a timer handle, not a Task per chunk
                            msg = await q.get()
                    else:
                        msg = q.get_nowait()
                except asyncio.TimeoutError:
                    raise GenerateTimeout(f"no complete answer within {timeout:g} s") from None
                if isinstance(msg, ErrorReply):
                    done = True
                    raise _error(msg)
                if isinstance(msg, _Lost):  # the cancel below still goes out: a frontend back after a blip frees it
                    raise Unavailable(ErrorCode.UNAVAILABLE, msg.message)
                yield msg
                if msg.finish_reason is not None:
                    done = True
                    return
        finally:
            self._queues.pop(req.msg_id, None)
            if not done and self._sock is not None:
                with contextlib.suppress(Exception):
                    await self._sock.send(CancelGenerate(target=req.msg_id), timeout_s=1.0)

    async def stream(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                     messages: Sequence[dict[str, str]] | None = None, max_tokens: int = 16,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                     stop: str | Sequence[str] | None = None, priority: int = 0, ignore_eos: bool = False,
                     timeout: float | None = None, cache_salt: str = "") -> AsyncIterator[Chunk]:
        """Yield Chunks as tokens arrive. Leaving early cancels the request once the iterator is
        closed: use `async with contextlib.aclosing(client.stream(...)) as chunks:` to close it at
        once on `break` (otherwise it is closed when garbage collected, or by `client.close()`)."""
        t = self.timeout if timeout is None else timeout
        req = _request(prompt, prompt_token_ids, messages, max_tokens, temperature, top_p, top_k, seed, stop,
                       priority, ignore_eos, True, t, self.api_key, cache_salt)
        chunks = self._chunks(req, t)
        try:
            async for c in chunks:
                yield Chunk(c.request_id, c.text, list(c.token_ids), c.first_index, c.finish_reason, c.usage)
        finally:
            await chunks.aclose()

    async def generate(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                       messages: Sequence[dict[str, str]] | None = None, max_tokens: int = 16,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                       stop: str | Sequence[str] | None = None, priority: int = 0, ignore_eos: bool = False,
                       timeout: float | None = None, cache_salt: str = "") -> Result:
        """The whole answer at once. Raises GenerateTimeout, InvalidRequest, Overloaded, Unavailable,
        Unauthorized."""
        t = self.timeout if timeout is None else timeout
        req = _request(prompt, prompt_token_ids, messages, max_tokens, temperature, top_p, top_k, seed, stop,
                       priority, ignore_eos, False, t, self.api_key, cache_salt)
        chunks = self._chunks(req, t)
        try:
            async for c in chunks:
                if c.finish_reason is not None:
                    return Result(c.text, list(c.token_ids), c.finish_reason, c.usage, c.request_id)
        finally:
            await chunks.aclose()
        raise SdkError(ErrorCode.INTERNAL, "the stream ended without a final chunk")


class Client:
    """Synchronous client: an AsyncClient on an event loop in a background thread."""

    def __init__(self, endpoint: str, timeout: float = 600.0, **security: Any) -> None:
        """`security`: AsyncClient's api_key, server_key, client_keypair."""
        self._async = AsyncClient(endpoint, timeout, **security)  # first: bad arguments leave no thread behind
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvferry-sdk", daemon=True)
        self._thread.start()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: str | None = None, **kw: Any) -> Result:
        """See AsyncClient.generate."""
        return self._run(self._async.generate(prompt, **kw))

    def stream(self, prompt: str | None = None, **kw: Any) -> Iterator[Chunk]:
        """See AsyncClient.stream; leaving the loop early (or `.close()`) cancels the request."""
        agen = self._async.stream(prompt, **kw)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
