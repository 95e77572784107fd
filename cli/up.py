"""`kvferry up`: a local cluster (scheduler, N workers, frontend) as separate processes."""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a local cluster: scheduler, workers and a frontend",
                       description="Start the scheduler, N workers and a frontend as separate processes, wait "
                                   "until all serve, print the endpoints; Ctrl-C / SIGTERM stops them all.")
    p.add_argument("--workers", type=int, default=None, help="number of workers (default 2)")
    p.add_argument("--engine", choices=["torch", "sim"], default=None)
    p.add_argument("--model", default=None, help="tiny | smollm2 | model folder | .gguf (sim: latency profile)")
    p.add_argument("--device", default=None, help="cpu, cuda (worker i on cuda:i) or cuda:K")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"])
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--base-port", type=int, default=None, help="first ZeroMQ port (default 17100)")
    p.add_argument("--policy", default=None, help="dispatch policy: rr | load")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (default: from memory)")
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.set_defaults(func=run)


def cluster_from_args(args: argparse.Namespace):  # noqa: ANN201 - LocalCluster, imported lazily
    from services.config import load_config
    from services.launcher import ClusterSpec, LocalCluster

    cfg = load_config(args.config, overrides={
        "cluster": {"http_port": args.http_port, "base_port": args.base_port},
        "scheduler": {"policy": args.policy},
        "worker": {"engine": args.engine, "model": args.model, "device": args.device, "dtype": args.dtype,
                   "num_blocks": args.num_blocks},
        "frontend": {"model": args.model if args.engine != "sim" else None},
    })
    if cfg.worker.engine == "sim" and args.model is None:
        cfg.worker.model = "llama7b-a10"
    workers = args.workers if args.workers is not None else 2
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    return LocalCluster(ClusterSpec(cfg, num_workers=workers, config_path=args.config,
                                    ready_timeout_s=args.ready_timeout))


def run(args: argparse.Namespace) -> int:
    from services.launcher import LaunchError

    try:
        cluster = cluster_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kvferry is up: {len(cluster.children) - 2} workers", flush=True)
    print(f"  OpenAI API : {cluster.http_url}/v1", flush=True)
    print(f"  SDK        : {cluster.sdk_endpoint}", flush=True)
    print(f"  scheduler  : {cluster.scheduler_endpoint}   (kvferry ctl status)", flush=True)
    status = 0
    try:
        while not stop.wait(0.5):
            dead = cluster.first_exited()
            if dead is not None:
                print(f"error: {dead.name} exited with status {dead.proc.returncode}; stopping the cluster",
                      file=sys.stderr, flush=True)
                status = 1
                break
    finally:
        cluster.stop()
    return status
