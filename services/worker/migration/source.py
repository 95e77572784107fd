"""The source role of a live migration: multi-stage pre-copy, then stop-and-copy and commit.

One task per outgoing migration (design §5):
- stage 0 reserves blocks for the request's complete blocks on the destination (which may
  refuse) and copies them while the request keeps decoding here; each next stage copies the
  blocks completed meanwhile;
- once at most `migration_final_blocks` complete blocks are left (or after
  `migration_max_stages`), the request leaves the batch (detached, blocks kept), the rest is
  copied including the partly filled last block, and MigrateCommit carries its state;
- after a positive CommitAck the source frees its blocks and forgets the request's route.

Copies read only blocks whose tokens are all computed, on a copy thread, while the engine thread
keeps stepping: those blocks are never written again unless the request is preempted or ends,
and the last stage checks that neither happened (the block table's copied prefix is unchanged)
before anything is committed.

Every abort (the request finished or was preempted, the destination refused or stayed silent,
a cancel) leaves the request running here exactly once: a detached request is re-attached, the
destination is told with MigrateAbort, and no block is freed before the commit is acknowledged.
Cancels are cooperative: RPC waits race a cancel event; engine and copy calls always complete.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import zmq
import zmq.asyncio

from engine.block_manager import blocks_for
from engine.engine import LLMEngine, MigrationView
from kv_transfer.base import KVSender, block_bytes, block_shape
from protocol.common import ErrorCode, ErrorReply
from protocol.errors import ProtocolError, RequestTimeout
from protocol.payloads import MigratableState, TensorSpec
from protocol.sockets import MessageSocket, Received, Requester
from protocol.to_scheduler import MigrationResult
from protocol.to_worker import (
    BlocksAck,
    CommitAck,
    MigrateAbort,
    MigrateBlocks,
    MigrateCommand,
    MigrateCommit,
    MigrateReserve,
    ReserveReply,
    WorkerMigrationReplies,
)
from services.log import get_logger
from services.worker.migration.copy_threads import CopyThreads
from services.worker.migration.kv_io import SenderPool
from services.worker.migration.metrics import MigrationMetrics

if TYPE_CHECKING:
    from services.worker.context import WorkerContext

log = get_logger(__name__)

T = TypeVar("T")


class Aborted(Exception):
    """A migration gives up; `reason` is a short label (metrics, MigrationResult)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


class Refused(Exception):
    """A MigrateCommand this worker cannot start; `code` is the ErrorReply code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Outgoing:
    """One migration with this worker as the source."""

    migration_id: str
    request_id: str
    dst_worker_id: str
    dst_endpoint: str
    reason: str = ""
    mode: str = "live"  # live | blocking | recompute (MigrateCommand.mode)
    started: float = field(default_factory=time.monotonic)
    phase: str = "precopy"  # precopy → final → committing → done
    cancel_reason: str | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str = ""  # committed | aborted
    abort_reason: str = ""
    path: str = ""
    stages: int = 0
    blocks: int = 0
    blocks_skipped: int = 0  # not sent: the destination's prefix cache held them
    bytes_moved: int = 0
    downtime_ms: float = 0.0


@dataclass
class Transfer:
    """Where one outgoing migration's transfer stands, shared by its phases: what an abort must
    take back (`opened`: the destination holds a reservation; `asked`: a reservation was asked
    for and not answered yet, so the destination may hold one; `detached`: the request is out of
    this engine's batch) and what the next phase continues from."""

    requester: Requester
    sender: KVSender | None = None  # taken from the pool once the destination agreed on a path
    opened: bool = False
    asked: bool = False
    detached: bool = False
    committed: bool = False
    preemptions: int = 0  # the request's count when pre-copy began (a preemption aborts)
    stage: int = 0
    copied: list[int] = field(default_factory=list)  # source blocks already there, in table order
    spare: list[int] = field(default_factory=list)  # destination blocks reserved for the last stage
    paused_at: float = 0.0  # perf_counter when the request left the batch (the downtime's start)
    skip: int = 0  # leading blocks of the opening reservation the destination had cached (not to send)

    def take_skip(self, m: "Outgoing") -> int:
        """The opening reservation's cached blocks, once (counted on the migration)."""
        k, self.skip = self.skip, 0
        m.blocks_skipped += k
        return k


class PeerChannels:
    """One DEALER (with a Requester) per destination migration endpoint, opened on first use.

    One-way messages from a destination (its MigrateAbort) go to `on_message`."""

    def __init__(self, ctx: zmq.asyncio.Context, identity: str,
                 on_message: Callable[[Received], Awaitable[None] | None]) -> None:
        self.ctx = ctx
        self.identity = identity
        self.on_message = on_message
        self._peers: dict[str, tuple[MessageSocket, Requester]] = {}

    def get(self, endpoint: str) -> Requester:
        peer = self._peers.get(endpoint)
        if peer is None:
            sock = MessageSocket.connect(
                self.ctx, zmq.DEALER, endpoint, WorkerMigrationReplies, name=f"migrate->{endpoint}",
                identity=f"{self.identity}-{uuid.uuid4().hex[:8]}".encode(), hwm=1000, server_role="worker")
            peer = (sock, Requester(sock, self.on_message).start())
            self._peers[endpoint] = peer
        return peer[1]

    async def aclose(self) -> None:
        peers, self._peers = list(self._peers.values()), {}
        for sock, requester in peers:
            await requester.close()
            sock.close()


class MigrationSource:
    """Starts, runs and cancels this worker's outgoing migrations (at most `max_migrations_out`)."""

    def __init__(self, ctx: "WorkerContext", peers: PeerChannels, pool: SenderPool | None,
                 copy_threads: CopyThreads, metrics: MigrationMetrics, host: str) -> None:
        self.w = ctx
        self.cfg = ctx.cfg
        self.peers = peers
        self.pool = pool
        self.copy_threads = copy_threads
        self.metrics = metrics
        self.host = host
        self.by_id: dict[str, Outgoing] = {}
        self.by_request: dict[str, Outgoing] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._copying = 0  # copy-thread calls in flight (close waits for them)

    def __len__(self) -> int:
        return len(self.by_id)

    # ---- start / cancel --------------------------------------------------------------------------

    def is_migrating(self, request_id: str) -> bool:
        return request_id in self.by_request

    async def start(self, cmd: MigrateCommand) -> Outgoing:
        """Validate and start `cmd`; raises Refused (ErrorReply code, message) when it cannot."""
        w = self.w
        if w.stopping:
            raise Refused(ErrorCode.REFUSED, "the worker is stopping")
        if cmd.dst_worker_id == w.worker_id:
            raise Refused(ErrorCode.INVALID, "the destination is this worker")
        if cmd.migration_id in self.by_id:
            raise Refused(ErrorCode.REFUSED, f"migration {cmd.migration_id} is already running")
        if len(self.by_id) >= self.cfg.max_migrations_out:
            raise Refused(ErrorCode.OVERLOADED,
                          f"busy: {len(self.by_id)} outgoing migrations (limit {self.cfg.max_migrations_out})")
        rid = cmd.request_id or await self._pick()
        if rid is None:
            raise Refused(ErrorCode.NOT_FOUND, "no request to migrate")
        if rid not in w.routes:
            raise Refused(ErrorCode.NOT_FOUND, f"request {rid!r} is not on this worker")
        if rid in self.by_request:
            raise Refused(ErrorCode.REFUSED, f"request {rid!r} is already migrating")
        m = Outgoing(cmd.migration_id, rid, cmd.dst_worker_id, cmd.dst_endpoint, cmd.reason, cmd.mode)
        self.by_id[m.migration_id] = m
        self.by_request[rid] = m
        self.metrics.started.labels(role="out").inc()
        log.info("migration.started", migration_id=m.migration_id, request_id=rid, dst_worker_id=m.dst_worker_id,
                 reason=m.reason)
        task = asyncio.get_running_loop().create_task(self._run(m), name=f"migrate-{m.migration_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        w.link.mark_dirty()
        return m

    async def _pick(self) -> str | None:
        """Lowest priority first (the largest priority number), then the shortest context."""
        stats = await self.w.driver.call(lambda e: e.stats(per_request=True), timeout_s=5.0)
        candidates = [r for r in stats.requests
                      if r.status == "running" and r.request_id in self.w.routes and r.request_id not in self.by_request]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (-r.priority, r.num_tokens)).request_id

    def cancel(self, key: str, reason: str) -> Outgoing | None:
        """Ask migration `key` (a migration id or a request id) to abort if it has not reached the
        commit; returns it (await `.done`) or None when there is none."""
        m = self.by_id.get(key) or self.by_request.get(key)
        if m is None:
            return None
        if m.phase != "committing" and m.cancel_reason is None:
            m.cancel_reason = reason
            m.cancelled.set()
        return m

    def on_peer_abort(self, msg: MigrateAbort) -> None:
        """The destination gave up (its reservation timed out, it is stopping)."""
        m = self.by_id.get(msg.migration_id)
        if m is not None:
            self.cancel(m.migration_id, f"destination: {msg.reason or 'aborted'}")

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Abort every migration not yet committing and wait for all to settle."""
        for m in list(self.by_id.values()):
            self.cancel(m.migration_id, "stopped")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while self._copying and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.pool is not None:
            self.pool.close()

    # ---- the procedure ---------------------------------------------------------------------------

    async def _run(self, m: Outgoing) -> None:
        t = Transfer(self.peers.get(m.dst_endpoint))
        try:
            await self._precopy(m, t)
            state = await self._stop_and_copy(m, t)
            await self._commit(m, t, state)
        except Aborted as exc:
            m.outcome, m.abort_reason = "aborted", exc.reason
            if exc.detail:
                log.info("migration.abort_detail", migration_id=m.migration_id, detail=exc.detail[:500])
        except RequestTimeout:
            m.outcome, m.abort_reason = "aborted", "commit_timeout" if m.phase == "committing" else "timeout"
        except (ProtocolError, zmq.ZMQError) as exc:
            m.outcome, m.abort_reason = "aborted", "error"
            log.warning("migration.protocol_error", migration_id=m.migration_id, error=str(exc))
        except Exception:  # noqa: BLE001 - a bug aborts this migration, not the worker
            log.exception("migration.failed", migration_id=m.migration_id)
            m.outcome, m.abort_reason = "aborted", "error"
        finally:
            if not t.committed:
                await self._undo(m, t)
            if t.sender is not None and self.pool is not None:
                self.pool.give_back(t.sender)
            self._finish(m)

    async def _precopy(self, m: Outgoing, t: Transfer) -> None:
        """Copy the request's complete blocks while it keeps decoding here, stage after stage,
        until few enough are left for the pause (or the stage limit); live mode only."""
        rid, bs = m.request_id, self.w.info.block_size
        view = await self._parked_or_engine(rid, lambda e: e.migration_view(rid))
        if view is None:
            raise Aborted("finished")
        t.preemptions = view.num_preemptions
        max_stages = self.cfg.migration_max_stages if m.mode == "live" else 0
        while view.num_computed_tokens > 0:  # a queued request (nothing computed) is a plain move
            new = list(view.block_table[len(t.copied):view.num_computed_tokens // bs])
            if t.stage >= max_stages or (t.stage > 0 and len(new) <= self.cfg.migration_final_blocks):
                if t.stage > 0 and m.mode == "live":
                    # Reserve the last stage's blocks now (the blocks left, the partial one, one
                    # more that may fill meanwhile), so the request's pause holds no
                    # reservation round trip (a destination answers it between two steps).
                    t.spare = list((await self._reserve(m, t, len(new) + 2)).block_ids)
                return
            reply = await self._reserve(m, t, len(new))
            k = t.take_skip(m)  # stage 0: the destination linked its cached prefix, sent by nobody
            await self._copy(m, t, new[k:], list(reply.block_ids)[k:])
            t.copied += new
            t.stage += 1
            m.stages = t.stage
            view = self._still_here(await self._engine(lambda e: e.migration_view(rid)), t.preemptions)

    async def _stop_and_copy(self, m: Outgoing, t: Transfer) -> MigratableState:
        """Take the request out of the batch (its blocks stay) and copy what pre-copy did not,
        the partly filled last block included; its state, for the commit."""
        m.phase = "final"
        self._check_cancel(m)
        rid, prefix, preemptions = m.request_id, tuple(t.copied), t.preemptions

        def detach(e: LLMEngine) -> tuple[MigratableState, MigrationView, float] | str:
            v = e.migration_view(rid)
            if v is None:
                return "finished"
            if v.num_preemptions != preemptions or v.block_table[:len(prefix)] != prefix:
                return "preempted"
            return e.detach_request(rid), v, time.perf_counter()

        res = await self._parked_or_engine(rid, detach)
        if isinstance(res, str):
            raise Aborted(res)
        state, view, t.paused_at = res
        t.detached = True
        if m.mode == "recompute":  # only the state moves; the destination prefills again
            state = state.with_computed(0)
        rest = list(view.block_table[len(t.copied):blocks_for(state.num_computed_tokens, self.w.info.block_size)])
        # The reservation's blocks stay in order: `spare` follows the pre-copied ones, so the
        # rest maps onto spare first; unused spare blocks become the request's next blocks.
        targets = t.spare[:len(rest)]
        if not t.opened or len(rest) > len(t.spare):
            targets += list((await self._reserve(m, t, len(rest) - len(targets))).block_ids)
        k = t.take_skip(m)  # when this reservation opened the migration (no pre-copy)
        if rest[k:]:
            await self._copy(m, t, rest[k:], targets[k:], final=True)
        m.stages = t.stage + 1
        self._check_cancel(m)
        return state

    async def _commit(self, m: Outgoing, t: Transfer, state: MigratableState) -> None:
        """Hand the request over; once the destination acknowledges, free it here."""
        rid = m.request_id
        route = self.w.routes.get(rid)
        if route is None:
            raise Aborted("aborted", "the request was aborted during the migration")
        m.phase = "committing"
        commit = MigrateCommit(migration_id=m.migration_id, state=state,
                               frontend_id=route.frontend_id, reply_address=route.reply_address,
                               frontend_incarnation=route.frontend_incarnation,
                               next_index=route.index_offset + route.tokens_sent)
        ack = await self._rpc(m, t.requester.request(commit, self.cfg.migration_timeout_s, raise_errors=False),
                              cancellable=False)
        if isinstance(ack, ErrorReply):
            raise Aborted("refused", ack.message)
        if not isinstance(ack, CommitAck) or not ack.ok:
            raise Aborted(getattr(ack, "reason", "") or "refused")
        t.committed = True
        m.downtime_ms = (time.perf_counter() - t.paused_at) * 1000.0
        self.w.routes.pop(rid)
        await self._engine(lambda e: e.release(rid) if e.is_detached(rid) else 0)
        m.outcome = "committed"

    async def _undo(self, m: Outgoing, t: Transfer) -> None:
        """The request stays (or comes back) here; the destination frees what it reserved."""
        rid = m.request_id
        m.outcome = "aborted"
        m.abort_reason = m.abort_reason or "error"
        if t.opened or t.asked:  # asked: the destination may have reserved before our abort reaches it
            with contextlib.suppress(ProtocolError, zmq.ZMQError):
                await t.requester.send(MigrateAbort(migration_id=m.migration_id, reason=m.abort_reason), timeout_s=0.5)
        if t.detached:
            try:
                back = await self._engine(lambda e: (e.reattach_request(rid), True)[1] if e.is_detached(rid) else False)
            except Exception:  # noqa: BLE001
                log.exception("migration.reattach_failed", migration_id=m.migration_id, request_id=rid)
                back = False
            route = self.w.routes.get(rid)
            if back and route is not None and m.abort_reason == "commit_timeout":
                # The commit may have landed (the destination then drops its copy on MigrateAbort):
                # make sure the frontend sends aborts here.
                self.w.streamer.announce(route, self.w.control_endpoint)

    def _finish(self, m: Outgoing) -> None:
        m.phase = "done"
        self.by_id.pop(m.migration_id, None)
        if self.by_request.get(m.request_id) is m:
            del self.by_request[m.request_id]
        if m.outcome == "committed":
            self.metrics.committed.labels(role="out").inc()
            self.metrics.downtime.observe(m.downtime_ms / 1000.0)
            self.metrics.stages.observe(m.stages)
            self.metrics.blocks_skipped.inc(m.blocks_skipped)
        else:
            # A destination's refusal comes as "no_room: cannot reserve 259 blocks: 235 free": the
            # label is its first word (as the scheduler's and the destination's), not the free text.
            self.metrics.aborted.labels(role="out", reason=m.abort_reason.split(":")[0].strip() or "error").inc()
        log.info("migration.ended", migration_id=m.migration_id, request_id=m.request_id,
                 dst_worker_id=m.dst_worker_id, outcome=m.outcome, reason=m.abort_reason or None, path=m.path,
                 stages=m.stages, blocks=m.blocks, blocks_skipped=m.blocks_skipped, bytes=m.bytes_moved,
                 downtime_ms=round(m.downtime_ms, 3),
                 seconds=round(time.monotonic() - m.started, 4))
        m.done.set()
        self.w.link.mark_dirty()
        result = MigrationResult(
            migration_id=m.migration_id, request_id=m.request_id, src_worker_id=self.w.worker_id,
            dst_worker_id=m.dst_worker_id, outcome=m.outcome, reason=m.abort_reason, stages=m.stages,  # type: ignore[arg-type]
            blocks=m.blocks, bytes_moved=m.bytes_moved, downtime_ms=m.downtime_ms, blocks_skipped=m.blocks_skipped)
        task = asyncio.get_running_loop().create_task(self.w.link.send(result))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- steps -----------------------------------------------------------------------------------


    @staticmethod
    def _still_here(view: MigrationView | None, preemptions: int) -> MigrationView:
        if view is None:
            raise Aborted("finished")
        if view.num_preemptions != preemptions or view.status != "running":
            raise Aborted("preempted")
        return view

    @staticmethod
    def _check_cancel(m: Outgoing) -> None:
        if m.cancel_reason is not None:
            raise Aborted(_reason_label(m.cancel_reason), m.cancel_reason)

    async def _engine(self, fn: Callable[[LLMEngine], T]) -> T:
        """An engine-thread call that always completes (its effect must be known, e.g. a detach)."""
        return await self.w.driver.call(fn, timeout_s=max(30.0, self.cfg.migration_timeout_s))

    async def _parked_or_engine(self, rid: str, fn: Callable[[LLMEngine], T]) -> T:
        """`fn` at once for a request the engine parked for its hand-off (services/worker/handoff.py):
        the engine thread no longer touches it, so reading its view and state, and taking it out of
        the parked set, need not wait for the current step (up to a long prefill) to end. Any other
        request: an engine-thread call."""
        engine = self.w.driver.engine
        if rid in getattr(engine, "parked", ()):
            return fn(engine)
        return await self._engine(fn)

    async def _rpc(self, m: Outgoing, coro: Awaitable[Any], cancellable: bool = True) -> Any:
        """Await a request to the destination; a cancel (when allowed) wins the race."""
        task = asyncio.ensure_future(coro)
        if not cancellable:
            return await task
        waiter = asyncio.ensure_future(m.cancelled.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ProtocolError):
                await task
            self._check_cancel(m)
        return task.result()

    async def _reserve(self, m: Outgoing, t: Transfer, n: int) -> ReserveReply:
        """Reserve `n` more blocks on the destination (stage 0 opens the migration there and
        agrees on the data path, whose sender is then taken from the pool)."""
        w, stage = self.w, t.stage
        kv = w.kv_tensor
        forced = self.cfg.migration_path if self.cfg.migration_path != "auto" else None
        offer: tuple[list[int], str] | None = None
        if not t.opened and m.mode != "recompute":  # stage 0: offer the tokens of the full blocks
            rid = m.request_id
            offer = await self._engine(lambda e: getattr(e, "shareable_prefix", lambda _rid: None)(rid))
        msg = MigrateReserve(
            migration_id=m.migration_id, request_id=m.request_id, src_worker_id=w.worker_id, stage=stage,
            num_blocks=n, block_size=w.info.block_size, kv_bytes_per_block=w.info.kv_bytes_per_block,
            kv_dtype="" if kv is None else str(kv.dtype).removeprefix("torch."), kv_layout=w.info.kv_layout,
            src_host=self.host,
            src_device="cpu" if kv is None else kv.device.type, path=forced,  # type: ignore[arg-type]
            token_ids=offer[0] if offer else [], cache_salt=offer[1] if offer else "")
        t.asked = True
        reply = await self._rpc(m, t.requester.request(msg, self.cfg.migration_timeout_s, raise_errors=False))
        t.asked = False  # answered: `opened` tells from here whether the destination holds anything
        if isinstance(reply, ErrorReply):
            raise Aborted("refused", reply.message)
        if not isinstance(reply, ReserveReply) or not reply.ok:
            raise Aborted(getattr(reply, "reason", "") or "refused")
        if not t.opened:
            t.skip = min(reply.cached_blocks, n)
        t.opened = True
        if len(reply.block_ids) != n:
            raise Aborted("error", f"asked for {n} blocks, the destination reserved {len(reply.block_ids)}")
        if not m.path:
            m.path = reply.path
            t.sender = None if self.pool is None else self.pool.take(m.path)  # type: ignore[arg-type]
        return reply

    async def _copy(self, m: Outgoing, t: Transfer, src: list[int], dst: list[int], final: bool = False) -> None:
        """Send blocks `src` into the destination's `dst`, chunked, with up to `sender.depth`
        chunks in flight: the next chunk is gathered while the destination writes the previous."""
        sender, stage = t.sender, t.stage
        m.blocks += len(src)
        if not src or sender is None:  # sim engine: no KV data to move
            return
        cache = self.w.kv_tensor
        assert cache is not None
        loop = asyncio.get_running_loop()
        pending: collections.deque[tuple[int, asyncio.Future[Any]]] = collections.deque()
        attached = sender.attachment()
        dtype = str(cache.dtype).removeprefix("torch.")
        try:
            for src_chunk, dst_chunk in sender.chunks(src, dst):
                while not sender.can_send():
                    await self._settle(m, sender, pending.popleft())
                self._copying += 1
                try:
                    header = await loop.run_in_executor(self.copy_threads.pool(final), sender.send_chunk, src_chunk,
                                                        dst_chunk)
                finally:
                    self._copying -= 1
                msg = MigrateBlocks(
                    migration_id=m.migration_id, stage=stage, dst_block_ids=dst_chunk, path=sender.name,
                    seq=header.seq, staging=attached.staging, staging_bytes=attached.staging_bytes,
                    offset=header.offset, final=final,
                    tensors=[TensorSpec(dtype=dtype, shape=list(block_shape(cache, len(dst_chunk))))]  # type: ignore[arg-type]
                    if attached.data_frames else [])
                fut = asyncio.ensure_future(self._rpc(m, t.requester.request(
                    msg, self.cfg.migration_timeout_s, frames=sender.payload(header.seq), raise_errors=False)))
                pending.append((header.seq, fut))
                nbytes = len(src_chunk) * block_bytes(cache)
                m.bytes_moved += nbytes
                self.metrics.bytes.labels(path=sender.name).inc(nbytes)
            while pending:
                await self._settle(m, sender, pending.popleft())
        finally:
            for _, fut in pending:
                fut.cancel()

    @staticmethod
    async def _settle(m: Outgoing, sender: KVSender, item: tuple[int, asyncio.Future[Any]]) -> None:
        seq, fut = item
        ack = await fut
        if isinstance(ack, ErrorReply):
            raise Aborted("refused", ack.message)
        if not isinstance(ack, BlocksAck) or not ack.ok:
            raise Aborted("error", getattr(ack, "reason", "") or "blocks not written")
        sender.ack(seq)


def _reason_label(reason: str) -> str:
    """A bounded metrics label for a free-text cancel reason."""
    for label in ("stopped", "aborted", "cancelled", "destination"):
        if reason.startswith(label):
            return label
    return "cancelled"
