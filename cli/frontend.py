"""`kvferry frontend`: the OpenAI-compatible HTTP API and the SDK endpoint, as one process."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("frontend", help="run a frontend (OpenAI HTTP API + ZeroMQ SDK endpoint)",
                       description="Run a frontend: tokenizes, dispatches through the scheduler, streams tokens "
                                   "from the workers. Settings: --config FILE ([frontend], [cluster]), then "
                                   "KVFERRY_FRONTEND_* / KVFERRY_CLUSTER_* variables, then these flags. Prints "
                                   "'READY frontend <http url> <sdk endpoint>' once serving.")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--index", type=int, help="frontend index k (picks its SDK and token endpoints; default 0)")
    p.add_argument("--model", help="model for the tokenizer and chat template: tiny | smollm2 | PATH (default tiny)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the model's name)")
    p.add_argument("--http-host", help="HTTP interface (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (default 8000; 0: any free port)")
    p.add_argument("--base-port", type=int, help="cluster base port (default 17100)")
    p.add_argument("--scheduler", help="scheduler endpoint, e.g. tcp://127.0.0.1:17100")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default: KVFERRY_LOG_LEVEL or INFO)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    import uvloop

    from services import sd_notify
    from services.config import ConfigFileError, load_config
    from services.log import configure_logging

    configure_logging("frontend", args.log_level)
    cluster: dict = {"http_host": args.http_host, "http_port": args.http_port, "base_port": args.base_port}
    try:
        cfg = load_config(args.config, overrides={
            "cluster": cluster,
            "frontend": {"index": args.index, "model": args.model, "served_model_name": args.served_model_name,
                         "api_key": args.api_key},
        })
        if args.scheduler:
            import dataclasses

            cfg.cluster = dataclasses.replace(cfg.cluster, overrides={**cfg.cluster.overrides, "scheduler": args.scheduler})
    except (ConfigFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        from services.frontend.server import Frontend

        fe = Frontend(cfg)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await fe.start()
        print(f"READY frontend {fe.http_url} {fe.sdk_endpoint}", flush=True)
        notifier = sd_notify.start(f"serving {fe.http_url}")  # READY=1 and watchdog pings for systemd / kvferry up
        try:
            await stop.wait()
        finally:
            notifier.stopping()
            await fe.stop()
        return 0

    try:
        return uvloop.run(main())
    except OSError as exc:  # e.g. the port is in use
        print(f"error: {exc}", file=sys.stderr)
        return 1
