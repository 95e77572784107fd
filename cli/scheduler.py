"""`kvferry scheduler`: run the global scheduler alone (what compose and systemd run).

The flags and the run are services/scheduler/process.py's (shared with `python -m services.scheduler`).
Settings come from --config FILE, then KVFERRY_* environment variables (KVFERRY_SCHEDULER_POLICY,
KVFERRY_SCHEDULER_MIGRATE_OUT_BELOW, KVFERRY_SCHEDULER_HEARTBEAT_TIMEOUT_MS, KVFERRY_CLUSTER_BASE_PORT,
...), then these flags.
Prints `READY scheduler <endpoint>` on stdout once bound; stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse

from services.scheduler.process import add_arguments, run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scheduler", help="run the global scheduler",
                       description="Run the global scheduler: registers workers, takes their load reports, "
                                   "answers dispatch requests and `kvferry ctl`. Prints `READY scheduler "
                                   "<endpoint>` once it listens.")
    add_arguments(p)
    p.set_defaults(func=run)
