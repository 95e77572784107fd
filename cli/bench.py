"""`kvferry bench KIND`: benchmarks. Each kind is a module with `register(kinds)`, like commands."""

from __future__ import annotations

import argparse
import importlib

KINDS = (
    "cli.bench_engine",
    "cli.bench_frontend",
    "cli.bench_migration",
    "cli.bench_transfer",
    "cli.bench_simulate",
    "cli.bench_paper",
    "cli.bench_serve",
    "cli.bench_chaos",
    "cli.bench_restart",
    "cli.bench_overhead",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark", description="Benchmarks (kvferry bench KIND --help).")
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND", title="kinds")
    kinds.required = True
    for name in KINDS:
        importlib.import_module(name).register(kinds)
