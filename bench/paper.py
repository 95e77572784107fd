"""`kvferry bench paper`: the Llumnix paper's Figures 11, 13, 14 and 15 on the simulator, at the
settings of the paper's artifact (bench.paper_runs), each table with the paper's numbers beside ours
(bench.paper_claims).

16 `llama7b-a10` instances, 10,000 requests per run (`--requests`), the runs in `--jobs` parallel
processes (default: the CPU count; results identical for the seed). Tables on stdout; `--json`
writes the list of runs; `--plots DIR` draws the paper's forms: latency CDFs (Fig 11), priority
bars (Fig 13), latency and cost against rate and CV (Fig 14), P99 prefill against average
instances (Fig 15). `--quick`: 4 instances, 150 requests, a few points per figure (the tests).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Options:
    """`kvferry bench paper`'s settings (the flags, same names; their defaults are the CLI's)."""

    json: str | None
    plots: str | None
    quick: bool
    requests: int | None  # None: 10000 (--quick: 150)
    instances: int | None  # None: 16 (--quick: 4)
    seed: int
    jobs: int | None  # None: the CPU count
    all_rates: bool = False


def execute(specs: Sequence[Any], jobs: int) -> list[dict[str, Any]]:
    """Run every spec (in `jobs` processes), reporting progress on stderr; rows in spec order."""
    from bench.paper_runs import run_spec

    rows: list[dict[str, Any] | None] = [None] * len(specs)
    t0 = time.perf_counter()

    def note(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        n = sum(r is not None for r in rows)
        s = specs[i]
        print(f"[{n}/{len(specs)} {time.perf_counter() - t0:6.0f} s] {s.experiment} {s.trace} {s.rate:g} req/s "
              f"cv {s.cv:g} {s.policy}: {row['wall_s']:.1f} s", file=sys.stderr, flush=True)

    if jobs == 1:
        for i, s in enumerate(specs):
            note(i, run_spec(s))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(run_spec, s): i for i, s in enumerate(specs)}
            for f in as_completed(futs):
                note(futs[f], f.result())
    return rows  # type: ignore[return-value]


def _s(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _x(a: float | None, b: float | None) -> str:
    """How many times smaller b is than a ("a/b x")."""
    return "-" if not a or not b else f"{a / b:.2f}x"


def serving_tables(rows: Sequence[dict[str, Any]]) -> str:
    from bench.paper_plots import arrival_name
    from workload.report import table

    out = []
    for trace in dict.fromkeys(r["trace"] for r in rows):
        for cv in dict.fromkeys(r["cv"] for r in rows if r["trace"] == trace):
            part = [r for r in rows if r["trace"] == trace and r["cv"] == cv]
            out.append(f"\n{trace}, {arrival_name(cv)}")
            out.append(table([[f"{r['rate']:g}", r["policy"], _s(r["ttft_mean"], 3), _s(r["ttft_p99"]),
                               _s(1000 * r["decode_mean"], 1), _s(1000 * r["decode_p99"], 1), _s(r["e2e_mean"]),
                               _s(r["e2e_p99"], 1), _s(r["preemption_loss_mean"], 3),
                               f"{100 * r['fragmentation']:.0f}", str(r["migrations"])] for r in part],
                             ["req/s", "policy", "TTFT mean s", "TTFT P99 s", "decode mean ms", "decode P99 ms",
                              "E2E mean s", "E2E P99 s", "preempt loss s", "frag %", "migrations"]))
    return "\n".join(out)


def versus_table(rows: Sequence[dict[str, Any]], a: str = "load", b: str = "kvferry") -> str:
    """How much better `b` is than `a` at each point (a's latency / b's latency)."""
    from bench.paper_plots import arrival_name
    from workload.report import table

    by = {(r["trace"], r["cv"], r["rate"], r["policy"]): r for r in rows}
    lines = []
    for (trace, cv, rate, pol), rb in by.items():
        ra = by.get((trace, cv, rate, a))
        if pol != b or ra is None:
            continue
        la, lb = ra["preemption_loss_mean"], rb["preemption_loss_mean"]
        loss = "-" if not la else f"{100 * (lb - la) / la:+.0f} %"
        lines.append([trace, arrival_name(cv), f"{rate:g}", _x(ra["ttft_mean"], rb["ttft_mean"]),
                      _x(ra["ttft_p99"], rb["ttft_p99"]), _x(ra["decode_p99"], rb["decode_p99"]),
                      _x(ra["e2e_mean"], rb["e2e_mean"]), _x(ra["e2e_p99"], rb["e2e_p99"]), loss])
    return f"\n{b} vs {a} ({a}'s latency / {b}'s: above 1x is better)\n" + table(
        lines, ["trace", "arrivals", "req/s", "TTFT mean", "TTFT P99", "decode P99", "E2E mean", "E2E P99",
                "preemption loss"])


def priority_table(rows: Sequence[dict[str, Any]]) -> str:
    from workload.report import table

    lines = []
    for r in rows:
        for cls in ("high", "normal"):
            c = r.get("classes", {}).get(cls)
            if c:
                lines.append([f"{r['cv']:g}", r["policy"], cls, _s(c["ttft_mean"], 3), _s(c["ttft_p99"]),
                              _s(1000 * c["decode_mean"], 1), _s(c["e2e_mean"]), _s(c["e2e_p99"], 1)])
    r0 = rows[0]
    return (f"\npriorities: {r0['trace']} at {r0['rate']:g} req/s, Gamma arrivals, "
            f"{100 * r0['high_priority_fraction']:g} % high priority\n"
            + table(lines, ["CV", "policy", "class", "TTFT mean s", "TTFT P99 s", "decode mean ms", "E2E mean s",
                            "E2E P99 s"]))


def scaling_table(rows: Sequence[dict[str, Any]]) -> str:
    from bench.paper_plots import arrival_name
    from workload.report import table

    r0 = rows[0]
    return (f"\n{r0['experiment']}: {r0['trace']}, {r0.get('start_instances') or r0['instances']} instances at start, "
            f"1..{r0['instances']}\n"
            + table([[arrival_name(r["cv"]), f"{r['rate']:g}", f"{r['scale_up_below']:g} / {r['scale_down_above']:g}",
                      r["policy"], f"{r['avg_instances']:.2f}", _s(r["ttft_mean"], 3), _s(r["ttft_p99"]),
                      _s(r["e2e_p99"], 1), str(r["max_instances_live"]), str(r["migrations"])] for r in rows],
                    ["arrivals", "req/s", "up/down", "policy", "avg instances", "TTFT mean s", "TTFT P99 s",
                     "E2E P99 s", "max live", "migrations"]))


def run(opts: Options) -> int:
    import os

    from bench import paper_claims as claims
    from bench.paper_runs import plan

    requests = opts.requests or (150 if opts.quick else 10000)
    instances = opts.instances or (4 if opts.quick else 16)
    jobs = opts.jobs or os.cpu_count() or 1
    specs = plan(requests, instances, opts.seed, quick=opts.quick, all_rates=opts.all_rates)
    t0 = time.perf_counter()
    rows = execute(specs, jobs)
    wall = time.perf_counter() - t0
    print(f"bench paper: {len(rows)} simulated runs, {instances} x llama7b-a10, {requests} requests each, "
          f"seed {opts.seed}, {jobs} jobs; {wall:.0f} s wall")
    groups = {e: [r for r in rows if r["experiment"] == e] for e in ("serving", "priority", "scaling", "threshold")}
    if groups["serving"]:
        print(serving_tables(groups["serving"]))
        print(versus_table(groups["serving"]))
        print(claims.fig11_table(groups["serving"]))
    if groups["priority"]:
        print(priority_table(groups["priority"]))
        print(claims.fig13_table(groups["priority"]))
    if groups["scaling"]:
        print(scaling_table(groups["scaling"]))
        print(claims.fig14_table(groups["scaling"]))
    if groups["threshold"]:
        print(scaling_table(groups["threshold"]))
        print(claims.fig15_table(groups["threshold"]))
        below = claims.below_curve(groups["threshold"])
        if below is not None:
            print(f"kvferry below load's curve (P99 prefill at the same average instances): {below[0]} of the "
                  f"{below[1]} points inside load's instance range ({below[2]} outside it)")
    if opts.plots:
        from bench.paper_plots import plot_all

        files = plot_all(rows, opts.plots)
        print(f"\n{len(files)} plots in {opts.plots}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], f, indent=1)
    return 0
