"""The scheduler as a process: its flags and its run, shared by `kvferry scheduler` (cli/scheduler.py)
and `python -m services.scheduler` (without the CLI's other imports).

Settings come from --config FILE, then KVFERRY_* environment variables (KVFERRY_SCHEDULER_POLICY,
KVFERRY_SCHEDULER_MIGRATE_OUT_BELOW, KVFERRY_SCHEDULER_HEARTBEAT_TIMEOUT_MS, KVFERRY_CLUSTER_BASE_PORT,
...), then these flags.
Prints `READY scheduler <endpoint>` on stdout once bound; stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import sys

from policy.config import POLICY_NAMES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file ([cluster], [scheduler] sections)")
    p.add_argument("--policy", choices=POLICY_NAMES,
                   help="scheduling policy: rr (round-robin), load (freest instance, no migration), kvferry "
                        "(freeness dispatch, load-balancing migration, priority load cap; the default), "
                        "kvferry-nopri (kvferry without the priority load cap)")
    p.add_argument("--base-port", type=int, metavar="P", help="cluster base port; the scheduler listens on P "
                   "(default: 17100)")
    p.add_argument("--bind", metavar="HOST", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--scheduler-id", metavar="ID", help="this scheduler's id (default: scheduler-0)")
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING (default: KVFERRY_LOG_LEVEL or INFO)")


def run(args: argparse.Namespace) -> int:
    import zmq

    from services.config import ConfigFileError, load_config
    from services.log import configure_logging
    from services.scheduler.main import run as run_scheduler

    configure_logging("scheduler", args.log_level)
    try:
        cfg = load_config(args.config, overrides={
            "cluster": {"base_port": args.base_port, "bind_host": args.bind},
            "scheduler": {"policy": args.policy, "scheduler_id": args.scheduler_id},
        })
        cfg.scheduler.policy_config()
    except (ConfigFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def ready(endpoint: str) -> None:  # called on the scheduler's event loop
        from services import sd_notify

        print(f"READY scheduler {endpoint}", flush=True)
        sd_notify.start(f"scheduling on {endpoint}")  # READY=1 and watchdog pings for systemd / kvferry up

    try:
        return run_scheduler(cfg, on_ready=ready)
    except (ValueError, zmq.ZMQError) as exc:
        print(f"error: scheduler: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point without the `kvferry` front (no engine import): `python -m services.scheduler`."""
    p = argparse.ArgumentParser(prog="python -m services.scheduler", description="Run the global scheduler.")
    add_arguments(p)
    return run(p.parse_args(argv))
