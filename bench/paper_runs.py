"""The runs of `kvferry bench paper` (the Llumnix paper's Figures 11, 13, 14 and 15 on the simulator,
at the settings of the paper's artifact, branch `osdi24ae` of github.com/AlibabaPAI/llumnix): what each
run is, and running one into a flat result row.

Every run: 16 `llama7b-a10` instances (LLaMA-7B on one A10), Zipf lengths (`workload.traces`),
migration checked every 4 engine steps (a ~0.2 s round: `migration_interval_s`), 10,000 requests.
- Fig 11, serving: Poisson arrivals; kvferry (with the artifact's migrate threshold per trace, for
  both sources and destinations) against `load` (the paper's INFaaS++: freeness dispatch, no
  migration) and `rr`; `max_num_batched_tokens` 12,800. The paper's rates per trace; by default
  the lowest, middle and highest of each range (`--all-rates`: every one).
- Fig 13, priorities: 128-128 at 26 req/s, Gamma CV 2, 4, 6, 8, 10 % high priority; kvferry (load
  cap 1,600 tokens) against kvferry-nopri; threshold 3; 12,000 batched tokens.
- Fig 14, auto-scaling: 512-512, 8 instances at start, 1..16, scale up below pooled freeness 10,
  down above 60; Poisson 2.0-3.0 req/s and Gamma CV 2-6 at 2 req/s; kvferry against `load` whose
  scale-in waits for requests to finish (no migration); cost = average instances.
- Fig 15: Gamma CV 2 at 2 req/s, scale-up thresholds 5/25/45/65/85 (down = up + 50).
`--quick`: 4 instances, a few points per figure, rates scaled by the instance count.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# trace -> (the paper's request rates, the artifact's migrate threshold)
SERVING = {"128-128": ((32.0, 33.0, 34.0, 35.0, 36.0, 37.0, 38.0), 3.0),
           "256-256": ((7.4, 7.5, 7.6, 7.7, 7.8, 7.9, 8.0), 10.0),
           "512-512": ((2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2), 3.0),
           "128-512": ((4.10, 4.15, 4.20, 4.25, 4.30, 4.35, 4.40), 10.0),
           "512-128": ((10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 22.0), 3.0)}
SERVING_POLICIES = ("kvferry", "load")  # and rr at each trace's highest rate (for the CDFs)
SERVING_BATCHED_TOKENS = 12800
PRIORITY_TRACE, PRIORITY_RATE, PRIORITY_CVS, PRIORITY_FRACTION = "128-128", 26.0, (2.0, 4.0, 6.0, 8.0), 0.1
PRIORITY_POLICIES = ("kvferry", "kvferry-nopri")
SCALING_TRACE, SCALING_START, SCALING_MAX = "512-512", 8, 16
SCALING_POISSON = (2.0, 2.2, 2.4, 2.6, 2.8, 3.0)
SCALING_GAMMA_RATE, SCALING_GAMMA_CVS = 2.0, (2.0, 3.0, 4.0, 5.0, 6.0)
SCALING_THRESHOLDS = (10.0, 60.0)
SWEEP_CV, SWEEP_UP = 2.0, (5.0, 25.0, 45.0, 65.0, 85.0)  # Fig 15: down = up + 50
SCALING_POLICIES = ("kvferry", "load")
OTHER_BATCHED_TOKENS = 12000
MIGRATION_INTERVAL_S = 0.2  # every 4 steps of ~50 ms
CDF_POINTS = 200  # quantiles kept per latency for the CDF plots


@dataclass(frozen=True)
class RunSpec:
    """One simulation of the paper benchmark."""

    experiment: str  # serving | priority | scaling | threshold
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
    migrate_threshold: float = 3.0
    max_num_batched_tokens: int = OTHER_BATCHED_TOKENS
    start_instances: int | None = None  # scaling: instances at start (None: `instances`)
    cdf: bool = False  # keep latency quantiles for the CDF plots


def plan(requests: int, instances: int, seed: int, quick: bool = False, all_rates: bool = False) -> list[RunSpec]:
    """Every run of the benchmark (see the module docstring)."""
    k = instances / 16.0
    specs: list[RunSpec] = []
    for trace, (rates, thr) in list(SERVING.items())[:1 if quick else None]:
        pick = rates if all_rates else (rates[0], rates[len(rates) // 2], rates[-1])
        if quick:
            pick = (rates[0], rates[-1])
        for rate in pick:
            pols = SERVING_POLICIES + (("rr",) if rate == pick[-1] else ())
            for pol in pols:
                specs.append(RunSpec("serving", trace, rate * k, 1.0, pol, requests, instances, seed,
                                     migrate_threshold=thr, max_num_batched_tokens=SERVING_BATCHED_TOKENS,
                                     cdf=rate == pick[-1]))
    for cv in PRIORITY_CVS[::3] if quick else PRIORITY_CVS:
        for pol in PRIORITY_POLICIES:
            specs.append(RunSpec("priority", PRIORITY_TRACE, PRIORITY_RATE * k, cv, pol, requests, instances, seed,
                                 high_priority_fraction=PRIORITY_FRACTION))
    start = max(1, round(SCALING_START * k))
    up, down = SCALING_THRESHOLDS
    points = [(r, 1.0) for r in (SCALING_POISSON[::5] if quick else SCALING_POISSON)]
    points += [(SCALING_GAMMA_RATE, cv) for cv in (SCALING_GAMMA_CVS[::4] if quick else SCALING_GAMMA_CVS)]
    for rate, cv in points:
        for pol in SCALING_POLICIES:
            specs.append(RunSpec("scaling", SCALING_TRACE, rate * k, cv, pol, requests, instances, seed,
                                 scale_up_below=up, scale_down_above=down, start_instances=start))
    for t in SWEEP_UP[::4] if quick else SWEEP_UP:
        for pol in SCALING_POLICIES:
            specs.append(RunSpec("threshold", SCALING_TRACE, SCALING_GAMMA_RATE * k, SWEEP_CV, pol, requests,
                                 instances, seed, scale_up_below=t, scale_down_above=t + 50.0, start_instances=start))
    return specs


def policy_of(spec: RunSpec) -> Any:
    """The PolicyConfig of a run: the artifact's thresholds; with scaling, the bounds, and for the
    baseline a scale-in that waits for requests to finish (no migration anywhere)."""
    from policy import named_policy

    over: dict[str, Any] = dict(migrate_out_below=spec.migrate_threshold, migrate_in_above=spec.migrate_threshold,
                                migration_interval_s=MIGRATION_INTERVAL_S)
    if spec.scale_up_below is not None:
        over.update(min_instances=1, max_instances=spec.instances, scale_up_below=spec.scale_up_below,
                    scale_down_above=spec.scale_down_above)
    if spec.policy in ("load", "rr"):
        over["drain_migrates"] = False
    return named_policy(spec.policy, **over)


def run_spec(spec: RunSpec) -> dict[str, Any]:
    """Simulate one run; the flat row of `bench paper`'s JSON (latencies in seconds)."""
    from simulator.cluster import simulate
    from simulator.config import SimConfig
    from workload import traces
    from workload.metrics import paper_row

    t0 = time.perf_counter()
    scaling = spec.scale_up_below is not None
    trace = traces.generate(spec.requests, spec.rate, spec.cv, spec.trace, spec.high_priority_fraction, spec.seed)
    cfg = SimConfig(instances=spec.start_instances or spec.instances, scaling=scaling,
                    max_num_batched_tokens=spec.max_num_batched_tokens)
    res = simulate(trace, policy_of(spec), cfg)
    s = res.summary
    row: dict[str, Any] = {**asdict(spec), **paper_row(s), "instance_seconds": s["instance_seconds"]}
    row.pop("cdf")
    row.update(ttft_p50=s["ttft"]["median"], e2e_p50=s["e2e"]["median"], decode_p50=s["tpot"]["median"],
               preemptions=s["preemptions"], migrations=s["migration"]["committed"],
               fragmentation=s["fragmentation"]["free_share_while_blocked"],
               max_instances_live=s["instances"]["max_live"], virtual_s=s["virtual_s"],
               wall_s=time.perf_counter() - t0)
    if scaling:
        row["avg_instances"] = s["instance_seconds"] / max(1e-9, s["virtual_s"])
    if "classes" in s:
        row["classes"] = {name: paper_row(c) for name, c in s["classes"].items()}
    if spec.cdf:
        q = np.linspace(0, 100, CDF_POINTS)
        done = [r for r in res.records if r.ok]
        row["_cdf"] = {"ttft": np.percentile([r.ttft for r in done], q).tolist(),
                       "decode": np.percentile([r.tpot for r in done if r.tpot is not None], q).tolist(),
                       "e2e": np.percentile([r.e2e for r in done], q).tolist()}
    return row
