"""Request traces: when each request arrives, how long its prompt and its answer are, its priority.

Arrivals: Poisson (exponential gaps) or Gamma gaps with a coefficient of variation (CV > 1 is
burstier than Poisson; CV 1 is Poisson). Lengths: fixed, uniform, or a power law (Zipf) with a
given mean capped at 6144 tokens, as in the Llumnix paper's generated traces; a trace name such as
`256-512` pairs an input and an output distribution. A fraction of requests can be high priority.
Traces also load from and save to JSONL files, one request per line.

Each part (gaps, input lengths, output lengths, priorities) draws from its own random stream of the
seed, so traces that differ only in rate or CV have the very same requests.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

LENGTH_CAP = 6144  # the paper's cap on generated lengths
HIGH_PRIORITY = -1  # the priority of "high-priority" requests (lower is served first; policy: < 0)
NAMED_TRACES = ("128-128", "256-256", "512-512", "128-512", "512-128")
# Zipf exponent by mean length: heavier tails for longer means, so that the capped power law keeps
# a large share of short requests plus a long tail (interpolated in log2(mean) between these).
ZIPF_EXPONENTS = ((128, 2.0), (256, 1.5), (512, 1.15))
JSONL_KEYS = ("arrival_s", "input_len", "output_len", "priority", "segments")
MAX_SEGMENTS = 4096  # per request in a JSONL file


class TraceError(ValueError):
    """A trace specification or trace file is invalid; the message says where and why."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: arrival time (seconds from the trace's start), prompt and answer
    lengths in tokens, priority (lower is served first; negative is high priority). `segments`
    (traces with reuse, workload/reuse.py): the prompt as (segment id, length) pieces whose token ids
    are derived from the id, so requests sharing leading segments share a prefix; empty: a prompt
    of its own."""

    arrival_s: float
    input_len: int
    output_len: int
    priority: int = 0
    segments: tuple[tuple[int, int], ...] = ()


# ---- arrival processes -----------------------------------------------------------------------------

def arrival_times(n: int, rate: float, cv: float = 1.0, rng: np.random.Generator | None = None) -> list[float]:
    """`n` arrival times at `rate` requests/s, the first at 0: Gamma-distributed gaps with the given
    coefficient of variation (shape 1/CV², mean 1/rate); CV 1 is a Poisson process."""
    if n < 0:
        raise TraceError("the number of requests must be >= 0")
    if not (rate > 0 and math.isfinite(rate)):
        raise TraceError(f"the request rate must be a positive number, got {rate!r}")
    if not (cv > 0 and math.isfinite(cv)):
        raise TraceError(f"the CV of inter-arrival times must be positive, got {cv!r}")
    rng = rng or np.random.default_rng(0)
    if n == 0:
        return []
    if cv == 1.0:
        gaps = rng.exponential(1.0 / rate, n - 1)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


# ---- length distributions --------------------------------------------------------------------------

@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts: `fixed` (a), `uniform` (a..b inclusive) or `zipf` (mean a,
    capped at b)."""

    kind: str
    a: int
    b: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "zipf"):
            raise TraceError(f"unknown length distribution {self.kind!r} (fixed, uniform, zipf)")
        if self.a < 1 or (self.kind != "fixed" and self.b < self.a):
            raise TraceError(f"invalid {self.kind} length bounds {self.a}, {self.b}")

    @property
    def name(self) -> str:
        return {"fixed": f"fixed:{self.a}", "uniform": f"uniform:{self.a}:{self.b}",
                "zipf": f"zipf:{self.a}" + ("" if self.b == LENGTH_CAP else f":{self.b}")}[self.kind]

    def sample(self, n: int, rng: np.random.Generator) -> list[int]:
        if self.kind == "fixed":
            return [self.a] * n
        if self.kind == "uniform":
            return rng.integers(self.a, self.b, n, endpoint=True).tolist()
        values, cdf = _zipf_table(self.a, self.b)
        return values[np.searchsorted(cdf, rng.random(n), side="right")].tolist()


def zipf_exponent(mean: int) -> float:
    """The power-law exponent used for a mean length (see ZIPF_EXPONENTS)."""
    xs = [math.log2(m) for m, _ in ZIPF_EXPONENTS]
    return float(np.interp(math.log2(mean), xs, [s for _, s in ZIPF_EXPONENTS]))


def _zipf_table(mean: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Zipf over ranks 1..2·mean with the exponent for `mean`; rank r becomes ceil(r·c) tokens, c
    chosen so the uncapped mean is `mean`; lengths above `cap` become `cap`. (values, CDF)."""
    ranks = np.arange(1, 2 * mean + 1, dtype=np.float64)
    p = ranks ** -zipf_exponent(mean)
    p /= p.sum()
    scale = mean / float((ranks * p).sum())
    values = np.minimum(np.ceil(ranks * scale), cap).astype(np.int64)
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    return values, cdf


def parse_length(spec: str) -> LengthDist:
    """`256` or `zipf:256[:CAP]` (power law, mean 256, cap 6144), `fixed:128`, `uniform:64:512`."""
    parts = spec.strip().split(":")
    try:
        nums = [int(x) for x in parts[1:]] if len(parts) > 1 else [int(parts[0])]
    except ValueError:
        raise TraceError(f"invalid length spec {spec!r} (e.g. 256, zipf:256, fixed:128, uniform:64:512)") from None
    kind = parts[0] if len(parts) > 1 else "zipf"
    if kind == "fixed" and len(nums) == 1:
        return LengthDist("fixed", nums[0])
    if kind == "uniform" and len(nums) == 2:
        return LengthDist("uniform", nums[0], nums[1])
    if kind == "zipf" and len(nums) in (1, 2):
        return LengthDist("zipf", nums[0], nums[1] if len(nums) == 2 else LENGTH_CAP)
    raise TraceError(f"invalid length spec {spec!r} (e.g. 256, zipf:256, fixed:128, uniform:64:512)")


def parse_trace_name(name: str) -> tuple[LengthDist, LengthDist]:
    """`IN-OUT`, each a length spec: `256-256` (the paper's power-law pairs), `fixed:128-uniform:1:64`."""
    parts = name.split("-")
    if len(parts) != 2:
        raise TraceError(f"invalid trace {name!r}: expected INPUT-OUTPUT, e.g. {', '.join(NAMED_TRACES)}")
    return parse_length(parts[0]), parse_length(parts[1])


# ---- whole traces ----------------------------------------------------------------------------------

def generate(n: int, rate: float, cv: float = 1.0, trace: str = "256-256", high_priority_fraction: float = 0.0,
             seed: int = 0) -> list[TraceRequest]:
    """A generated trace of `n` requests (see the module docstring); deterministic for a seed."""
    if not 0.0 <= high_priority_fraction <= 1.0:
        raise TraceError(f"the high-priority fraction must be in [0, 1], got {high_priority_fraction!r}")
    inp, out = parse_trace_name(trace)
    gaps, ins, outs, pri = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    times = arrival_times(n, rate, cv, gaps)
    high = (pri.random(n) < high_priority_fraction).tolist()
    return [TraceRequest(t, i, o, HIGH_PRIORITY if h else 0)
            for t, i, o, h in zip(times, inp.sample(n, ins), out.sample(n, outs), high)]


def describe(trace: Sequence[TraceRequest]) -> dict[str, float]:
    """Count, duration, rate, CV of the inter-arrival gaps, mean lengths, high-priority share."""
    n = len(trace)
    if n == 0:
        return {"requests": 0}
    gaps = np.diff([r.arrival_s for r in trace])
    dur = trace[-1].arrival_s - trace[0].arrival_s
    return {"requests": n, "duration_s": dur, "rate": (n - 1) / dur if dur > 0 else math.inf,
            "cv": float(gaps.std() / gaps.mean()) if len(gaps) and gaps.mean() > 0 else 0.0,
            "input_mean": float(np.mean([r.input_len for r in trace])),
            "output_mean": float(np.mean([r.output_len for r in trace])),
            "high_priority_fraction": sum(r.priority < 0 for r in trace) / n}


# ---- JSONL files -----------------------------------------------------------------------------------

def save_jsonl(trace: Iterable[TraceRequest], path: str | os.PathLike) -> None:
    """One JSON object per line: arrival_s, input_len, output_len, priority (and segments, when
    the prompt has them)."""
    with open(path, "w") as f:
        for r in trace:
            d = asdict(r)
            if not r.segments:
                del d["segments"]
            f.write(json.dumps(d) + "\n")


def load_jsonl(path: str | os.PathLike) -> list[TraceRequest]:
    """Read a trace written by `save_jsonl` (or by hand): keys arrival_s (seconds, >= 0, not
    decreasing), input_len and output_len (integers >= 1), optional priority (integer, default 0),
    optional segments ([[segment id, length >= 1], ...], lengths adding up to input_len: the
    prompt's shared and private pieces, see workload/reuse.py; an id -j-1 is the first `length`
    output tokens of the file's request j, which must come earlier).
    Blank lines are skipped; anything else raises TraceError naming the line."""
    out: list[TraceRequest] = []
    try:
        f = open(path)
    except OSError as exc:
        raise TraceError(f"cannot read trace file {path}: {exc.strerror}") from None
    with f:
        for no, line in enumerate(f, 1):
            if line.strip():
                out.append(_parse_line(line, f"{path}:{no}", out))
    if not out:
        raise TraceError(f"{path}: the trace has no request")
    return out


def _parse_line(line: str, where: str, earlier: list[TraceRequest]) -> TraceRequest:
    previous_s = earlier[-1].arrival_s if earlier else 0.0
    try:
        d = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(d, dict):
        raise TraceError(f"{where}: expected a JSON object")
    unknown = sorted(set(d) - set(JSONL_KEYS))
    if unknown:
        raise TraceError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(JSONL_KEYS)})")
    for key in JSONL_KEYS[:3]:
        if key not in d:
            raise TraceError(f"{where}: missing {key!r}")
    t = d["arrival_s"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise TraceError(f"{where}: arrival_s must be a finite number >= 0, got {t!r}")
    if t < previous_s:
        raise TraceError(f"{where}: arrival_s {t} is before the previous request's ({previous_s}); sort the trace")
    for key in ("input_len", "output_len"):
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TraceError(f"{where}: {key} must be an integer >= 1, got {v!r}")
    pri = d.get("priority", 0)
    if isinstance(pri, bool) or not isinstance(pri, int):
        raise TraceError(f"{where}: priority must be an integer, got {pri!r}")
    segs = d.get("segments", [])
    if (not isinstance(segs, list) or len(segs) > MAX_SEGMENTS
            or not all(isinstance(g, list) and len(g) == 2 and all(type(x) is int for x in g)
                       and g[1] >= 1 for g in segs)):
        raise TraceError(f"{where}: segments must be a list of at most {MAX_SEGMENTS} [id, length >= 1] pairs")
    for key, n in segs:
        # A negative id -j-1 is the answer of request j (0-based, earlier in the file): at most its output.
        if key < 0 and not (-key - 1 < len(earlier) and n <= earlier[-key - 1].output_len):
            raise TraceError(f"{where}: segment {key} is the answer of request {-key - 1}, which is not an earlier "
                             f"request with at least {n} output tokens")
    if segs and sum(g[1] for g in segs) != d["input_len"]:
        raise TraceError(f"{where}: the segments' lengths add up to {sum(g[1] for g in segs)}, not input_len")
    return TraceRequest(float(t), d["input_len"], d["output_len"], pri, tuple((g[0], g[1]) for g in segs))
