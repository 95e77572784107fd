"""The scheduler process: bind the ROUTER, serve SchedulerInbound, run the timers, stop on a signal.

`run(cfg)` blocks until SIGTERM/SIGINT (or `stop` is set). Once bound it calls `on_ready(endpoint)`;
`kvferry scheduler` prints `READY scheduler <endpoint>` there, which `kvferry up` waits for.
With `[scheduler] metrics_port` set, Prometheus /metrics and /health are served over HTTP on
`[cluster] http_host` (services.scheduler.metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

import zmq
import zmq.asyncio

from protocol import DispatchRequest
from protocol import SchedulerInbound
from protocol.base import Message
from protocol.security import curve_keys, use_curve
from protocol.sockets import MessageSocket, serve
from services.config import KvferryConfig
from services.log import get_logger
from services.metrics_http import MetricsServer, start_metrics_server
from services.scheduler.commands import CommandChannels
from services.scheduler.handlers import SchedulerCore
from services.scheduler.metrics import SchedulerMetrics, scheduler_health
from services.stall import StallWatch

log = get_logger("kvferry.scheduler")

SWEEP_INTERVAL_S = 0.1  # liveness check period: a silent worker is dead at most this long after its timeout


async def serve_scheduler(cfg: KvferryConfig, on_ready: Callable[[str], None] | None = None,
                          stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (created here and set by SIGTERM/SIGINT when not given)."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    sc = cfg.scheduler
    ctx = use_curve(zmq.asyncio.Context(), curve_keys(cfg.cluster, "scheduler"))  # Curve when configured
    commands = CommandChannels(ctx, sc.scheduler_id, sc.heartbeat_interval_ms / 1000.0)
    core = SchedulerCore(sc, commands)
    commands.on_pong = core.on_pong
    bind = cfg.cluster.scheduler_bind()
    sock = MessageSocket.bind(ctx, zmq.ROUTER, bind, SchedulerInbound, hwm=100_000, name="scheduler")
    tasks: list[asyncio.Task[None]] = []

    async def send_later(peer: bytes | None, msg: Message) -> None:
        # Replies that wait for a worker (ctl migrate) go out from background tasks; a ROUTER
        # send never blocks, so this interleaves safely with the serve loop's replies.
        await sock.send(msg, peer=peer, timeout_s=1.0)

    core.migrator.send = send_later
    metrics = SchedulerMetrics()
    handle = metrics.wrap(core.handle, trigger_of=lambda mid: getattr(
        core.migrator.tracker.in_flight.get(mid), "reason", None), hit_of=core.dispatch_hits.get)
    metrics_server: MetricsServer | None = None
    try:
        if sc.metrics_port:
            metrics.attach(core, loop)
            metrics_server = start_metrics_server(cfg.cluster.http_host, sc.metrics_port, metrics.registry,
                                                  health=lambda: scheduler_health(core, loop))

        async def sweeper() -> None:
            interval = min(SWEEP_INTERVAL_S, sc.heartbeat_timeout_ms / 4000.0)
            stall = StallWatch(interval)
            while True:
                await asyncio.sleep(interval)
                late = stall.late()
                if late:  # heartbeats wait unread in our socket: their silence was ours
                    log.warning("scheduler.stalled", seconds=round(late, 3))
                    core.excuse_silence(late)
                metrics.on_dead(len(core.sweep()))

        async def migration_rounds() -> None:
            while True:
                await asyncio.sleep(sc.migration_interval_ms / 1000.0)
                core.migration_round()

        async def scale_rounds() -> None:
            while True:
                await asyncio.sleep(core.scaler.tick_s)
                core.scale_round()

        tasks.append(loop.create_task(serve(sock, handle, first=(DispatchRequest,), on_invalid=core.on_invalid),
                                      name="scheduler-serve"))
        tasks.append(loop.create_task(sweeper(), name="scheduler-sweep"))
        tasks.append(loop.create_task(migration_rounds(), name="scheduler-migration"))
        if sc.scaling:
            tasks.append(loop.create_task(scale_rounds(), name="scheduler-scaling"))
        endpoint = cfg.cluster.scheduler()
        log.info("scheduler.ready", endpoint=endpoint, bind=bind, scheduler_id=sc.scheduler_id, policy=sc.policy,
                 metrics=None if metrics_server is None else f"{cfg.cluster.http_host}:{metrics_server.port}",
                 heartbeat_interval_ms=sc.heartbeat_interval_ms, heartbeat_timeout_ms=sc.heartbeat_timeout_ms,
                 report_interval_ms=sc.report_interval_ms, migration_interval_ms=sc.migration_interval_ms,
                 max_migrations_per_instance=sc.max_migrations_per_instance, migrate=core.policy_cfg.migrate,
                 priority_headroom=core.policy_cfg.priority_headroom, migrate_out_below=sc.migrate_out_below,
                 migrate_in_above=sc.migrate_in_above, scaling=sc.scaling,
                 scale=f"{sc.scale_min_instances}..{sc.scale_max_instances} instances, freeness "
                       f"{sc.scale_up_below}..{sc.scale_down_above}, every >= {sc.scale_interval_ms} ms")
        if on_ready is not None:
            on_ready(endpoint)
        stopped = loop.create_task(stop.wait())
        done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopped and t.exception() is not None:
                raise t.exception()  # a timer or the serve loop died: fail loudly
        stopped.cancel()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await commands.aclose()
        if metrics_server is not None:
            metrics_server.close()
        sock.close()
        ctx.destroy(linger=0)
        log.info("scheduler.stopped", workers=len(core.registry))


def run(cfg: KvferryConfig, on_ready: Callable[[str], None] | None = None) -> int:
    """Run the scheduler on uvloop when available; returns the exit status."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve_scheduler(cfg, on_ready))
    return 0
