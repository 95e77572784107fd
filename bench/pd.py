"""`kvferry bench pd`: prefill/decode disaggregation on the simulator — colocated vs fixed P:D vs adaptive.

Prefill-heavy traces on 16 `llama7b-a10` instances by default: `2048-256` and `1024-128` (fixed
lengths), and `shift` (its first half 2048-256, its second half 128-512: the mix turns from
prefill- to decode-heavy). Modes: `colocated` (every instance mixed: today's kvferry), `pd-P:D`
(P prefill and D decode instances: a request moves to a decode instance by live migration as
soon as its first token is out, `policy.pd`), `adaptive` (starting from the first P:D, decode
instances take prefills under a prefill backlog and prefill instances keep their decodes when
the decode side is short, with hysteresis). Per run: TTFT, ITL and TPOT (P50/P99), goodput
under `--ttft-slo` / `--tpot-slo` (requests/s meeting both), the hand-offs and their downtime.
`--json` writes one row per (trace, rate, mode) with `trace`, `rate`, `mode`, `ttft_p99`,
`itl_p99`, `tpot_p99`, `goodput` and the rest.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

TRACES = {"2048-256": "fixed:2048-fixed:256", "1024-128": "fixed:1024-fixed:128", "shift": None}
# Requests/s on 16 instances (scaled with --instances): about 80-90 % of colocated capacity.
RATES = {"2048-256": (4.0,), "1024-128": (9.0,), "shift": (4.0,)}
MODES = ("colocated", "pd-4:12", "pd-6:10", "adaptive")


@dataclass
class Options:
    """`kvferry bench pd`'s settings (the flags, same names; their defaults are the CLI's)."""

    traces: str
    rates: str | None
    modes: str
    requests: int | None  # None: 1500 (--quick: 200)
    instances: int | None  # None: 16 (--quick: 4)
    ttft_slo: float
    tpot_slo: float
    seed: int
    quick: bool
    jobs: int | None
    json: str | None


def build_trace(name: str, requests: int, rate: float, seed: int) -> list:
    from workload.traces import generate

    if TRACES[name] is not None:
        return generate(requests, rate, 1.0, TRACES[name], seed=seed)
    half = requests // 2
    first = generate(half, rate, 1.0, "fixed:2048-fixed:256", seed=seed)
    second = generate(requests - half, rate, 1.0, "fixed:128-fixed:512", seed=seed + 1)
    start = first[-1].arrival_s if first else 0.0
    return first + [replace(r, arrival_s=start + r.arrival_s) for r in second]


def parse_mode(mode: str, instances: int, first_split: tuple[int, int]) -> tuple[str, int, int]:
    """(pd_mode, prefill instances, decode instances) of a mode name."""
    if mode == "colocated":
        return "off", 0, 0
    if mode == "adaptive":
        return "adaptive", *first_split
    if mode.startswith("pd-"):
        p, d = (int(x) for x in mode[3:].split(":"))
        if p < 1 or d < 1 or p + d > instances:
            raise ValueError(f"{mode}: P and D must be >= 1 and P + D <= {instances}")
        return "fixed", p, d
    raise ValueError(f"unknown mode {mode!r} (colocated, pd-P:D, adaptive)")


def scaled(mode: str, instances: int) -> str:
    """A pd-P:D mode written for 16 instances, scaled to `instances` (at least 1 each)."""
    if not mode.startswith("pd-") or instances == 16:
        return mode
    p, d = (int(x) for x in mode[3:].split(":"))
    p2 = max(1, round(p * instances / 16))
    return f"pd-{p2}:{max(1, min(instances - p2, round(d * instances / 16)))}"


def run_one(trace_name: str, rate: float, mode: str, requests: int, instances: int, seed: int,
            slo: tuple[float, float], first_split: tuple[int, int]) -> dict[str, Any]:
    from policy import named_policy
    from simulator.cluster import simulate
    from simulator.config import SimConfig
    from workload.metrics import SLO

    t0 = time.perf_counter()
    pd_mode, p, d = parse_mode(mode, instances, first_split)
    trace = build_trace(trace_name, requests, rate, seed)
    res = simulate(trace, named_policy("kvferry", pd_mode=pd_mode),
                   SimConfig(instances=instances, prefill_instances=p, decode_instances=d),
                   SLO(ttft_s=slo[0], tpot_s=slo[1]))
    s = res.summary
    m = s["migration"]
    pd = s.get("pd", {})
    return {"experiment": "pd", "trace": trace_name, "rate": rate, "mode": mode, "requests": len(trace),
            "instances": instances, "prefill_instances": p, "decode_instances": d, "seed": seed,
            "ttft_p50": s["ttft"]["median"], "ttft_p99": s["ttft"]["p99"],
            "itl_p50": s["itl"]["median"], "itl_p99": s["itl"]["p99"],
            "tpot_p50": s["tpot"]["median"], "tpot_p99": s["tpot"]["p99"],
            "goodput": s.get("goodput"), "throughput": s["output_throughput"], "completed": s["completed"],
            "ttft_slo_s": slo[0], "tpot_slo_s": slo[1],
            "handoffs": pd.get("started", 0), "handoffs_deferred": pd.get("no_target", 0),
            "role_changes": pd.get("role_changes", 0), "migrations": m["committed"],
            "handoff_downtime_ms_mean": m["downtime_ms_mean"], "handoff_downtime_ms_max": m["downtime_ms_max"],
            "blocks_moved": m["blocks_moved"], "preemptions": s["preemptions"],
            "wall_s": time.perf_counter() - t0}


def table(rows: list[dict[str, Any]]) -> str:
    from workload.report import table as fmt

    def f(v: float | None, d: int = 3) -> str:
        return "-" if v is None else f"{v:,.{d}f}"

    out = []
    for name in dict.fromkeys(r["trace"] for r in rows):
        lines = [[f"{r['rate']:g}", r["mode"], f(r["ttft_p50"], 2), f(r["ttft_p99"], 2), f(r["itl_p50"]),
                  f(r["itl_p99"]), f(r["tpot_p99"]), f(r["goodput"], 2), str(r["handoffs"]),
                  f(r["handoff_downtime_ms_mean"], 1), str(r["role_changes"])]
                 for r in rows if r["trace"] == name]
        out.append(f"{name} ({rows[0]['instances']} instances, SLO TTFT {rows[0]['ttft_slo_s']:g} s, "
                   f"TPOT {rows[0]['tpot_slo_s']:g} s)\n" + fmt(lines, [
                       "req/s", "mode", "TTFT P50 s", "TTFT P99 s", "ITL P50 s", "ITL P99 s", "TPOT P99 s",
                       "goodput req/s", "hand-offs", "migr. pause ms", "role changes"]))
    return "\n\n".join(out)


def run(opts: Options) -> int:
    instances = opts.instances or (4 if opts.quick else 16)
    requests = opts.requests or (200 if opts.quick else 1500)
    try:
        traces = [t.strip() for t in opts.traces.split(",") if t.strip()]
        if not traces or any(t not in TRACES for t in traces):
            raise ValueError(f"--traces: choose from {', '.join(TRACES)}")
        modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
        if opts.modes == ",".join(MODES):  # the default splits are written for 16 instances
            modes = list(dict.fromkeys(scaled(m, instances) for m in modes))
        pd_modes = [m for m in modes if m.startswith("pd-")]
        first = parse_mode(pd_modes[0], instances, (0, 0))[1:] if pd_modes else \
            (max(1, instances // 4), instances - max(1, instances // 4))
        for m in modes:
            parse_mode(m, instances, first)
        given = [float(x) for x in opts.rates.split(",")] if opts.rates else None
        if given is not None and (not given or any(not r > 0 for r in given)):
            raise ValueError("--rates: positive numbers, comma-separated")
        if not opts.ttft_slo > 0 or not opts.tpot_slo > 0:
            raise ValueError("--ttft-slo and --tpot-slo must be positive")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    jobs = [(name, rate, mode) for name in traces
            for rate in (given or [r * instances / 16 for r in RATES[name]]) for mode in modes]
    slo = (opts.ttft_slo, opts.tpot_slo)
    with ProcessPoolExecutor(max_workers=opts.jobs or None) as pool:
        futures = [pool.submit(run_one, n, r, m, requests, instances, opts.seed, slo, first) for n, r, m in jobs]
        rows = []
        for (n, r, m), fut in zip(jobs, futures):
            row = fut.result()
            print(f"[{n} {r:g} req/s {m}: {row['wall_s']:.1f} s]", file=sys.stderr, flush=True)
            rows.append(row)
    print(table(rows))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
