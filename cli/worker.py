"""`kvferry worker`: one worker process (an engine instance and its agent)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cli.common import MODEL_HELP, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="run one worker (an engine instance) of a kvferry cluster",
        description="Run one worker: an engine (torch, vllm or sim) that takes requests from frontends, streams tokens "
                    "back, and registers with the scheduler. Settings come from --config (TOML), then KVFERRY_* "
                    "environment variables, then these flags. Prints `READY worker <id> <control endpoint>` "
                    "once it serves; SIGTERM/SIGINT stop it cleanly.")
    p.add_argument("--config", help="TOML config file ([cluster], [scheduler], [worker] sections)")
    p.add_argument("--index", type=int, help="worker index: picks its endpoints from [cluster] (default: 0)")
    p.add_argument("--worker-id", help="worker id (default: worker-<index>)")
    p.add_argument("--engine", choices=("torch", "vllm", "sim"), help="engine kind (default: torch; vllm needs `make install-vllm`)")
    p.add_argument("--model", help=f"{MODEL_HELP}; sim: a latency profile (llama7b-a10, smollm2-cpu)")
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), help="default: bfloat16")
    p.add_argument("--num-blocks", type=positive_int, help="KV cache blocks (default: from kv_cache_bytes)")
    p.add_argument("--max-num-seqs", type=positive_int, help="requests in one batch at most (default: 64)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--role", choices=("mixed", "prefill", "decode"),
                   help="prefill/decode disaggregation: prefill (new requests, handed off once prefilled), "
                        "decode (hand-offs only) or mixed (both; the default)")
    p.add_argument("--scheduler", help="the scheduler's endpoint, e.g. tcp://127.0.0.1:17100")
    p.add_argument("--base-port", type=int, help="the cluster's base port (default: 17100)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default: KVFERRY_LOG_LEVEL or INFO)")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    worker = {"index": args.index, "worker_id": args.worker_id, "engine": args.engine, "model": args.model,
              "device": args.device, "dtype": args.dtype, "num_blocks": args.num_blocks,
              "max_num_seqs": args.max_num_seqs, "threads": args.threads, "role": args.role}
    cluster: dict[str, Any] = {"base_port": args.base_port}
    return {"worker": worker, "cluster": cluster}


def run(args: argparse.Namespace) -> int:
    import uvloop

    from services.config import ConfigFileError, load_config
    from services.log import configure_logging

    configure_logging("worker", args.log_level)
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: dump every thread's stack to stderr
    try:
        overrides = overrides_from_args(args)
        cfg = load_config(args.config, overrides=overrides)
        if args.scheduler:
            import dataclasses

            from protocol.addresses import ClusterAddresses

            cluster = dataclasses.asdict(cfg.cluster)
            cluster["overrides"] = {**cfg.cluster.overrides, "scheduler": args.scheduler}
            cfg.cluster = ClusterAddresses.from_dict(cluster)
    except (ConfigFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from services.worker.worker import run_worker

    try:
        uvloop.run(run_worker(cfg))
    except OSError as exc:  # zmq.ZMQError is an OSError: e.g. the control port is in use
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
