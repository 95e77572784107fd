"""Trace flags shared by `bench simulate` and `bench serve`: a generated trace or a JSONL file
(bench.trace.TraceOptions, bench.trace.build_trace)."""

from __future__ import annotations

import argparse

from cli.common import positive_int

TRACE_HELP = ("INPUT-OUTPUT lengths: 256-256, 512-512, 128-512, 512-128, 128-128 (power law with that mean, "
              "capped at 6144), or per side fixed:N, uniform:A:B, zipf:MEAN; or a trace with KV reuse: "
              "multi-turn, system-prompt (workload/reuse.py) (default: %(default)s)")


def add_trace_args(p: argparse.ArgumentParser, requests: int) -> None:
    p.add_argument("--trace", default="256-256", help=TRACE_HELP)
    p.add_argument("--rate", type=float, metavar="REQ_PER_S", help="mean request rate (required unless --trace-file)")
    p.add_argument("--cv", type=float, default=1.0,
                   help="coefficient of variation of inter-arrival times: 1 Poisson, > 1 Gamma (default: 1)")
    p.add_argument("--requests", type=positive_int, default=requests, help="requests in the trace (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default: 0)")
    p.add_argument("--high-priority-fraction", type=float, default=0.0, metavar="X",
                   help="share of high-priority requests (priority -1) (default: 0)")
    p.add_argument("--trace-file", metavar="FILE.jsonl", help="replay this trace instead (lines: arrival_s, input_len, "
                   "output_len, priority); --trace/--rate/--cv/--seed/--high-priority-fraction are then ignored, "
                   "--requests keeps the first N")
    p.add_argument("--save-trace", metavar="FILE.jsonl", help="also write the trace used to FILE")
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", default=[],
                   help="SLOs for goodput, as vllm bench serve: ttft:MS tpot:MS e2el:MS")

