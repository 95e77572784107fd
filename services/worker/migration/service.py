"""Wires live migration into a worker: the migration socket, both roles, the copy threads.

`MigrationService(ctx, zmq_ctx, bind)` binds the worker's migration endpoint (the destination role serves
it), opens DEALERs to destinations on demand (the source role), and runs a sweeper that aborts
incoming migrations whose source fell silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from kv_transfer.shm import sweep_stale_buffers
from protocol.sockets import MessageSocket, Received, serve
from protocol.to_worker import MigrateAbort, MigrateCommit, WorkerMigrationInbound
from services.log import get_logger
from services.worker.migration.copy_threads import CopyThreads
from services.worker.migration.destination import MigrationDestination
from services.worker.migration.kv_io import SenderPool
from services.worker.migration.metrics import MigrationMetrics
from services.worker.migration.source import MigrationSource, PeerChannels

if TYPE_CHECKING:
    from services.worker.context import WorkerContext

log = get_logger(__name__)

MAX_FRAME_BYTES = 256 << 20  # one KV chunk frame (chunks are 16 MiB by default)
SWEEP_INTERVAL_S = 0.5


def host_identity() -> str:
    """Equal for two workers exactly when they can share /dev/shm: same host name and same boot."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{socket.gethostname()}/{boot}"[:256]


class MigrationService:
    """Both migration roles of one worker (see the module docstring)."""

    def __init__(self, ctx: "WorkerContext", zmq_ctx: zmq.asyncio.Context, bind: str) -> None:
        """`bind`: the address the migration socket binds (the worker's migration endpoint)."""
        self.w = ctx
        cfg = ctx.cfg
        self.metrics = MigrationMetrics()
        self.host = host_identity()
        self.copy_threads = CopyThreads(cfg.migration_precopy_nice)
        self.sock = MessageSocket.bind(zmq_ctx, zmq.ROUTER, bind, WorkerMigrationInbound,
                                       max_frame_bytes=MAX_FRAME_BYTES, zero_copy=True,
                                       name=f"{ctx.worker_id}-migration")
        cache = ctx.kv_tensor
        pool = None if cache is None else SenderPool(cache, cfg.migration_chunk_bytes, cfg.migration_shm_bytes,
                                                     max_idle=max(1, cfg.max_migrations_out))
        self.peers = PeerChannels(zmq_ctx, ctx.worker_id, self._from_destination)
        self.source = MigrationSource(ctx, self.peers, pool, self.copy_threads, self.metrics, self.host)
        self.destination = MigrationDestination(ctx, self.sock, self.copy_threads, self.metrics, self.host)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        stale = sweep_stale_buffers()
        if stale:
            log.info("migration.stale_shm_removed", buffers=len(stale))
        if self.source.pool is not None and self.w.cfg.migration_path in ("auto", "shm"):
            # Create (and page-touch) the shm staging buffer now, not inside a migration's pause.
            try:
                self.source.pool.give_back(self.source.pool.take("shm"))
            except OSError as exc:  # no /dev/shm here: migrations use frames
                log.warning("migration.shm_unavailable", error=str(exc))
        # Commits first: a waiting commit is a request out of every batch.
        self._tasks = [
            asyncio.create_task(serve(self.sock, self.destination, first=(MigrateCommit, MigrateAbort)),
                                name="worker-migration"),
            asyncio.create_task(self._sweeper(), name="migration-sweeper"),
        ]

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.destination.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must survive
                log.exception("migration.sweep_failed")

    def _from_destination(self, rec: Received) -> None:
        if isinstance(rec.msg, MigrateAbort):
            self.source.on_peer_abort(rec.msg)

    async def aclose(self) -> None:
        """Abort outgoing migrations (requests stay here), free incoming reservations, close."""
        await self.source.aclose()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        await self.destination.aclose()
        await self.peers.aclose()
        self.sock.close()
        self.copy_threads.shutdown()
