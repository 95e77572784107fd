"""Workers on real sockets in this process, for the live-migration tests.

Each `Worker` runs its own engine thread, control and migration sockets on 127.0.0.1, exactly as
in a worker process; the test plays the scheduler (a fake ROUTER that records MigrationResult
and load reports, and a DEALER per worker's control socket for commands) and the frontend (a
PULL that stitches streams by `first_index`, as the real frontend does, and checks that every
index arrives exactly once). Having the workers in-process lets a test hold a migration at a
chosen point (wrap a destination handler) to reach each abort path deterministically.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import zmq
import zmq.asyncio

from protocol import (
    Ack,
    AddRequest,
    ErrorReply,
    MigrateCommand,
    MigrationResult,
    Pong,
    SamplingParams,
)
from protocol.sockets import MessageSocket, request
from services.config import load_config
from services.worker.engine_factory import build_engine
from services.worker.worker import Worker
from testkit.fakes import FakeScheduler, TokenSink
from testkit.wait import until
from tests.test_worker_service import free_base_port

WAIT_S = 20.0


class MigrationCluster:
    """N in-process workers (same model and seed), a fake scheduler and a stitching frontend."""

    def __init__(self, n: int, worker_overrides: dict[str, Any] | None = None,
                 per_worker: dict[int, dict[str, Any]] | None = None) -> None:
        self.n = n
        self.base_port = free_base_port()
        self.worker_overrides = {"engine": "torch", "model": "tiny", "num_blocks": 256, "threads": 1,
                                 "migration_timeout_s": 3.0, **(worker_overrides or {})}
        self.per_worker = per_worker or {}
        self.ctx = zmq.asyncio.Context()
        self.workers: list[Worker] = []
        self.clients: list[MessageSocket] = []
        self.scheduler: FakeScheduler | None = None
        self.frontend: TokenSink | None = None

    async def start(self) -> "MigrationCluster":
        self.scheduler = FakeScheduler(self.ctx, f"tcp://127.0.0.1:{self.base_port}")
        # A taken-back migration lets two workers stream the same indices: repeats are recorded
        # (`duplicates`, `extra_finals`) for the tests to check, not raised.
        self.frontend = TokenSink(self.ctx, f"tcp://127.0.0.1:{self.base_port + 2}", record_repeats=True,
                                  name="stitching-frontend", wait_s=WAIT_S, label="the stitching frontend")
        loop = asyncio.get_running_loop()
        for i in range(self.n):
            cfg = load_config(None, env={}, overrides={
                "cluster": {"base_port": self.base_port},
                "worker": {"index": i, **self.worker_overrides, **self.per_worker.get(i, {})}})
            engine, info = await loop.run_in_executor(None, build_engine, cfg.worker)
            engine.config.debug_checks = True  # block-manager integrity after every step
            w = Worker(cfg, engine, info)
            await w.start()
            self.workers.append(w)
            self.clients.append(MessageSocket.connect(self.ctx, zmq.DEALER, w.control_endpoint,
                                                      (Ack, ErrorReply, Pong), name=f"client-{i}"))
        return self

    async def close(self) -> None:
        for w in self.workers:
            await w.stop("test over")
        for c in self.clients:
            c.close()
        if self.frontend is not None:
            await self.frontend.close()
        if self.scheduler is not None:
            await self.scheduler.close()
        self.ctx.destroy(linger=0)

    # ---- actions -------------------------------------------------------------------------------------

    async def call(self, i: int, msg: Any, timeout: float = WAIT_S) -> Any:
        return await request(self.clients[i], msg, timeout, raise_errors=False)

    async def add(self, i: int, rid: str, prompt: list[int], max_tokens: int, temperature: float = 0.0,
                  seed: int | None = None, priority: int = 0) -> None:
        assert self.frontend is not None
        msg = AddRequest(request_id=rid, prompt_token_ids=prompt, priority=priority,
                         sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=temperature,
                                                 seed=seed),
                         frontend_id="fe-test", reply_address=self.frontend.endpoint)
        reply = await self.call(i, msg)
        assert isinstance(reply, Ack), reply

    async def migrate(self, src: int, dst: int, rid: str | None = None, mode: str = "live") -> tuple[str, Any]:
        """Send MigrateCommand to worker `src`; (migration id, the worker's reply)."""
        mid = f"mig-{uuid.uuid4().hex[:10]}"
        w = self.workers[dst]
        reply = await self.call(src, MigrateCommand(migration_id=mid, request_id=rid, dst_worker_id=w.worker_id,
                                                    dst_endpoint=w.migration_endpoint, reason="test", mode=mode))
        return mid, reply

    async def result(self, migration_id: str, timeout: float = WAIT_S) -> MigrationResult:
        assert self.scheduler is not None
        return await self.scheduler.wait_for(
            lambda m: isinstance(m, MigrationResult) and m.migration_id == migration_id, timeout)

    async def migrate_and_wait(self, src: int, dst: int, rid: str | None = None, mode: str = "live") -> MigrationResult:
        mid, reply = await self.migrate(src, dst, rid, mode)
        assert isinstance(reply, Ack) and reply.ok, reply
        return await self.result(mid)

    async def used_blocks(self, i: int) -> int:
        w = self.workers[i]
        stats = await w.driver.call(lambda e: (e.check_integrity(), e.stats())[1])
        return stats.num_blocks - stats.num_free_blocks

    async def wait_idle(self, timeout: float = WAIT_S) -> None:
        """Every worker: no request, no reservation, every block free (integrity checked)."""
        state: dict[str, list[int]] = {}

        async def idle() -> bool:
            state["used blocks"] = [await self.used_blocks(i) for i in range(self.n)]
            state["routed requests"] = [len(w.routes) for w in self.workers]
            return not any(state["used blocks"]) and not any(state["routed requests"])

        await until(idle, timeout, lambda: f"idle workers; {state}", step_s=0.05)

    async def tokens_at(self, i: int, rid: str) -> int:
        """Output tokens the request has on worker i now (-1: not there)."""
        def count(e: Any) -> int:
            r = e.requests.get(rid)
            return -1 if r is None else r.num_output_tokens
        return await self.workers[i].driver.call(count)
