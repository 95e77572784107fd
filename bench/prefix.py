"""`kvferry bench prefix`: KV reuse on the simulator — rr / load / prefix / kvferry on traces with reuse.

Traces (workload/reuse.py): `multi-turn` (conversations of 4 turns, each turn's prompt the whole
history plus a new message) and `system-prompt` (8 shared 1,536-token prefixes, private suffixes).
16 `llama7b-a10` instances by default, several request rates up to about the cluster's capacity.
Per run: TTFT mean and P99, E2E mean and P99, throughput, the prompt tokens the engines reused
(`hit_rate`), what an oracle seeing every instance's cache at dispatch would have reused
(`oracle_hit_rate`), migrations and the blocks they did not send (`blocks_skipped`). `--json`
writes one row per (trace, rate, policy) with `bench paper`'s row fields plus those.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

POLICIES = ("rr", "load", "prefix", "kvferry")
# Requests/s on 16 instances (scaled with --instances), up to about where `load` saturates.
RATES = {"multi-turn": (16.0, 20.0, 24.0), "system-prompt": (8.0, 12.0, 16.0)}


@dataclass
class Options:
    """`kvferry bench prefix`'s settings (the flags, same names; their defaults are the CLI's)."""

    traces: str
    rates: str | None
    requests: int | None  # None: 2000 (--quick: 120)
    instances: int | None  # None: 16 (--quick: 4)
    policies: str
    seed: int
    quick: bool
    json: str | None


def run_one(trace_name: str, rate: float, policy_name: str, requests: int, instances: int,
            seed: int) -> dict[str, Any]:
    """Simulate one run; its flat row."""
    from policy import named_policy
    from simulator.cluster import simulate
    from simulator.config import SimConfig
    from workload.metrics import paper_row
    from workload.reuse import generate_reuse

    t0 = time.perf_counter()
    trace = generate_reuse(trace_name, requests, rate, seed=seed)
    res = simulate(trace, named_policy(policy_name), SimConfig(instances=instances))
    s = res.summary
    row: dict[str, Any] = {"experiment": "prefix", "trace": trace_name, "rate": rate, "cv": 1.0,
                           "policy": policy_name, "requests": len(trace), "instances": instances, "seed": seed,
                           **paper_row(s)}
    row.pop("cdf", None)
    p = s["prefix"]
    row.update(throughput=s["output_throughput"], request_throughput=s["request_throughput"], hit_rate=p["hit_rate"], oracle_hit_rate=p["oracle_hit_rate"], dispatch_hit_rate=p["dispatch_hit_rate"],
               migrations=s["migration"]["committed"], blocks_moved=s["migration"]["blocks_moved"],
               blocks_skipped=s["migration"]["blocks_skipped"], preemptions=s["preemptions"],
               virtual_s=s["virtual_s"], wall_s=time.perf_counter() - t0)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    from workload.report import table as fmt

    def f(v: float | None, d: int = 2) -> str:
        return "-" if v is None else f"{v:,.{d}f}"

    out = []
    for name in dict.fromkeys(r["trace"] for r in rows):
        lines = [[f"{r['rate']:g}", r["policy"], f(r["ttft_mean"], 3), f(r["ttft_p99"]), f(r["e2e_mean"]),
                  f(r["e2e_p99"]), f(r.get("throughput")), f"{100 * r['hit_rate']:.1f} %",
                  f"{100 * r['oracle_hit_rate']:.1f} %", str(r["migrations"]), str(r["blocks_skipped"])]
                 for r in rows if r["trace"] == name]
        out.append(f"{name} ({rows[0]['instances']} instances)\n" + fmt(lines, [
            "req/s", "policy", "TTFT mean s", "TTFT P99 s", "E2E mean s", "E2E P99 s", "tok/s", "hit",
            "oracle hit", "migr.", "blocks skipped"]))
    return "\n\n".join(out)


def run(opts: Options) -> int:
    from workload.reuse import REUSE_TRACES
    from workload.traces import TraceError

    instances = opts.instances or (4 if opts.quick else 16)
    requests = opts.requests or (120 if opts.quick else 2000)
    try:
        traces = [t.strip() for t in opts.traces.split(",") if t.strip()]
        if not traces or any(t not in REUSE_TRACES for t in traces):
            raise TraceError(f"--traces: choose from {', '.join(REUSE_TRACES)}")
        policies = [p.strip() for p in opts.policies.split(",") if p.strip()]
        bad = [p for p in policies if p not in POLICIES]
        if not policies or bad:
            raise TraceError(f"--policies: choose from {', '.join(POLICIES)}")
        given = [float(x) for x in opts.rates.split(",")] if opts.rates else None
        if given is not None and (not given or any(not r > 0 for r in given)):
            raise TraceError("--rates: positive numbers, comma-separated")
    except (TraceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    for name in traces:
        rates = given or [r * instances / 16 for r in (RATES[name][-1:] if opts.quick else RATES[name])]
        for rate in rates:
            for pol in policies:
                row = run_one(name, rate, pol, requests, instances, opts.seed)
                print(f"[{name} {rate:g} req/s {pol}: {row['wall_s']:.1f} s]", file=sys.stderr, flush=True)
                rows.append(row)
    print(table(rows))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
