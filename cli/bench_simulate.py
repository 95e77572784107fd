"""`kvferry bench simulate`: one trace on a simulated cluster, in virtual time.

N instances of the engine (its own request scheduler and block manager) with the sim executor and
a latency profile (default `llama7b-a10`: LLaMA-7B on one A10, the paper's setup), dispatched,
migrated and scaled by the very policy code the live scheduler runs (`--policy`). Migrations use
the engine's migration API, each pre-copy stage costed by a transfer model (bytes / bandwidth +
per-message overhead). Deterministic for a seed. Prints latency percentiles (vllm bench serve's
definitions), preemptions, KV fragmentation, migrations and instance-seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cli.common import positive_int
from cli.trace_args import add_trace_args, trace_from_args, trace_label


def register(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("simulate", help="a trace on a simulated cluster (virtual time, the real policy code)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="kvferry", help="rr, load, kvferry, kvferry-nopri (default: kvferry)")
    p.add_argument("--instances", type=positive_int, default=16, help="instances (initial, with --scale) (default: 16)")
    add_trace_args(p, requests=10000)
    add_sim_args(p)
    p.add_argument("--json", metavar="FILE", help="write the summary (and settings) as one JSON object to FILE")
    p.set_defaults(func=run)


def add_sim_args(p: argparse.ArgumentParser) -> None:
    """Cluster settings shared with `bench paper`."""
    from engine.sim.latency import PROFILES

    p.add_argument("--latency", default="llama7b-a10", choices=sorted(PROFILES),
                   help="the sim executor's latency profile (default: llama7b-a10)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="batch limit per instance (default: 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=0,
                   help="token budget per step; 0: whole prompts in one step (default: 0)")
    p.add_argument("--migration-gbps", type=float, default=10.0, help="KV transfer bandwidth, GB/s (default: 10)")
    p.add_argument("--migration-overhead-ms", type=float, default=1.0, help="per-message overhead (default: 1)")
    p.add_argument("--scale", metavar="MIN:MAX", help="auto-scale between MIN and MAX instances (policy.scaling)")
    p.add_argument("--scale-up-below", type=float, help="scale up when the average freeness is below this")
    p.add_argument("--scale-down-above", type=float, help="scale down when the average freeness is above this")
    p.add_argument("--startup-s", type=float, default=10.0, help="seconds until a started instance serves (default: 10)")


def build(args: argparse.Namespace, instances: int):  # noqa: ANN201 - (PolicyConfig, SimConfig)
    """The policy and the cluster settings the options describe (ValueError on bad values)."""
    from policy import named_policy
    from simulator.config import SimConfig, TransferModel

    overrides: dict[str, Any] = {}
    scaling = bool(getattr(args, "scale", None))
    if scaling:
        try:
            lo, hi = (int(x) for x in args.scale.split(":"))
        except ValueError:
            raise ValueError(f"--scale expects MIN:MAX, got {args.scale!r}") from None
        if not 1 <= lo <= hi:
            raise ValueError("--scale needs 1 <= MIN <= MAX")
        overrides.update(min_instances=lo, max_instances=hi)
    for name in ("scale_up_below", "scale_down_above"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    policy = named_policy(args.policy, **overrides)
    cfg = SimConfig(instances=instances, latency=args.latency, max_num_seqs=args.max_num_seqs,
                    max_num_batched_tokens=args.max_num_batched_tokens,
                    transfer=TransferModel(args.migration_gbps, args.migration_overhead_ms / 1000.0),
                    scaling=scaling, startup_s=args.startup_s)
    return policy, cfg


def run(args: argparse.Namespace) -> int:
    from engine.errors import ConfigError
    from simulator.cluster import simulate
    from workload.metrics import SLO
    from workload.report import format_summary

    try:
        slo = SLO.parse(args.goodput)
        policy, cfg = build(args, args.instances)
        trace = trace_from_args(args)
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = simulate(trace, policy, cfg, slo)
    s = result.summary
    title = (f"simulated: policy {policy.name}, {args.instances} x {cfg.latency}, {trace_label(args)}\n"
             f"({s['virtual_s']:,.0f} virtual s in {result.wall_s:.1f} s wall, {s['steps']:,} engine steps)")
    print(format_summary(s, title))
    if args.json:
        out = {"kind": "simulate", "policy": policy.name, "trace": args.trace if not args.trace_file else args.trace_file,
               "rate": args.rate, "cv": args.cv, "requests": len(trace), "seed": args.seed,
               "high_priority_fraction": args.high_priority_fraction, "instances": args.instances,
               "latency": cfg.latency, "summary": s}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
