"""`kvferry bench KIND`: the command line of the benchmarks in bench/ (one subcommand per kind).

Each kind's flags are parsed here into that benchmark's `Options` (a dataclass whose fields are the
flags' dests), then `bench.<kind>.run(options)` runs it and returns the exit status. The flags'
defaults live here; the benchmarks' descriptions are their modules' docstrings.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import bench
import bench.cached_prefill
import bench.chaos
import bench.engine
import bench.frontend
import bench.migration
import bench.overhead
import bench.paper
import bench.pd
import bench.prefix
import bench.restart
import bench.serve
import bench.simulate
import bench.transfer
from cli.common import add_model_args, int_list, positive_int
from cli.trace_args import add_trace_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark", description="Benchmarks (kvferry bench KIND --help).")
    kinds = p.add_subparsers(dest="bench_kind", metavar="KIND", title="kinds")
    kinds.required = True
    for add in (_engine, _cached_prefill, _frontend, _migration, _transfer, _simulate, _paper, _prefix, _pd, _serve,
                _chaos, _restart, _overhead):
        add(kinds)


def options(args: argparse.Namespace, cls: type) -> Any:
    """The benchmark's Options from the parsed flags (fields with a default and no flag keep the default)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)})


def _call(run: Callable[[Any], int], cls: type) -> Callable[[argparse.Namespace], int]:
    """`func` of a kind: flags -> Options -> run; a bench.UsageError is reported as a usage error (exit 2)."""
    def func(args: argparse.Namespace) -> int:
        from cli.main import CLIError

        try:
            return run(options(args, cls))
        except bench.UsageError as exc:
            raise CLIError(str(exc)) from None

    return func


def _engine(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("engine", help="decode and prefill throughput of the real engine (and vLLM if installed)",
                         description=bench.engine.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model="smollm2")
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 4, 16, 64], help="decode batch sizes (default: 1,4,16,64)")
    p.add_argument("--decode-tokens", type=positive_int, default=32, help="timed decode steps per batch (default: 32)")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens of the decode runs (default: 128)")
    p.add_argument("--prefill-prompts", type=positive_int, default=8, help="prompts of the prefill run (default: 8)")
    p.add_argument("--prefill-len", type=positive_int, default=256, help="tokens per prefill prompt (default: 256)")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="measure each batch size this many times and keep the fastest (vLLM too; default: 1)")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help=f"measure a batch size again, up to N times, while other processes used more than "
                        f"{bench.engine.BUSY_CORES} cores during it (for shared machines; default: 0)")
    p.add_argument("--fit", action="store_true", help="fit the sim's LatencyModel to the measured steps and print it")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM comparison even where vLLM is installed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads for our engine (default: torch's choice, one per core)")
    p.set_defaults(func=_call(bench.engine.run, bench.engine.Options))


def _cached_prefill(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("cached-prefill", help="a prefill whose prompt prefix is cached vs a cold one, on the real engine",
                         description=bench.cached_prefill.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model="smollm2")
    p.add_argument("--prompt-len", type=positive_int, default=2048, help="tokens of the prompt (default: 2048)")
    p.add_argument("--cached", type=positive_int, default=1920,
                   help="leading tokens of it in the cache, a multiple of the block size (default: 1920)")
    p.add_argument("--repeat", type=positive_int, default=8, help="timed prefills of each kind (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    p.set_defaults(func=_call(bench.cached_prefill.run, bench.cached_prefill.Options))


def _frontend(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("frontend", help="requests/s, streamed tokens/s and dispatch latency of one frontend (sim)",
                         description=bench.frontend.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per throughput phase (default: 10)")
    p.add_argument("--concurrency", type=positive_int, default=64,
                   help="concurrent connections of the short-request phase (default: 64)")
    p.add_argument("--streams", type=positive_int, default=128,
                   help="concurrent streams (default: 128; 64 per sim worker keeps the frontend the bottleneck)")
    p.add_argument("--stream-tokens", type=positive_int, default=512, help="max_tokens of each stream (default: 512)")
    p.add_argument("--prompt-len", type=positive_int, default=16, help="prompt token ids per request (default: 16)")
    p.add_argument("--workers", type=positive_int, default=2, help="sim workers (default: 2)")
    p.add_argument("--client-procs", type=positive_int, default=1,
                   help="client processes the connections are spread over (default: 1)")
    p.add_argument("--instances", type=positive_int, default=64, help="registered instances for dispatch (default: 64)")
    p.add_argument("--dispatch-requests", type=positive_int, default=5000,
                   help="timed dispatches (default: 5000)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: short,stream,sdk,dispatch")
    p.set_defaults(func=_call(bench.frontend.run, bench.frontend.Options))


def _migration(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("migration", help="downtime of live migration vs recompute vs blocking copy, by context",
                         description=bench.migration.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="tiny, smollm2, a HF folder or .gguf (default: smollm2)")
    p.add_argument("--lengths", type=int_list, default=bench.migration.DEFAULT_LENGTHS,
                   help=f"context lengths (default: {','.join(map(str, bench.migration.DEFAULT_LENGTHS))})")
    p.add_argument("--json", metavar="FILE", help="write {'records': [...], ...} to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="plot downtime vs context (log-log) to FILE.png")
    p.add_argument("--engine", choices=("torch", "vllm"), default="torch",
                   help="the workers' engine (default: torch; vllm needs `make install-vllm`)")
    p.add_argument("--path", choices=("auto", "shm", "frames"), default="auto",
                   help="KV data path between the workers (default: auto, shm on one host)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="weights, activations and KV cache dtype (default: bfloat16)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads per worker (default: max(1, cores // 2))")
    p.add_argument("--migrations", type=positive_int, default=3,
                   help="live and blocking migrations per length (directions alternate; downtimes are their "
                        "medians; one recompute either way; default: 3)")
    p.add_argument("--retry-busy", type=int, default=0, metavar="N",
                   help=f"measure a length again, up to N times, while other processes used more than {bench.migration.BUSY_CORES} "
                        "cores during it, and keep the least disturbed round (for shared machines; default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds any one phase (start, prefill, migration, abort) may take (default: 300)")
    p.add_argument("--no-warmup", action="store_true",
                   help="measure from the first migration on (default: one unrecorded round at the shortest length "
                        "first, which pays the one-off staging buffer set-up)")
    p.add_argument("--log-dir", help="keep the workers' logs in this folder (default: a temp folder, "
                                     "shown on failure and removed)")
    p.set_defaults(func=_call(bench.migration.run, bench.migration.Options))


def _transfer(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("transfer", help="GB/s of the KV transfer paths (shm, zmq frames) vs memcpy",
                         description=bench.transfer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    p.add_argument("--reps", type=positive_int, default=3, help="repetitions per size, best kept (default: 3)")
    p.add_argument("--sizes", default=",".join(bench.transfer.SIZES), help=f"comma-separated subset of {','.join(bench.transfer.SIZES)}")
    p.add_argument("--paths", default=",".join(bench.transfer.PATHS), help=f"comma-separated subset of {','.join(bench.transfer.PATHS)}")
    p.add_argument("--between-hosts", action="store_true",
                   help=f"also {bench.transfer.HOSTS_PATH} (the frames path between two network-namespace hosts "
                        "joined by veth pairs) and a live migration's downtime across the veth next to loopback "
                        "(needs root and iproute2)")
    p.add_argument("--migrations", type=positive_int, default=5,
                   help="live migrations per cluster for the downtime rows of --between-hosts (default: 5)")
    p.add_argument("--model", default="smollm2", help="the workers' model for those rows (default: smollm2)")
    p.add_argument("--clusters", default="one-host,two-hosts,two-hosts-curve",
                   help="which clusters those rows come from: a comma-separated subset of one-host (frames forced), "
                        "two-hosts, two-hosts-curve (default: all three)")
    p.add_argument("--context", type=positive_int, default=1024,
                   help="prompt tokens of the stream those rows migrate (default: 1024)")
    p.set_defaults(func=_call(bench.transfer.run, bench.transfer.Options))


def _simulate(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("simulate", help="a trace on a simulated cluster (virtual time, the real policy code)",
                         description=bench.simulate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="kvferry", help="rr, load, kvferry, kvferry-nopri (default: kvferry)")
    p.add_argument("--instances", type=positive_int, default=16, help="instances (initial, with --scale) (default: 16)")
    add_trace_args(p, requests=10000)
    add_sim_args(p)
    p.add_argument("--json", metavar="FILE", help="write the summary (and settings) as one JSON object to FILE")
    p.set_defaults(func=_call(bench.simulate.run, bench.simulate.Options))


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


def _paper(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("paper", help="the paper's comparisons on the simulator (tables, JSON, PNG plots)",
                         description=bench.paper.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write the runs as a JSON list to FILE")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--quick", action="store_true",
                   help="a small version: 4 instances, 150 requests, one trace, a few points per figure")
    p.add_argument("--requests", type=positive_int, help="requests per run (default: 10000, the paper's; --quick: 150)")
    p.add_argument("--instances", type=positive_int, help="instances (default: 16; --quick: 4); rates scale with it")
    p.add_argument("--all-rates", action="store_true",
                   help="Fig 11 at every rate of the paper's ranges (default: lowest, middle, highest)")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default: 0)")
    p.add_argument("--jobs", type=positive_int, help="runs in parallel processes (default: the CPU count)")
    p.set_defaults(func=_call(bench.paper.run, bench.paper.Options))


def _prefix(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("prefix", help="KV reuse on the simulator: rr / load / prefix / kvferry on traces with reuse",
                         description=bench.prefix.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default="multi-turn,system-prompt", help="comma-separated (default: both)")
    p.add_argument("--rates", help="comma-separated requests/s (default: multi-turn 16,20,24, system-prompt 8,12,16, scaled to the instances)")
    p.add_argument("--requests", type=positive_int, help="requests per run (default: 2000; --quick: 120)")
    p.add_argument("--instances", type=positive_int, help="instances (default: 16; --quick: 4)")
    p.add_argument("--policies", default=",".join(bench.prefix.POLICIES), help="comma-separated (default: all four)")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default: 0)")
    p.add_argument("--quick", action="store_true", help="a small version: 4 instances, 120 requests, one rate")
    p.add_argument("--json", metavar="FILE", help="write one row per (trace, rate, policy) as a JSON list to FILE")
    p.set_defaults(func=_call(bench.prefix.run, bench.prefix.Options))


def _pd(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("pd", help="prefill/decode disaggregation on the simulator: colocated vs P:D vs adaptive",
                         description=bench.pd.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default=",".join(bench.pd.TRACES), help="comma-separated (default: all three)")
    p.add_argument("--rates", help="comma-separated requests/s (default: 2048-256 4, 1024-128 9, shift 4, scaled "
                                   "to the instances)")
    p.add_argument("--modes", default=",".join(bench.pd.MODES),
                   help="comma-separated: colocated, pd-P:D, adaptive (default: %(default)s, its splits scaled to the instances)")
    p.add_argument("--requests", type=positive_int, help="requests per run (default: 1500; --quick: 200)")
    p.add_argument("--instances", type=positive_int, help="instances (default: 16; --quick: 4)")
    p.add_argument("--ttft-slo", type=float, default=10.0, help="goodput's TTFT bound, s (default: 10)")
    p.add_argument("--tpot-slo", type=float, default=0.1, help="goodput's TPOT bound, s (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default: 0)")
    p.add_argument("--quick", action="store_true", help="a small version: 4 instances, 200 requests")
    p.add_argument("--jobs", type=positive_int, help="runs in parallel processes (default: the CPU count)")
    p.add_argument("--json", metavar="FILE", help="write one row per (trace, rate, mode) as a JSON list to FILE")
    p.set_defaults(func=_call(bench.pd.run, bench.pd.Options))


def _serve(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("serve", help="replay a trace against a live cluster (HTTP or SDK) and measure latencies",
                         description=bench.serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--url", help="the frontend's HTTP base URL, e.g. http://127.0.0.1:8000")
    to.add_argument("--sdk", metavar="ENDPOINT", help="the frontend's SDK endpoint, e.g. tcp://127.0.0.1:17101")
    p.add_argument("--model", help="the model name for HTTP requests (default: the first of /v1/models)")
    add_trace_args(p, requests=200)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    p.add_argument("--scheduler", metavar="ENDPOINT", help="the scheduler, for its policy (default: from the config)")
    p.add_argument("--base-port", type=int, metavar="P", help="cluster base port (the scheduler is at P)")
    p.add_argument("--config", metavar="FILE", help="TOML cluster config (to find the scheduler)")
    p.add_argument("--json", metavar="FILE", help="write the summary (and settings) as one JSON object to FILE")
    p.set_defaults(func=_call(bench.serve.run, bench.serve.Options))


def _chaos(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("chaos", help="worker kills, drains and a scheduler restart under load (sim + torch tiny)",
                         description=bench.chaos.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    p.add_argument("--requests", type=positive_int, default=3000, help="requests in the chaos phase (default: 3000)")
    p.add_argument("--baseline-requests", type=int, default=1000,
                   help="requests in the undisturbed baseline phase (default: 1000; 0 skips it)")
    p.add_argument("--workers", type=positive_int, default=3, help="sim workers (default: 3)")
    p.add_argument("--concurrency", type=positive_int, default=48,
                   help="closed-loop clients (default: 48 = workers x max-num-seqs: near saturation)")
    p.add_argument("--profile", default="instant", help="sim latency profile (default: instant, a 1 ms step)")
    p.add_argument("--max-num-seqs", type=positive_int, default=16, help="batch size of each worker (default: 16)")
    p.add_argument("--max-waiting", type=positive_int, default=32, help="waiting queue of each worker (default: 32)")
    p.add_argument("--num-blocks", type=positive_int, default=160,
                   help="KV blocks of each sim worker (default: 160: tight, so the policy migrates under this load)")
    p.add_argument("--migrate-in-above", type=float, default=8.0,
                   help="scheduler.migrate_in_above: lower than the default 30, so load-balancing migrations run "
                        "all along (default: 8)")
    p.add_argument("--prompt-len", type=_range, default=(8, 64), help="prompt tokens, MIN-MAX (default: 8-64)")
    p.add_argument("--max-tokens", type=_range, default=(16, 256), help="max_tokens, MIN-MAX (default: 16-256)")
    p.add_argument("--cancel-prob", type=float, default=0.05, help="share of requests the client cancels (0.05)")
    p.add_argument("--chaos-interval", type=float, default=3.0, help="seconds between chaos actions (default: 3)")
    p.add_argument("--down-s", type=float, default=2.0, help="seconds a killed service stays down (default: 2)")
    p.add_argument("--stop-deadline", type=float, default=10.0,
                   help="worker.stop_deadline_s: how long a SIGTERM drain may take (default: 10)")
    p.add_argument("--hang-s", type=float, default=60.0,
                   help="a request with no answer within this is counted as hung (default: 60)")
    p.add_argument("--time-limit", type=float, default=150.0,
                   help="seconds per phase after which no new request starts (default: 150)")
    p.add_argument("--torch-requests", type=int, default=24,
                   help="requests of the torch tiny run (default: 24; 0 skips it)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--log-level", default="error", help="services' log level (default: error)")
    p.set_defaults(func=_run_chaos)


def _restart(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("restart", help="cold start of a local cluster and a killed worker's way back",
                         description=bench.restart.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("torch", "sim", "vllm"), default="torch")
    p.add_argument("--model", default="smollm2", help="tiny | smollm2 | a model folder | .gguf (default: smollm2)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds each wait may take at most")
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    p.set_defaults(func=_call(bench.restart.run, bench.restart.Options))


def _overhead(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("overhead", help="the same batch in process and through a live 1-worker cluster",
                         description=bench.overhead.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_model="smollm2")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 16, 64], help="batch sizes (default: 1,16,64)")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--output-len", type=positive_int, default=64, help="output tokens (default: 64)")
    p.add_argument("--pairs", type=positive_int, default=3, help="paired rounds per batch size (default: 3)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads, both sides (default: every core, as `kvferry up --workers 1`)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any one phase may take (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    p.add_argument("--json", metavar="FILE", help="write the results as one JSON object to FILE")
    p.set_defaults(func=_call(bench.overhead.run, bench.overhead.Options))


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX, got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return a, b


def _run_chaos(args: argparse.Namespace) -> int:
    """bench chaos records its whole command line (every flag, as parsed) in its JSON."""
    return bench.chaos.run(options(args, bench.chaos.Options),
                           config={k: v for k, v in vars(args).items() if k != "func"})
