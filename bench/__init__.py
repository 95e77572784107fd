"""kvferry's benchmarks, behind `kvferry bench KIND` (whose flags are parsed in cli/bench.py).

One module per kind, each with `Options` (a dataclass: the kind's settings, named as its flags)
and `run(options) -> exit status`, plus what it measures with (the docstring of each module says
what and how; it is also the kind's `--help`):
- `engine`: decode and prefill throughput of the real engine, optionally vs vLLM (`vllm_worker`:
  vLLM's side, in a subprocess), and the fit of the sim's latency model;
- `frontend`: requests/s, streamed tokens/s and dispatch latency of one frontend over sim workers
  (`scheduler`: the dispatch latency of a scheduler with N fake instances);
- `migration`: downtime of live migration vs recompute vs blocking copy, by context;
- `transfer`: GB/s of the KV data paths vs memcpy;
- `simulate`, `paper` (`paper_runs`, `paper_plots`): traces on the simulated cluster, and the
  Llumnix paper's comparisons on it; `serve`: a trace replayed against a live cluster (`trace`:
  the trace the options describe);
- `chaos`, `restart`, `overhead`: failures under load, start and restart times, served vs in process.

Modules keep heavy imports (torch, the engine, zmq) inside their functions, so that parsing
`kvferry bench --help` imports none of them. Nothing here imports `cli`.
"""


class UsageError(ValueError):
    """Settings found unusable once a benchmark runs (`kvferry bench` prints `error: ...`, exit 2)."""
