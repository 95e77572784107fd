"""The destination role of a live migration: the handler of the worker's migration socket.

A ROUTER at the worker's migration endpoint serving WorkerMigrationInbound:
- MigrateReserve: stage 0 opens the migration (layout check, concurrency limit, data path) and
  every stage reserves blocks in the engine under the key `mig:<migration id>` → ReserveReply;
- MigrateBlocks: KV for reserved blocks only (anything else is refused), written on a copy thread
  while the engine keeps stepping → BlocksAck;
- MigrateCommit: the request joins the running batch with no prefill and its tokens stream to
  its frontend from `next_index`, after a RequestMoved → CommitAck;
- MigrateAbort: the reservation is freed (after in-flight writes finish: its blocks must not be
  handed out while a copy thread still writes them). An abort for a migration committed moments
  ago (the source's commit wait timed out and it kept the request) drops the copy here. An abort
  for a migration not open here yet (the source gave up while its opening MigrateReserve was on
  its way; aborts are served ahead of it) makes that reserve, if it comes, refused.
Only the peer that opened a migration may continue it. A migration that hears nothing from its
source for `migration_timeout_s` is aborted by a sweeper, freeing its blocks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.errors import MigrationError, OutOfBlocksError
from kv_transfer.base import ChunkHeader, WorkerPlace, choose_path
from protocol.common import ErrorCode, ErrorReply, Ping, Pong
from protocol.sockets import MessageSocket, Received
from protocol.to_worker import (
    BlocksAck,
    CommitAck,
    MigrateAbort,
    MigrateBlocks,
    MigrateCommit,
    MigrateReserve,
    ReserveReply,
)
from services.log import get_logger
from services.worker.engine_factory import TORCH_KV_LAYOUT
from services.worker.migration.copy_threads import CopyThreads
from services.worker.migration.kv_io import ReceiverCache
from services.worker.migration.metrics import MigrationMetrics
from services.worker.streams import Route

if TYPE_CHECKING:
    from services.worker.context import WorkerContext

log = get_logger(__name__)

COMMITTED_MEMORY_S = 120.0  # how long a committed migration can still be taken back by MigrateAbort


@dataclass
class Incoming:
    """One migration with this worker as the destination."""

    migration_id: str
    request_id: str
    src_worker_id: str
    peer: bytes | None
    path: str
    key: str  # the engine reservation
    blocks: set[int] = field(default_factory=set)
    last_heard: float = field(default_factory=time.monotonic)
    writes: set[asyncio.Future[Any]] = field(default_factory=set)
    closing: bool = False
    committing: asyncio.Event | None = None  # set once a commit in progress has landed or failed


class MigrationDestination:
    """Serves the migration socket (see the module docstring)."""

    def __init__(self, ctx: "WorkerContext", sock: MessageSocket, copy_threads: CopyThreads,
                 metrics: MigrationMetrics, host: str) -> None:
        self.w = ctx
        self.cfg = ctx.cfg
        self.sock = sock
        self.copy_threads = copy_threads
        self.metrics = metrics
        cache = ctx.kv_tensor
        self.place = WorkerPlace(host, "cpu" if cache is None else cache.device.type)
        self.receivers = ReceiverCache(cache) if cache is not None else None
        self.incoming: dict[str, Incoming] = {}
        self.committed: dict[str, tuple[str, float]] = {}  # migration id → (request id, when)
        self.aborted_early: dict[str, tuple[bytes | None, float]] = {}  # migration id → (its peer, when)
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.incoming)

    async def __call__(self, rec: Received) -> object | None:
        msg = rec.msg
        if isinstance(msg, Ping):
            return Pong.to(msg, sender_id=self.w.worker_id)
        if isinstance(msg, MigrateAbort):
            if msg.migration_id not in self.incoming and msg.migration_id not in self.committed:
                self.aborted_early[msg.migration_id] = (rec.peer, time.monotonic())
            self._spawn(self._abort(msg.migration_id, f"source: {msg.reason}" if msg.reason else "source"))
            return None
        handlers = {MigrateReserve: self._reserve, MigrateBlocks: self._blocks, MigrateCommit: self._commit}
        handler = handlers.get(type(msg))
        if handler is None:
            return ErrorReply(reply_to=getattr(msg, "msg_id", None), code=ErrorCode.UNKNOWN_TYPE,
                              message=f"{type(msg).__name__} is not handled here")
        self._spawn(self._reply_with(rec, handler))
        return None

    # ---- messages --------------------------------------------------------------------------------

    def _known(self, rec: Received, migration_id: str) -> Incoming | None:
        m = self.incoming.get(migration_id)
        if m is None or m.peer != rec.peer or m.closing:
            return None
        m.last_heard = time.monotonic()
        return m

    async def _reserve(self, rec: Received) -> object:
        msg: MigrateReserve = rec.msg
        w = self.w
        refuse = lambda reason: ReserveReply(reply_to=msg.msg_id, migration_id=msg.migration_id, ok=False,  # noqa: E731
                                             reason=reason)
        if msg.stage == 0 and msg.migration_id not in self.incoming:
            early = self.aborted_early.pop(msg.migration_id, None)
            aborted = early is not None and early[0] == rec.peer
            why = "source: aborted before this reserve" if aborted else self._check_open(msg)
            if why is not None:
                log.info("migration.refused_in", migration_id=msg.migration_id, request_id=msg.request_id, reason=why)
                self.metrics.aborted.labels(role="in", reason=why.split(":")[0]).inc()
                return refuse(why)
            path = self._choose_path(msg)
            if path is None:
                return refuse(f"path: {msg.path} is not available here")
            m = Incoming(msg.migration_id, msg.request_id, msg.src_worker_id, rec.peer, path, f"mig:{msg.migration_id}")
            self.incoming[m.migration_id] = m
            self.metrics.started.labels(role="in").inc()
            w.link.mark_dirty()
        else:
            m = self._known(rec, msg.migration_id)
            if m is None:
                return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.NOT_FOUND,
                                  message=f"no open migration {msg.migration_id} from this peer")
        key, n = m.key, msg.num_blocks
        offer = (list(msg.token_ids), msg.cache_salt) if msg.stage == 0 and msg.token_ids else None

        def reserve(e: Any) -> tuple[list[int], int]:
            # Stage 0 with the source's tokens: the blocks this engine's prefix cache holds come
            # first, linked (engines without share_cached, e.g. vLLM, link none); the rest is new.
            share = getattr(e, "share_cached", None)
            cached = share(key, offer[0], offer[1], n) if offer is not None and share is not None else []
            try:
                return list(cached) + e.reserve(key, n - len(cached)), len(cached)
            except OutOfBlocksError:
                if cached:
                    e.release(key)
                raise
        try:
            ids, cached = await w.driver.call(reserve)
        except OutOfBlocksError as exc:
            await self._abort(m.migration_id, "no_room")
            return refuse(f"no_room: {exc}")
        m.blocks.update(ids)
        if cached:
            log.info("migration.prefix_cached", migration_id=m.migration_id, request_id=m.request_id,
                     cached_blocks=cached, blocks=n)
        return ReserveReply(reply_to=msg.msg_id, migration_id=m.migration_id, ok=True, block_ids=ids, path=m.path,  # type: ignore[arg-type]
                            cached_blocks=cached)

    def _check_open(self, msg: MigrateReserve) -> str | None:
        w = self.w
        kv = w.kv_tensor
        if w.stopping or w.draining:
            return "draining"
        if len(self.incoming) >= self.cfg.max_migrations_in:
            return "busy"
        if msg.request_id in w.routes:
            return "duplicate"
        if msg.block_size != w.info.block_size or msg.kv_bytes_per_block != w.info.kv_bytes_per_block:
            return (f"layout: block_size {msg.block_size} / {msg.kv_bytes_per_block} bytes per block, here "
                    f"{w.info.block_size} / {w.info.kv_bytes_per_block}")
        if (msg.kv_layout or TORCH_KV_LAYOUT) != w.info.kv_layout:
            return f"layout: KV block layout {msg.kv_layout or TORCH_KV_LAYOUT!r}, here {w.info.kv_layout!r}"
        if kv is not None and msg.kv_dtype != str(kv.dtype).removeprefix("torch."):
            return f"layout: KV dtype {msg.kv_dtype!r}, here {kv.dtype}"
        return None

    def _choose_path(self, msg: MigrateReserve) -> str | None:
        if self.receivers is None:
            return "frames"  # sim engine: no data moves
        if msg.path is not None:
            return msg.path if msg.path in ("shm", "frames") else None
        if self.cfg.migration_path in ("shm", "frames"):
            return self.cfg.migration_path
        return choose_path(WorkerPlace(msg.src_host, msg.src_device), self.place)

    async def _blocks(self, rec: Received) -> object:
        msg: MigrateBlocks = rec.msg
        m = self._known(rec, msg.migration_id)
        nack = lambda reason: BlocksAck(reply_to=msg.msg_id, migration_id=msg.migration_id, ok=False,  # noqa: E731
                                        reason=reason)
        if m is None:
            return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.NOT_FOUND,
                              message=f"no open migration {msg.migration_id} from this peer")
        if self.receivers is None:
            return nack("this worker has no KV data to write")
        if msg.path != m.path:
            return nack(f"path {msg.path}, agreed {m.path}")
        if not msg.dst_block_ids or not set(msg.dst_block_ids) <= m.blocks:
            return nack("blocks outside this migration's reservation")
        try:
            rx = self.receivers.get(msg.path, msg.staging, msg.staging_bytes)
        except (ValueError, OSError) as exc:
            return nack(f"cannot open the staging buffer: {exc}")
        header = ChunkHeader(seq=msg.seq, dst_block_ids=list(msg.dst_block_ids), offset=msg.offset)
        pool = self.copy_threads.pool(urgent=msg.final)
        fut = asyncio.wrap_future(pool.submit(rx.receive_chunk, header, rec.frames))
        m.writes.add(fut)
        try:
            await asyncio.shield(fut)
        except (ValueError, RuntimeError) as exc:
            return nack(f"write failed: {exc}")
        finally:
            m.writes.discard(fut)
        m.last_heard = time.monotonic()
        return BlocksAck(reply_to=msg.msg_id, migration_id=m.migration_id, ok=True)

    async def _commit(self, rec: Received) -> object:
        msg: MigrateCommit = rec.msg
        w = self.w
        m = self._known(rec, msg.migration_id)
        if m is None:
            return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.NOT_FOUND,
                              message=f"no open migration {msg.migration_id} from this peer")
        refuse = lambda reason: CommitAck(reply_to=msg.msg_id, migration_id=msg.migration_id, ok=False,  # noqa: E731
                                          reason=reason)
        state = msg.state
        rid = msg.state.request_id
        num_output = len(msg.state.token_ids) - msg.state.num_prompt_tokens
        if rid != m.request_id:
            await self._abort(m.migration_id, "error")
            return refuse("error: the state is for another request")
        if w.stopping or w.draining or rid in w.routes or msg.next_index < num_output:
            why = "draining" if (w.stopping or w.draining) else ("duplicate" if rid in w.routes else "error")
            await self._abort(m.migration_id, why)
            return refuse(why)
        m.closing = True
        m.committing = done = asyncio.Event()
        await self._wait_writes(m)
        route = Route(rid, msg.frontend_id, msg.reply_address, index_offset=msg.next_index - num_output,
                      tokens_sent=num_output, announce=w.control_endpoint,
                      frontend_incarnation=msg.frontend_incarnation)
        w.routes.add(route)  # before the commit: the first step's tokens must find it
        key = m.key
        try:
            await w.driver.call(lambda e: e.commit_request(state, key))
        except MigrationError as exc:
            w.routes.pop(rid)
            m.committing = None
            done.set()
            await self._abort(m.migration_id, "error")
            return refuse(f"error: {exc}")
        self.incoming.pop(m.migration_id, None)
        self.committed[m.migration_id] = (rid, time.monotonic())
        done.set()
        if w.routes.get(rid) is route:
            w.streamer.announce(route)  # unless the first tokens already carried it
        self.metrics.committed.labels(role="in").inc()
        w.link.mark_dirty()
        log.info("migration.committed_in", migration_id=m.migration_id, request_id=rid, src_worker_id=m.src_worker_id,
                 next_index=msg.next_index, blocks=len(m.blocks))
        return CommitAck(reply_to=msg.msg_id, migration_id=m.migration_id, ok=True)

    # ---- aborts ----------------------------------------------------------------------------------

    async def _abort(self, migration_id: str, reason: str) -> None:
        m = self.incoming.get(migration_id)
        if m is not None and m.committing is not None:  # a commit in progress: let it land, then take it back
            await asyncio.wait({asyncio.ensure_future(m.committing.wait())}, timeout=60.0)
        m = self.incoming.pop(migration_id, None)
        if m is None:
            await self._take_back(migration_id, reason)
            return
        m.closing = True
        await self._wait_writes(m)
        key = m.key
        try:
            await self.w.driver.call(lambda e: e.release(key) if e.is_reserved(key) else 0, timeout_s=30.0)
        except Exception:  # noqa: BLE001
            log.exception("migration.release_failed", migration_id=migration_id)
        label = reason.split(":")[0]
        self.metrics.aborted.labels(role="in", reason=label if label in _IN_REASONS else "source").inc()
        self.w.link.mark_dirty()
        log.info("migration.aborted_in", migration_id=migration_id, request_id=m.request_id, reason=reason,
                 blocks=len(m.blocks))

    async def _take_back(self, migration_id: str, reason: str) -> None:
        """MigrateAbort after our commit: the source kept the request (its commit wait timed out)."""
        entry = self.committed.pop(migration_id, None)
        if entry is None:
            return
        rid = entry[0]
        self.w.routes.pop(rid)  # no final batch: the request goes on at the source
        try:
            await self.w.driver.call(lambda e: e.abort_request(rid))
        except Exception:  # noqa: BLE001
            log.exception("migration.take_back_failed", migration_id=migration_id)
        log.warning("migration.taken_back", migration_id=migration_id, request_id=rid, reason=reason)
        self.w.link.mark_dirty()

    async def _wait_writes(self, m: Incoming) -> None:
        if m.writes:
            await asyncio.wait(list(m.writes), timeout=60.0)

    async def sweep(self) -> None:
        """Abort migrations whose source fell silent; forget old commits; unmap idle buffers."""
        now = time.monotonic()
        for m in list(self.incoming.values()):
            if not m.closing and now - m.last_heard > self.cfg.migration_timeout_s:
                log.warning("migration.source_silent", migration_id=m.migration_id, src_worker_id=m.src_worker_id,
                            silent_s=round(now - m.last_heard, 1))
                await self._abort(m.migration_id, "timeout")
        for mid, (_, when) in list(self.committed.items()):
            if now - when > COMMITTED_MEMORY_S:
                del self.committed[mid]
        for mid, (_, when) in list(self.aborted_early.items()):
            if now - when > self.cfg.migration_timeout_s:
                del self.aborted_early[mid]
        if self.receivers is not None:
            self.receivers.sweep()

    async def aclose(self) -> None:
        """Free every open reservation (the worker stops)."""
        for mid in list(self.incoming):
            await self._abort(mid, "stopped")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self.receivers is not None:
            self.receivers.close()

    # ---- helpers ---------------------------------------------------------------------------------

    async def _reply_with(self, rec: Received, handler: Any) -> None:
        try:
            reply = await handler(rec)
        except Exception as exc:  # noqa: BLE001 - one migration's failure is an error reply, not a crash
            log.exception("migration.handler_failed", type=type(rec.msg).__name__)
            reply = ErrorReply(reply_to=getattr(rec.msg, "msg_id", None), code=ErrorCode.INTERNAL,
                               message=f"{type(exc).__name__}: {exc}"[:4096])
        try:
            await self.sock.send(reply, peer=rec.peer, timeout_s=1.0)
        except Exception as exc:  # noqa: BLE001 - the socket may be closing
            log.warning("migration.reply_failed", type=type(reply).__name__, error=str(exc))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


_IN_REASONS = {"no_room", "busy", "draining", "duplicate", "layout", "timeout", "error", "stopped", "source"}
