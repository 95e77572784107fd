"""`kvferry up`: a local cluster (scheduler, N workers, frontend) as separate processes.

A process that exits without being asked is restarted (services.supervisor: backoff, start limit,
watchdog; `[supervisor]` settings), each restart a line on the console; the cluster stops, with
exit status 1, only when it cannot serve any more (no scheduler, frontend or worker left).

With `--scaling`, the worker pool grows and shrinks between `--min-workers` and `--max-workers`
as the scheduler advises (services.pool); scale events and, at exit, the instance-seconds used
are printed on stdout.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from policy.config import POLICY_NAMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a local cluster: scheduler, workers and a frontend",
                       description="Start the scheduler, N workers and a frontend as separate processes, wait "
                                   "until all serve, print the endpoints; a process that exits without being asked is restarted "
                                   "(backoff, start limit, watchdog: [supervisor] in the config); Ctrl-C / SIGTERM "
                                   "stops them all.")
    p.add_argument("--workers", type=int, default=None, help="number of workers (default 2)")
    p.add_argument("--engine", choices=["torch", "vllm", "sim"], default=None,
                   help="workers' engine (default: torch; vllm needs `make install-vllm`)")
    p.add_argument("--model", default=None, help="tiny | smollm2 | model folder | .gguf (sim: latency profile)")
    p.add_argument("--device", default=None, help="cpu, cuda (worker i on cuda:i) or cuda:K")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"])
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--base-port", type=int, default=None, help="first ZeroMQ port (default 17100)")
    p.add_argument("--policy", default=None, choices=POLICY_NAMES,
                   help="scheduling policy: rr, load (no migration), kvferry (default: migration, priority "
                        "load cap), kvferry-nopri (no priority load cap)")
    p.add_argument("--scaling", action="store_true", default=None,
                   help="auto-scale the worker pool between --min-workers and --max-workers")
    p.add_argument("--min-workers", type=int, default=None, metavar="A",
                   help="with --scaling: workers at start and at least (default: --workers, else 1)")
    p.add_argument("--max-workers", type=int, default=None, metavar="B", help="with --scaling: at most (default 4)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: from memory)")
    p.add_argument("--prefill-workers", type=int, default=0, metavar="P",
                   help="prefill/decode disaggregation: the first P workers prefill (and hand requests off)")
    p.add_argument("--decode-workers", type=int, default=0, metavar="D",
                   help="... the next D decode (the rest are mixed)")
    p.add_argument("--pd-mode", default=None, choices=("off", "fixed", "adaptive"),
                   help="[scheduler] pd_mode: fixed roles (default), adaptive roles, or off (roles ignored)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="Prometheus /metrics: scheduler on P, worker i on P+1+i (default: [scheduler] / [worker] "
                        "metrics_port from the config, else free ports; 0: off); the frontend's is on --http-port")
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.set_defaults(func=run)


def cluster_from_args(args: argparse.Namespace):  # noqa: ANN201 - LocalCluster, imported lazily
    from services.config import load_config
    from services.launcher import ClusterSpec, LocalCluster

    if args.scaling is None and (args.min_workers is not None or args.max_workers is not None):
        raise ValueError("--min-workers and --max-workers go with --scaling")
    if args.scaling and args.workers is not None and args.min_workers is not None:
        raise ValueError("with --scaling, give --min-workers (the workers at start), not --workers")
    min_workers = args.min_workers if args.min_workers is not None else args.workers
    scheduler: dict[str, object] = {"policy": args.policy, "pd_mode": args.pd_mode}
    if args.scaling:
        scheduler.update(scaling=True, scale_min_instances=min_workers if min_workers is not None else 1,
                         scale_max_instances=args.max_workers if args.max_workers is not None else None)
    cfg = load_config(args.config, overrides={
        "cluster": {"http_port": args.http_port, "base_port": args.base_port},
        "scheduler": scheduler,
        "worker": {"engine": args.engine, "model": args.model, "device": args.device, "dtype": args.dtype,
                   "num_blocks": args.num_blocks},
        "frontend": {"model": args.model if args.engine != "sim" else None},
    })
    if cfg.worker.engine == "sim" and args.model is None:
        cfg.worker.model = "llama7b-a10"
    sc = cfg.scheduler
    _metrics_ports(cfg, args.metrics_port)
    if sc.scaling:  # from the flag or the config file
        if args.max_workers is None and sc.scale_max_instances <= max(1, sc.scale_min_instances - 1):
            # Unset (the config default, 1) or below the minimum: 4, or the minimum when above.
            sc.scale_max_instances = max(4, sc.scale_min_instances)
        sc.policy_config()  # ValueError: bounds or thresholds that make no sense
        workers = sc.scale_min_instances
    else:
        workers = args.workers if args.workers is not None else 2
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    p, d = args.prefill_workers, args.decode_workers
    if p < 0 or d < 0 or p + d > workers:
        raise ValueError(f"--prefill-workers and --decode-workers must be >= 0 and add up to at most {workers} workers")
    return LocalCluster(ClusterSpec(cfg, num_workers=workers, config_path=args.config,
                                    ready_timeout_s=args.ready_timeout, prefill_workers=p, decode_workers=d))


def _metrics_ports(cfg, flag: int | None) -> None:  # noqa: ANN001 - KvferryConfig, imported lazily
    """Every service serves /metrics under `kvferry up`: the scheduler on P, worker i on P+1+i
    (worker.metrics_port = P+1: each worker adds its index). P: the flag, else free ports for the
    settings the config leaves at 0."""
    from services.launcher import free_port_block

    if flag is not None:
        if flag < 0 or flag > 65535 - 1 - max(4, cfg.scheduler.scale_max_instances):
            raise ValueError(f"--metrics-port {flag} out of range")
        cfg.scheduler.metrics_port = flag
        cfg.worker.metrics_port = flag + 1 if flag else 0
        return
    if cfg.scheduler.metrics_port and cfg.worker.metrics_port:
        return
    first = free_port_block(2 + max(64, cfg.scheduler.scale_max_instances))  # room for a scaling pool
    cfg.scheduler.metrics_port = cfg.scheduler.metrics_port or first
    cfg.worker.metrics_port = cfg.worker.metrics_port or first + 1


def run(args: argparse.Namespace) -> int:
    from services.launcher import LaunchError
    from services.log import configure_logging

    import logging

    configure_logging("up")  # the supervisor's structured lines (restarts, give-ups), on stderr
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness probe

    try:
        cluster = cluster_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cluster.spec.on_progress = lambda line: print(line, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    scaling = (f" (scaling {cluster.spec.config.scheduler.scale_min_instances}.."
               f"{cluster.spec.config.scheduler.scale_max_instances})" if cluster.scaling else "")
    print(f"kvferry is up: {len(cluster.workers())} workers{scaling}", flush=True)
    print(f"  OpenAI API : {cluster.http_url}/v1", flush=True)
    print(f"  SDK        : {cluster.sdk_endpoint}", flush=True)
    print(f"  scheduler  : {cluster.scheduler_endpoint}   (kvferry ctl status)", flush=True)
    urls = cluster.metrics_urls()
    workers = [u for name, u in urls.items() if name.startswith("worker-")]
    print(f"  metrics    : frontend {urls['frontend']}", flush=True)
    if "scheduler" in urls:
        print(f"               scheduler {urls['scheduler']}", flush=True)
    if workers:
        ports = sorted(int(u.rsplit(":", 1)[1].split("/")[0]) for u in workers)
        print(f"               workers http://{cluster.spec.config.cluster.http_host}:{ports[0]}..{ports[-1]}/metrics "
              f"(worker i: {cluster.spec.config.worker.metrics_port} + i)", flush=True)
    status = 0
    try:
        while not stop.wait(0.5):
            sup = cluster.supervisor
            if sup is None:  # no supervision ([supervisor] restart = false, watchdog_s = 0): any exit ends it
                dead = cluster.first_exited()
                if dead is not None:
                    print(f"error: {dead.name} exited with status {dead.proc.returncode}; stopping the cluster",
                          file=sys.stderr, flush=True)
                    status = 1
                    break
            elif sup.fatal is not None:  # the supervisor said why on the console already
                print("stopping the cluster", file=sys.stderr, flush=True)
                status = 1
                break
    finally:
        cluster.stop()
        if cluster.pool is not None:
            print(f"instance-seconds: {cluster.pool.instance_seconds:.1f}", flush=True)
    return status
