"""Serving metrics with `vllm bench serve`'s definitions, shared by the simulator and `bench serve`.

Per request (`RequestRecord`, times in seconds):
- TTFT: first token time - arrival (send) time;
- E2E: last token time - arrival time;
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests with more than one output token (the
  paper's "decode latency" of a request);
- ITL: every gap between two consecutive token deliveries of a request (one per streamed chunk,
  as vllm counts them), pooled over all requests;
- preemption loss: time lost to preemptions (for each preemption, how much later the request's
  next token came than the end of the step it was preempted in).
Summary: mean, median, P90, P99 of each; goodput = requests/s meeting every given SLO (TTFT,
TPOT, E2E); throughput; per priority class ("high": priority < 0, "normal") when both occur.
Cluster-level: KV fragmentation (share of free blocks while some instance has a blocked queue)
and instance-seconds come from the simulator's samples (`fragmentation`, `instance_seconds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATS = ("mean", "median", "p90", "p99")
# The flat keys of `bench paper`'s JSON rows: latencies in seconds; "decode" is TPOT.
PAPER_KEYS = ("ttft_mean", "ttft_p99", "decode_mean", "decode_p99", "e2e_mean", "e2e_p99", "preemption_loss_mean")


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. `itl` holds the gaps between token deliveries (any float
    sequence; the simulator uses array('d') to keep millions of them small)."""

    request_id: str
    arrival_s: float
    input_len: int
    output_len: int  # requested (max_tokens)
    priority: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_s: float | None = None
    output_tokens: int = 0
    itl: Any = field(default_factory=list)
    preemptions: int = 0
    preemption_loss_s: float = 0.0
    migrations: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None and self.first_token_s is not None

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.arrival_s  # type: ignore[operator]

    @property
    def e2e(self) -> float:
        return self.finish_s - self.arrival_s  # type: ignore[operator]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)  # type: ignore[operator]


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in seconds (None: not checked), as vllm's --goodput ttft:MS tpot:MS e2el:MS."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def met(self, r: RequestRecord) -> bool:
        tpot = r.tpot or 0.0
        return ((self.ttft_s is None or r.ttft <= self.ttft_s) and (self.tpot_s is None or tpot <= self.tpot_s)
                and (self.e2e_s is None or r.e2e <= self.e2e_s))

    @property
    def empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None

    @classmethod
    def parse(cls, items: Sequence[str]) -> "SLO":
        """From vllm-style `KEY:MILLISECONDS` items, keys ttft, tpot, e2el (or e2e)."""
        names = {"ttft": "ttft_s", "tpot": "tpot_s", "e2el": "e2e_s", "e2e": "e2e_s"}
        kw: dict[str, float] = {}
        for item in items:
            key, _, value = item.partition(":")
            try:
                ms = float(value)
            except ValueError:
                ms = math.nan
            if key not in names or not ms > 0:
                raise ValueError(f"invalid SLO {item!r}: expected ttft:MS, tpot:MS or e2el:MS with MS > 0")
            kw[names[key]] = ms / 1000.0
        return cls(**kw)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s), ("e2e_s", self.e2e_s))
                if v is not None}


def stats(values: Iterable[float] | np.ndarray) -> dict[str, float | None]:
    """mean, median, P90, P99 (numpy's linear interpolation, as vllm); None for no values."""
    a = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=np.float64)
    if a.size == 0:
        return {k: None for k in STATS}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


def pooled_itl(records: Sequence[RequestRecord]) -> np.ndarray:
    parts = [np.asarray(r.itl, dtype=np.float64) for r in records if len(r.itl)]
    return np.concatenate(parts) if parts else np.empty(0)


def summarize(records: Sequence[RequestRecord], duration_s: float | None = None, slo: SLO | None = None,
              per_class: bool = True) -> dict[str, Any]:
    """The summary of a run. `duration_s`: the benchmark's duration (default: first arrival to last
    finish); throughputs and goodput divide by it."""
    done = [r for r in records if r.ok]
    if duration_s is None:
        ends = [r.finish_s for r in done]
        duration_s = (max(ends) - min(r.arrival_s for r in records)) if ends else 0.0
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.input_len for r in done)
    s: dict[str, Any] = {
        "requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "duration_s": duration_s, "request_throughput": per_s(len(done)),
        "output_throughput": per_s(out_tokens), "total_token_throughput": per_s(in_tokens + out_tokens),
        "ttft": stats(r.ttft for r in done),
        "tpot": stats(t for r in done if (t := r.tpot) is not None),
        "itl": stats(pooled_itl(done)),
        "e2e": stats(r.e2e for r in done),
        "preemptions": sum(r.preemptions for r in done),
        "preemption_loss": {"mean": float(np.mean([r.preemption_loss_s for r in done])) if done else None,
                            "total": float(sum(r.preemption_loss_s for r in done))},
        "migrations": sum(r.migrations for r in done),
    }
    if slo is not None and not slo.empty:
        s["slo"] = slo.to_dict()
        s["goodput"] = per_s(sum(slo.met(r) for r in done))
    if per_class:
        high = [r for r in records if r.priority < 0]
        normal = [r for r in records if r.priority >= 0]
        if high and normal:
            s["classes"] = {name: summarize(part, duration_s, slo, per_class=False)
                            for name, part in (("high", high), ("normal", normal))}
    return s


def paper_row(summary: dict[str, Any]) -> dict[str, float | None]:
    """The flat PAPER_KEYS of a summary (seconds)."""
    return {"ttft_mean": summary["ttft"]["mean"], "ttft_p99": summary["ttft"]["p99"],
            "decode_mean": summary["tpot"]["mean"], "decode_p99": summary["tpot"]["p99"],
            "e2e_mean": summary["e2e"]["mean"], "e2e_p99": summary["e2e"]["p99"],
            "preemption_loss_mean": summary["preemption_loss"]["mean"]}


# ---- cluster-level metrics (from the simulator's samples) -----------------------------------------

@dataclass
class FragmentationMeter:
    """KV fragmentation: sampled at a fixed interval, the share of the cluster's blocks that are free
    at moments when some instance has a blocked queue (its waiting head does not fit its free
    blocks) — memory that exists but cannot serve the waiting work. Also the share of samples with
    a blocked queue."""

    samples: int = 0
    blocked_samples: int = 0
    free_share_sum: float = 0.0

    def sample(self, free_blocks: int, total_blocks: int, blocked: bool) -> None:
        self.samples += 1
        if blocked and total_blocks > 0:
            self.blocked_samples += 1
            self.free_share_sum += free_blocks / total_blocks

    def result(self) -> dict[str, float]:
        return {"free_share_while_blocked": self.free_share_sum / self.blocked_samples if self.blocked_samples else 0.0,
                "blocked_time_share": self.blocked_samples / self.samples if self.samples else 0.0}


def instance_seconds(lifetimes: Iterable[tuple[float, float]]) -> float:
    """Sum of (stop - start) over instances; an instance is paid from its start (including its
    start-up) until it stops or the run ends."""
    return float(sum(max(0.0, b - a) for a, b in lifetimes))
