"""The runs of `kvferry bench paper` (the Llumnix paper's comparisons on the simulator): what each
run is, and running one into a flat result row.

The paper's setup (docs/design.md §1: 16 LLaMA-7B instances on A10s, power-law lengths, Poisson and
Gamma arrivals) does not include its request rates, so the rates here span each trace from light load to
about the memory-bound capacity of 16 `llama7b-a10` instances (the request rate at which the KV
caches would be full on average: ~17 req/s for 256-256, ~6.7 for 512-512, ~8 for 128-512, ~43
for 512-128), where the policies differ most. Rates scale with the instance count (`--quick`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SERVING_TRACES = ("256-256", "512-512", "128-512", "512-128")
SERVING_RATES = {"256-256": (10.0, 13.0, 16.0), "512-512": (4.0, 5.0, 6.0), "128-512": (5.0, 6.0, 7.0),
                 "512-128": (30.0, 38.0, 46.0)}
SERVING_CVS = (1.0, 4.0)  # Poisson, Gamma CV 4
SERVING_POLICIES = ("kvferry", "load", "rr")
PRIORITY_TRACE, PRIORITY_RATE, PRIORITY_CVS = "256-256", 13.0, (2.0, 4.0, 6.0, 8.0)
PRIORITY_FRACTION = 0.1
PRIORITY_POLICIES = ("kvferry", "kvferry-nopri")
SCALING_TRACE, SCALING_RATE = "512-512", 4.0
# (scale up below, scale down above) average freeness: from eager scale-in (too few instances for
# this trace's long requests) to keeping many instances.
SCALING_THRESHOLDS = ((10.0, 60.0), (15.0, 90.0), (20.0, 120.0), (40.0, 240.0))
SCALING_POLICIES = ("kvferry", "load")
CDF_POINTS = 200  # quantiles kept per latency for the CDF plots


@dataclass(frozen=True)
class RunSpec:
    """One simulation of the paper benchmark."""

    experiment: str  # serving | priority | scaling
    trace: str
    rate: float
    cv: float
    policy: str
    requests: int
    instances: int
    seed: int = 0
    high_priority_fraction: float = 0.0
    scale_up_below: float | None = None
    scale_down_above: float | None = None
    cdf: bool = False  # keep latency quantiles for the CDF plots


def plan(requests: int, instances: int, seed: int, quick: bool = False) -> list[RunSpec]:
    """Every run of the benchmark; `quick`: one trace, two rates, two CVs of each sweep."""
    k = instances / 16.0
    traces = SERVING_TRACES[:1] if quick else SERVING_TRACES
    specs: list[RunSpec] = []
    for trace in traces:
        rates = SERVING_RATES[trace][1:] if quick else SERVING_RATES[trace]
        for cv in SERVING_CVS:
            for rate in rates:
                for pol in SERVING_POLICIES:
                    specs.append(RunSpec("serving", trace, rate * k, cv, pol, requests, instances, seed,
                                         cdf=rate == rates[-1]))
    for cv in PRIORITY_CVS[:2] if quick else PRIORITY_CVS:
        for pol in PRIORITY_POLICIES:
            specs.append(RunSpec("priority", PRIORITY_TRACE, PRIORITY_RATE * k, cv, pol, requests, instances, seed,
                                 high_priority_fraction=PRIORITY_FRACTION))
    for up, down in SCALING_THRESHOLDS[1:3] if quick else SCALING_THRESHOLDS:
        for pol in SCALING_POLICIES:
            specs.append(RunSpec("scaling", SCALING_TRACE, SCALING_RATE * k, 1.0, pol, requests, instances, seed,
                                 scale_up_below=up, scale_down_above=down))
    return specs


def run_spec(spec: RunSpec) -> dict[str, Any]:
    """Simulate one run; the flat row of `bench paper`'s JSON (latencies in seconds)."""
    from policy import named_policy
    from simulator.cluster import simulate
    from simulator.config import SimConfig
    from workload import traces
    from workload.metrics import paper_row

    t0 = time.perf_counter()
    scaling = spec.experiment == "scaling"
    overrides: dict[str, Any] = {}
    if scaling:
        overrides = dict(min_instances=1, max_instances=spec.instances, scale_up_below=spec.scale_up_below,
                         scale_down_above=spec.scale_down_above)
    policy = named_policy(spec.policy, **overrides)
    trace = traces.generate(spec.requests, spec.rate, spec.cv, spec.trace, spec.high_priority_fraction, spec.seed)
    res = simulate(trace, policy, SimConfig(instances=spec.instances, scaling=scaling))
    s = res.summary
    row: dict[str, Any] = {**asdict(spec), **paper_row(s), "instance_seconds": s["instance_seconds"]}
    row.pop("cdf")
    row.update(ttft_p50=s["ttft"]["median"], e2e_p50=s["e2e"]["median"], decode_p50=s["tpot"]["median"],
               preemptions=s["preemptions"], migrations=s["migration"]["committed"],
               fragmentation=s["fragmentation"]["free_share_while_blocked"],
               max_instances_live=s["instances"]["max_live"], virtual_s=s["virtual_s"],
               wall_s=time.perf_counter() - t0)
    if "classes" in s:
        row["classes"] = {name: paper_row(c) for name, c in s["classes"].items()}
    if spec.cdf:
        q = np.linspace(0, 100, CDF_POINTS)
        done = [r for r in res.records if r.ok]
        row["_cdf"] = {"ttft": np.percentile([r.ttft for r in done], q).tolist(),
                       "decode": np.percentile([r.tpot for r in done if r.tpot is not None], q).tolist(),
                       "e2e": np.percentile([r.e2e for r in done], q).tolist()}
    return row
