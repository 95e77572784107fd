"""The worker process: one engine and its agent (control socket, token streams, scheduler link).

`run_worker(cfg)` builds the engine, starts the engine thread, binds the control socket, keeps
the worker registered with the scheduler, prints `READY worker <id> <control endpoint>` once it
serves (and has registered, or tried for a moment), and returns after a stop: SIGTERM/SIGINT, a
Shutdown command, or `Worker.request_stop`. Stopping ends every unfinished request's stream with an
error batch (so frontends can resume it elsewhere), deregisters, and stops the engine thread.

SIGTERM is a graceful stop: the worker drains first (refuses new requests and reports draining,
so the scheduler's migration rounds move its running requests to other instances) and stops
once it holds no request or after `worker.stop_deadline_s`. SIGINT, or a second signal during
the drain, stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading
import time

import zmq
import zmq.asyncio

from engine.block_manager import KvEventBatch
from engine.engine import EngineStats, LLMEngine
from engine.errors import ConfigError
from engine.interface import kv_event_source
from engine.request import RequestOutput
from protocol.base import Message, now_ms
from protocol.fields import MAX_REQUESTS_PER_INSTANCE
from protocol.payloads import RequestLoadEntry, WorkerEndpoints
from protocol.security import curve_keys, use_curve
from protocol.sockets import MessageSocket, serve
from protocol.to_scheduler import LoadReport, RegisterWorker
from protocol.to_worker import WorkerControlInbound
from services import sd_notify
from services.config import KvferryConfig
from services.log import get_logger
from services.worker.context import WorkerContext, WorkerState
from services.worker.control import ControlHandler
from services.worker.engine_driver import EngineDriver
from services.worker.engine_factory import EngineInfo, build_engine
from services.worker.engine_metrics import register_engine_metrics, worker_health
from services.worker.kv_events import KvEventPublisher
from services.worker.metrics_http import MetricsServer, start_metrics_server
from services.worker.migration.service import MigrationService
from services.worker.scheduler_link import SchedulerLink
from policy.pd import ROLES
from services.worker.handoff import HandOff, set_parking
from services.worker.streams import RouteTable, TokenStreamer
from services.worker.torch_threads import on_fresh_thread

log = get_logger(__name__)

READY_WAIT_FOR_REGISTER_S = 2.0  # READY is printed after registering, or after this long without
FRONTEND_TIMEOUT_S = 5.0  # a frontend that heartbeated and then stayed silent this long is gone


class Worker:
    """One engine instance and its agent. Build with `Worker(cfg, engine, info)`, then `await run()`."""

    def __init__(self, cfg: KvferryConfig, engine: LLMEngine, info: EngineInfo) -> None:
        self.cfg = cfg
        self.engine = engine
        self.info = info
        self.worker_id = cfg.worker.resolved_id
        self.index = cfg.worker.index
        self.control_endpoint = cfg.cluster.worker_control(self.index)
        self.migration_endpoint = cfg.cluster.worker_migration(self.index)
        self.max_running = cfg.worker.max_num_seqs + cfg.worker.max_waiting
        if cfg.worker.role not in ROLES:
            raise ConfigError(f"[worker] role must be one of {', '.join(ROLES)}, not {cfg.worker.role!r}")
        self.state = WorkerState(role=cfg.worker.role)
        self.routes = RouteTable()
        curve = curve_keys(cfg.cluster, "worker")  # None: Curve off
        self.streamer = TokenStreamer(self.worker_id, self.routes, curve=curve)
        self.ctx = use_curve(zmq.asyncio.Context(), curve)
        self.loop = asyncio.get_running_loop()
        self.driver = EngineDriver(engine, self.loop, self._on_outputs, self._on_step_error)
        # KV events for the scheduler's prefix index: engines with a prefix cache only.
        source = kv_event_source(engine)
        self.kv_namespace = source.kv_namespace if source is not None else 0
        self.kv_events = KvEventPublisher(self.worker_id, enabled=source is not None)
        self.link = SchedulerLink(
            self.ctx, cfg.cluster.scheduler(), self.worker_id, self._register_message, self._report,
            heartbeat_interval_s=cfg.scheduler.heartbeat_interval_ms / 1000.0,
            report_interval_s=cfg.scheduler.report_interval_ms / 1000.0,
            heartbeat_timeout_s=cfg.scheduler.heartbeat_timeout_ms / 1000.0,
            on_resync=self.kv_events.request_resync,
        )
        # What the parts below get instead of this object.
        self.context = WorkerContext(
            worker_id=self.worker_id, cfg=cfg.worker, info=info, control_endpoint=self.control_endpoint,
            kv_tensor=engine.kv_tensor, driver=self.driver, routes=self.routes, streamer=self.streamer,
            link=self.link, state=self.state)
        self.control: MessageSocket | None = None
        self.migration: MigrationService | None = None
        self.handoff: HandOff | None = None
        self._metrics_server: MetricsServer | None = None
        self.handler: ControlHandler | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self.notifier: sd_notify.Notifier | None = None
        self.frontend_timeout_s = cfg.worker.frontend_timeout_s or FRONTEND_TIMEOUT_S
        self._stop = asyncio.Event()
        self._stop_reason = ""
        self._drain_first = False
        self._drain_cut = asyncio.Event()  # a second stop request ends the drain at once

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread, bind the control socket, start the scheduler link."""
        self.control = MessageSocket.bind(self.ctx, zmq.ROUTER, self.cfg.cluster.bind(self.control_endpoint),
                                          WorkerControlInbound, name=f"{self.worker_id}-control")
        self.migration = MigrationService(self.context, self.ctx, self.cfg.cluster.bind(self.migration_endpoint))
        if self.cfg.worker.metrics_port:  # worker i serves on metrics_port + i (one scheme for every host)
            registry = self.migration.metrics.registry
            register_engine_metrics(registry, self.context, self.migration, self.loop)
            self._metrics_server = start_metrics_server(
                self.cfg.cluster.http_host, self.cfg.worker.metrics_port + self.index, registry,
                health=lambda: worker_health(self.context, self.health, self.loop))
        self.driver.start()
        if self.kv_events.enabled:
            await self.driver.call(lambda e: e.enable_kv_events(), timeout_s=30.0)
        self.migration.start()
        self.handoff = HandOff(self.context, self.migration.source)
        self.handoff.start()
        if self.state.role == "prefill":
            await self.driver.call(lambda e: set_parking(e, True), timeout_s=30.0)
        self.handler = ControlHandler(self.context, self.control, self.migration.source,
                                      set_draining=self.set_draining, request_stop=self.request_stop)
        self._serve_task = asyncio.create_task(serve(self.control, self.handler), name="worker-control")
        self._watchdog_task = asyncio.create_task(self._frontend_watchdog(), name="frontend-watchdog")
        self.link.start()

    async def run(self, ready_line: bool = True) -> None:
        """Start, announce readiness, and serve until a stop is requested; then stop cleanly."""
        await self.start()
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.link.registered.wait(), READY_WAIT_FOR_REGISTER_S)
            log.info("worker.ready", worker_id=self.worker_id, control=self.control_endpoint,
                     migration=self.migration_endpoint, scheduler=self.cfg.cluster.scheduler(),
                     registered=self.link.registered.is_set(), engine=self.info.kind, model=self.info.model,
                     total_blocks=self.info.total_blocks, block_size=self.info.block_size)
            if ready_line:
                print(f"READY worker {self.worker_id} {self.control_endpoint}", flush=True)
            self.notifier = sd_notify.start(f"serving {self.info.model} as {self.worker_id}", self.health)
            await self._stop.wait()
            if self._drain_first:
                await self._drain(self.cfg.worker.stop_deadline_s)
        finally:
            await self.stop(self._stop_reason or "stopped")

    def engine_stuck(self) -> str:
        """Why the engine thread counts as stuck ("" while it is not): its current step or command
        has run longer than `[worker] watchdog_s`. Python cannot interrupt it; only a restart helps."""
        limit = self.cfg.worker.watchdog_s
        busy = self.driver.busy_s()
        if limit > 0 and busy > limit:
            return f"engine step running for {busy:.0f} s (watchdog_s {limit:g})"
        return ""

    def health(self) -> tuple[bool, str]:
        """(ok, why not): what /health and the service manager's watchdog pings go by."""
        if self.state.stopping:
            return False, "stopping"
        stuck = self.engine_stuck()
        return not stuck, stuck

    def request_stop(self, drain_first: bool = False, reason: str = "") -> None:
        """Ask `run` to return (safe from signal handlers and control messages). With `drain_first`,
        after migrating the requests away (at most `stop_deadline_s`); asked again, at once."""
        if self._stop.is_set():
            if not drain_first and not self._drain_cut.is_set():
                log.info("worker.drain_cut", worker_id=self.worker_id, reason=reason, requests=len(self.routes))
                self._drain_cut.set()
            return
        self._stop_reason = reason
        self._drain_first = drain_first
        if drain_first:
            self.set_draining(True)
        self._stop.set()

    def set_draining(self, draining: bool) -> None:
        if draining != self.state.draining:
            log.info("worker.draining" if draining else "worker.undrained", worker_id=self.worker_id,
                     requests=len(self.routes))
        self.state.draining = draining
        self.link.mark_dirty()

    async def _drain(self, timeout_s: float) -> None:
        """Wait until the scheduler has moved every request away (or they finished), `timeout_s` at
        most; what is left then ends with an error batch in `stop` (its frontend resumes it)."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        log.info("worker.drain_started", worker_id=self.worker_id, requests=len(self.routes), deadline_s=timeout_s)
        while len(self.routes) and time.monotonic() < deadline and not self._drain_cut.is_set():
            await asyncio.sleep(0.05)
        log.info("worker.drain_ended", worker_id=self.worker_id, requests_left=len(self.routes),
                 seconds=round(time.monotonic() - t0, 3))

    async def stop(self, reason: str = "stopped") -> None:
        """Stop serving: fail unfinished requests, deregister, stop the engine, close sockets."""
        if self.state.stopping:
            return
        self.state.stopping = True
        if self.notifier is not None:
            self.notifier.stopping()
        log.info("worker.stopping", worker_id=self.worker_id, reason=reason, requests=len(self.routes))
        for task in (self._serve_task, self._watchdog_task):
            if task is not None:
                task.cancel()
                await asyncio.wait({task}, timeout=2.0)
        if self.handler is not None:
            await self.handler.cancel_tasks()
        if self.handoff is not None:
            await self.handoff.stop()
        if self.migration is not None:
            try:
                await self.migration.aclose()  # outgoing requests stay here, incoming reservations are freed
            except Exception:  # noqa: BLE001 - stopping goes on
                log.exception("worker.migration_close_failed")
        left = self.routes.ids()
        if left:
            with contextlib.suppress(Exception):
                await self.driver.call(lambda e: [e.abort_request(r) for r in left], timeout_s=5.0)
            self.streamer.fail(self.routes.ids(), f"worker {self.worker_id} stopped ({reason})")
        await self.link.stop(reason)
        await self.loop.run_in_executor(None, self.driver.stop)
        if self.control is not None:
            self.control.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        self.streamer.close(linger_ms=500)  # let the final error batches leave
        self.ctx.term()
        log.info("worker.stopped", worker_id=self.worker_id)

    async def _frontend_watchdog(self) -> None:
        # Not while draining: frontends stop heartbeating a draining worker, yet its requests go on.
        while not self.state.stopping:
            await asyncio.sleep(min(1.0, self.frontend_timeout_s / 4))
            if self.handler is not None and not self.state.draining:
                try:
                    await self.handler.abort_lost_frontends(self.frontend_timeout_s)
                except Exception:  # noqa: BLE001 - the watchdog must survive
                    log.exception("worker.watchdog_failed")

    # ---- engine callbacks (on the event loop) ----------------------------------------------------

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        self.streamer.publish(outputs)
        self.link.mark_dirty()
        if self.handoff is not None:
            self.handoff.on_outputs(outputs)

    def _on_step_error(self, exc: BaseException) -> None:
        log.error("worker.step_failed", worker_id=self.worker_id, error=f"{type(exc).__name__}: {exc}")

    # ---- scheduler messages ----------------------------------------------------------------------

    def _register_message(self) -> RegisterWorker:
        return RegisterWorker(
            worker_id=self.worker_id,
            endpoints=WorkerEndpoints(control=self.control_endpoint, migration=self.migration_endpoint),
            host=socket.gethostname()[:256], engine=self.info.kind, model=self.info.model[:256],  # type: ignore[arg-type]
            total_blocks=self.info.total_blocks, block_size=self.info.block_size,
            kv_bytes_per_block=self.info.kv_bytes_per_block, max_running=self.max_running, pid=os.getpid(),
            kv_namespace=self.kv_namespace, role=self.cfg.worker.role,  # type: ignore[arg-type]
        )

    async def _report(self, seq: int) -> list[Message]:
        """One report: the KV events since the last one, then the LoadReport (one engine call)."""
        kv = self.kv_events
        resync = kv.take_resync()

        def read(e: LLMEngine) -> tuple[EngineStats, KvEventBatch | None]:
            return e.stats(per_request=True), e.take_kv_events(resync) if kv.enabled else None
        try:
            stats, batch = await self.driver.call(read, timeout_s=5.0)
        except BaseException:
            kv.request_resync("a load report failed")  # it may still run later, its events lost with it
            raise
        return [*kv.messages(batch), self._load_report(seq, stats)]

    def _load_report(self, seq: int, stats: EngineStats) -> LoadReport:
        entries = [RequestLoadEntry(request_id=r.request_id, priority=r.priority, num_blocks=r.num_blocks,
                                    num_tokens=r.num_tokens, running=r.status == "running")
                   for r in stats.requests[:MAX_REQUESTS_PER_INSTANCE]]
        return LoadReport(
            worker_id=self.worker_id, seq=seq, sent_ms=now_ms(), total_blocks=stats.num_blocks,
            free_blocks=stats.num_free_blocks, num_running=stats.num_running, num_waiting=stats.num_waiting,
            num_preemptions=stats.num_preemptions, head_of_line_blocks=stats.head_of_line_blocks,
            queued_prefill_tokens=stats.queued_prefill_tokens, num_cached_blocks=stats.num_cached_blocks,
            requests=entries, draining=self.state.draining, max_running=self.max_running,
            num_migrations_in=len(self.migration.destination) if self.migration else 0,
            num_migrations_out=len(self.migration.source) if self.migration else 0,
            role=self.state.role,  # type: ignore[arg-type]
        )


async def run_worker(cfg: KvferryConfig) -> None:
    """The worker process's main coroutine: build the engine, serve until SIGTERM/SIGINT/Shutdown."""
    log.info("worker.starting", worker_id=cfg.worker.resolved_id, engine=cfg.worker.engine, model=cfg.worker.model,
             device=cfg.worker.device, control=cfg.cluster.worker_control(cfg.worker.index))
    loop = asyncio.get_running_loop()
    wc = cfg.worker
    # What a start is doing, for the service manager (`systemctl status`, `kvferry up` while it waits).
    manager = sd_notify.Notifier()
    manager.notify(status=f"building the {wc.engine} engine: {wc.model} {wc.dtype} on {wc.device}")
    # On a thread that exits afterwards: a live thread that ran torch ops slows every engine step
    # (services.worker.torch_threads).
    engine, info = await on_fresh_thread(build_engine, cfg.worker)
    manager.notify(status="binding its sockets and registering with the scheduler")
    worker = Worker(cfg, engine, info)
    if cfg.worker.watchdog_s > 0 and manager.watchdog_s is None:
        # No service manager watches this process (docker, a bare `kvferry worker`): leave by itself.
        threading.Thread(target=_exit_when_stuck, args=(worker, 2 * cfg.worker.watchdog_s),
                         name="stall-guard", daemon=True).start()
    # SIGTERM (systemd, docker, scale-in): drain, then stop; SIGINT (Ctrl-C) or a second signal: stop now.
    loop.add_signal_handler(signal.SIGTERM, lambda: worker.request_stop(
        drain_first=not worker._stop.is_set(), reason="SIGTERM"))
    loop.add_signal_handler(signal.SIGINT, worker.request_stop, False, "SIGINT")
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        sys.stdout.flush()


EXIT_STUCK = 70  # EX_SOFTWARE: the exit status of a worker that left because its engine was stuck


def _exit_when_stuck(worker: Worker, limit_s: float) -> None:
    """On a plain thread (it works while the event loop is stuck too): once the engine thread has
    been stuck for `limit_s` (reported unhealthy on /health from `watchdog_s` on), dump every
    thread's stack and exit, so a restart policy (docker's, systemd's Restart=) starts a fresh one."""
    while not worker.state.stopping:
        time.sleep(1.0)
        busy = worker.driver.busy_s()
        if busy > limit_s:
            log.error("worker.engine_stuck_exit", worker_id=worker.worker_id, busy_s=round(busy, 1),
                      exit_status=EXIT_STUCK)
            faulthandler.dump_traceback(all_threads=True)
            os._exit(EXIT_STUCK)
