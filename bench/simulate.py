"""`kvferry bench simulate`: one trace on a simulated cluster, in virtual time.

N instances of the engine (its own request scheduler and block manager) with the sim executor and
a latency profile (default `llama7b-a10`: LLaMA-7B on one A10, the paper's setup), dispatched,
migrated and scaled by the very policy code the live scheduler runs (`--policy`). Migrations use
the engine's migration API, each pre-copy stage costed by a transfer model (bytes / bandwidth +
per-message overhead). Deterministic for a seed. Prints latency percentiles (vllm bench serve's
definitions), preemptions, KV fragmentation, migrations and instance-seconds.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from bench.trace import TraceOptions, build_trace, trace_label


@dataclass
class Options(TraceOptions):
    """`kvferry bench simulate`'s settings (the flags, same names; their defaults are the CLI's)."""

    policy: str
    instances: int
    latency: str
    max_num_seqs: int
    max_num_batched_tokens: int
    migration_gbps: float
    migration_overhead_ms: float
    scale: str | None
    scale_up_below: float | None
    scale_down_above: float | None
    startup_s: float
    json: str | None


def build(opts: Options, instances: int):  # noqa: ANN201 - (PolicyConfig, SimConfig)
    """The policy and the cluster settings the options describe (ValueError on bad values)."""
    from policy import named_policy
    from simulator.config import SimConfig, TransferModel

    overrides: dict[str, Any] = {}
    scaling = bool(opts.scale)
    if scaling:
        try:
            lo, hi = (int(x) for x in opts.scale.split(":"))
        except ValueError:
            raise ValueError(f"--scale expects MIN:MAX, got {opts.scale!r}") from None
        if not 1 <= lo <= hi:
            raise ValueError("--scale needs 1 <= MIN <= MAX")
        overrides.update(min_instances=lo, max_instances=hi)
    for name in ("scale_up_below", "scale_down_above"):
        if getattr(opts, name) is not None:
            overrides[name] = getattr(opts, name)
    policy = named_policy(opts.policy, **overrides)
    cfg = SimConfig(instances=instances, latency=opts.latency, max_num_seqs=opts.max_num_seqs,
                    max_num_batched_tokens=opts.max_num_batched_tokens,
                    transfer=TransferModel(opts.migration_gbps, opts.migration_overhead_ms / 1000.0),
                    scaling=scaling, startup_s=opts.startup_s)
    return policy, cfg


def run(opts: Options) -> int:
    from engine.errors import ConfigError
    from simulator.cluster import simulate
    from workload.metrics import SLO
    from workload.report import format_summary

    try:
        slo = SLO.parse(opts.goodput)
        policy, cfg = build(opts, opts.instances)
        trace = build_trace(opts)
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = simulate(trace, policy, cfg, slo)
    s = result.summary
    title = (f"simulated: policy {policy.name}, {opts.instances} x {cfg.latency}, {trace_label(opts)}\n"
             f"({s['virtual_s']:,.0f} virtual s in {result.wall_s:.1f} s wall, {s['steps']:,} engine steps)")
    print(format_summary(s, title))
    if opts.json:
        out = {"kind": "simulate", "policy": policy.name, "trace": opts.trace if not opts.trace_file else opts.trace_file,
               "rate": opts.rate, "cv": opts.cv, "requests": len(trace), "seed": opts.seed,
               "high_priority_fraction": opts.high_priority_fraction, "instances": opts.instances,
               "latency": cfg.latency, "summary": s}
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
