"""The trace of `bench simulate` and `bench serve`: generated from the trace options, or a JSONL file
(the flags: cli/trace_args.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TraceOptions:
    """The trace settings, named as their flags."""

    trace: str
    rate: float | None
    cv: float
    requests: int
    seed: int
    high_priority_fraction: float
    trace_file: str | None
    save_trace: str | None
    goodput: list[str]


def build_trace(opts: TraceOptions) -> list:
    """The trace the options describe (workload.traces.TraceError on bad input)."""
    from workload import reuse, traces

    if opts.trace_file:
        trace = traces.load_jsonl(opts.trace_file)[: opts.requests]
        # Cutting keeps every answer segment valid: each names an earlier request.
    elif opts.rate is None:
        raise traces.TraceError("give --rate (or --trace-file)")
    elif opts.trace in reuse.REUSE_TRACES:
        if opts.cv != 1.0 or opts.high_priority_fraction:
            raise traces.TraceError(f"--trace {opts.trace}: Poisson arrivals and no priorities (leave --cv and "
                                    "--high-priority-fraction at their defaults)")
        trace = reuse.generate_reuse(opts.trace, opts.requests, opts.rate, opts.seed)
    else:
        trace = traces.generate(opts.requests, opts.rate, opts.cv, opts.trace, opts.high_priority_fraction, opts.seed)
    if opts.save_trace:
        traces.save_jsonl(trace, opts.save_trace)
    return trace


def trace_label(opts: TraceOptions) -> str:
    if opts.trace_file:
        return f"file {opts.trace_file}"
    arrivals = "Poisson" if opts.cv == 1.0 else f"Gamma CV {opts.cv:g}"
    hp = f", {100 * opts.high_priority_fraction:g} % high priority" if opts.high_priority_fraction else ""
    return f"{opts.trace} at {opts.rate:g} req/s ({arrivals}{hp}), {opts.requests} requests, seed {opts.seed}"
