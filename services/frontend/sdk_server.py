"""The SDK endpoint: a ROUTER speaking protocol.client (GenerateRequest → GenerateChunk stream).

Each GenerateRequest runs as its own task keyed by (peer, msg_id); CancelGenerate (or the
request's deadline) stops it and aborts the request on its worker. Errors before the first chunk
are one ErrorReply (codes as in protocol.client); errors after it too (the stream then ends).

A client that sets `batch_chunks` gets the streamed chunks of one event-loop turn (those one
worker step produced) as one GenerateChunks per client: a ZeroMQ send, and a wake-up of its I/O
thread, per step instead of per request, on both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import zmq
import zmq.asyncio

from protocol.base import remaining_s
from protocol.client import (MAX_BATCHED_CHUNKS, CancelGenerate, FrontendSdkInbound, GenerateChunk, GenerateChunks,
                             GenerateRequest, Usage)
from protocol.common import ErrorCode, ErrorReply, Ping, Pong
from protocol.errors import ProtocolError
from protocol.fields import DEFAULT_MAX_MESSAGE_BYTES
from protocol.sockets import MessageSocket, Received, serve
from services.config import FrontendConfig
from services.frontend.generation import GenerateParams, GenerationError, Generator
from services.frontend.params import ApiError, RequestParser, api_key_matches
from services.frontend.router import RouteError, new_request_id
from services.log import get_logger

log = get_logger("kvferry.frontend.sdk")

STATUS_CODES = {400: ErrorCode.INVALID, 413: ErrorCode.TOO_LARGE, 429: ErrorCode.OVERLOADED,
                503: ErrorCode.UNAVAILABLE, 504: ErrorCode.EXPIRED}


class SdkServer:
    """Serves GenerateRequest / CancelGenerate / Ping on the frontend's SDK ROUTER."""

    def __init__(self, cfg: FrontendConfig, endpoint: str, parser: RequestParser, generator: Generator,
                 frontend_id: str, ctx: zmq.asyncio.Context | None = None) -> None:
        self.cfg = cfg
        self.parser = parser
        self.generator = generator
        self.frontend_id = frontend_id
        # max_body_bytes bounds an SDK message as it bounds an HTTP body (ErrorReply too_large);
        # ZeroMQ itself drops a peer past the protocol's frame limit.
        self.sock = MessageSocket.bind(ctx or zmq.asyncio.Context.instance(), zmq.ROUTER, endpoint,
                                       FrontendSdkInbound, name="frontend-sdk", max_bytes=cfg.max_body_bytes,
                                       max_frame_bytes=max(cfg.max_body_bytes, DEFAULT_MAX_MESSAGE_BYTES))
        self._jobs: dict[tuple[bytes, str], asyncio.Task] = {}
        self._rids: dict[tuple[bytes, str], str] = {}  # the request id of each job
        self._outbox: dict[bytes, list[GenerateChunk]] = {}  # chunks to batch, per peer, until the next turn
        self._serve: asyncio.Task | None = None

    def start(self) -> None:
        self._serve = asyncio.get_running_loop().create_task(serve(self.sock, self._handle), name="frontend-sdk")

    async def close(self) -> None:
        tasks = [t for t in [self._serve, *self._jobs.values()] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.sock.close()

    async def _handle(self, rec: Received) -> object:
        msg = rec.msg
        assert rec.peer is not None
        if isinstance(msg, Ping):
            return Pong.to(msg, sender_id=self.frontend_id)
        if isinstance(msg, CancelGenerate):
            key = (rec.peer, msg.target)
            rid = self._rids.get(key)
            if rid is not None and rid in self.generator.router.streams:
                log.info("request.cancelled", request_id=rid)
                self.generator.router.abort(rid, "cancelled by the client")  # ends the generation
            elif (task := self._jobs.get(key)) is not None:
                task.cancel()  # not started on a worker yet
            return None
        if isinstance(msg, GenerateRequest):
            if self.cfg.api_key and not api_key_matches(msg.api_key, self.cfg.api_key):
                log.warning("sdk.unauthorized", peer=rec.peer.hex())
                return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.UNAUTHORIZED,
                                  message="invalid or missing API key (GenerateRequest.api_key)")
            key = (rec.peer, msg.msg_id)
            if key in self._jobs:
                return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.REFUSED, message="duplicate msg_id")
            task = asyncio.get_running_loop().create_task(self._generate(rec.peer, msg))
            self._jobs[key] = task
            task.add_done_callback(lambda _t, k=key: (self._jobs.pop(k, None), self._rids.pop(k, None)))
        return None

    def _queue_chunk(self, peer: bytes, chunk: GenerateChunk) -> None:
        box = self._outbox.get(peer)
        if box is None:
            box = self._outbox[peer] = []
            # call_soon runs after every task this turn woke (all chunks of one TokenBatches)
            asyncio.get_running_loop().call_soon(self._flush, peer)
        box.append(chunk)

    def _flush(self, peer: bytes) -> None:
        """Send the peer's batched chunks now (in order, before whatever is sent next)."""
        box = self._outbox.pop(peer, [])
        for i in range(0, len(box), MAX_BATCHED_CHUNKS):
            part = box[i:i + MAX_BATCHED_CHUNKS]
            try:
                self.sock.send_nowait(part[0] if len(part) == 1 else GenerateChunks(chunks=part), peer=peer)
            except ProtocolError:  # too large together (long texts): one by one
                for c in part:
                    with contextlib.suppress(ProtocolError):
                        self.sock.send_nowait(c, peer=peer)

    def _params(self, msg: GenerateRequest) -> tuple[GenerateParams, int]:
        if msg.messages is not None:
            ids = self.parser.encode_chat([{"role": m.role, "content": m.content} for m in msg.messages])
        elif msg.prompt is not None:
            ids = self.parser.tokenizer.encode(msg.prompt)
        else:
            ids = list(msg.prompt_token_ids or [])
            vocab = self.parser.tokenizer.vocab_size
            if any(t >= vocab for t in ids):
                raise ApiError(400, f"token ids must be in [0, {vocab})")
        if not ids:
            raise ApiError(400, "the prompt is empty")
        if len(ids) > self.cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than the limit of {self.cfg.max_prompt_tokens}")
        ctx_len = self.parser.max_context
        if ctx_len is not None and len(ids) + msg.sampling.max_tokens > ctx_len:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({msg.sampling.max_tokens}) exceed the "
                                f"model's context of {ctx_len}")
        if msg.sampling.max_tokens > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens is limited to {self.cfg.max_tokens_limit}")
        left = remaining_s(msg)
        timeout = min(self.cfg.request_timeout_s, left if left is not None else self.cfg.request_timeout_s)
        return GenerateParams(new_request_id("sdk"), ids, msg.sampling, list(msg.stop), msg.priority, timeout,
                              msg.cache_salt), len(ids)

    async def _generate(self, peer: bytes, msg: GenerateRequest) -> None:
        async def send(reply: object) -> None:
            if msg.batch_chunks and isinstance(reply, GenerateChunk):
                self._queue_chunk(peer, reply)
                return
            if peer in self._outbox:
                self._flush(peer)  # this request's earlier chunks go first
            with contextlib.suppress(ProtocolError):
                await self.sock.send(reply, peer=peer, timeout_s=1.0)  # type: ignore[arg-type]

        def error(code: str, message: str) -> ErrorReply:
            return ErrorReply(reply_to=msg.msg_id, code=code, message=message[:4000])

        try:
            params, _ = self._params(msg)
        except ApiError as exc:
            await send(error(STATUS_CODES.get(exc.status, ErrorCode.INVALID), exc.message))
            return
        if params.timeout_s <= 0:
            await send(error(ErrorCode.EXPIRED, "deadline passed"))
            return
        if self.generator.active >= self.cfg.max_inflight:
            await send(error(ErrorCode.OVERLOADED, f"more than {self.cfg.max_inflight} requests in flight"))
            return
        rid = params.request_id
        self._rids[(peer, msg.msg_id)] = rid
        deltas = self.generator.run(params)
        text: list[str] = []
        ids: list[int] = []
        try:
            async for d in deltas:
                usage = Usage(prompt_tokens=d.usage.prompt_tokens, completion_tokens=d.usage.completion_tokens,
                              total_tokens=d.usage.total_tokens) if d.usage else None
                if msg.stream:
                    if d.text or d.token_ids or d.finish_reason:
                        await send(GenerateChunk(reply_to=msg.msg_id, request_id=rid, text=d.text, token_ids=d.token_ids,
                                                 first_index=d.first_index, finish_reason=d.finish_reason, usage=usage))
                else:
                    text.append(d.text)
                    ids.extend(d.token_ids)
                    if d.finish_reason:
                        await send(GenerateChunk(reply_to=msg.msg_id, request_id=rid, text="".join(text), token_ids=ids,
                                                 first_index=0, finish_reason=d.finish_reason, usage=usage))
        except RouteError as exc:
            await send(error(exc.code, exc.message))
        except GenerationError as exc:
            await send(error(STATUS_CODES.get(exc.status, ErrorCode.INTERNAL), f"{rid}: {exc.message}"))
        except asyncio.CancelledError:
            log.info("request.cancelled", request_id=rid)
        finally:
            await deltas.aclose()

