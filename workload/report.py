"""Plain-text tables of a run's summary (workload.metrics.summarize), for the bench commands."""

from __future__ import annotations

from typing import Any

ROWS = (("TTFT", "ttft"), ("TPOT (decode)", "tpot"), ("ITL", "itl"), ("E2E latency", "e2e"))


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns right-aligned except the first."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    out = []
    for r in [header, *rows]:
        cells = [str(r[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:,.1f}"


def latency_table(s: dict[str, Any]) -> str:
    return table([[name, *(ms(s[key][k]) for k in ("mean", "median", "p90", "p99"))] for name, key in ROWS],
                 ["latency (ms)", "mean", "median", "P90", "P99"])


def format_summary(s: dict[str, Any], title: str = "") -> str:
    """The latency table, then throughput, goodput, preemptions and cluster metrics when present;
    then the table of each priority class."""
    lines = [title] if title else []
    lines.append(f"requests {s['completed']}/{s['requests']} completed ({s['failed']} failed) in "
                 f"{s['duration_s']:,.1f} s: {s['request_throughput']:.2f} req/s, "
                 f"{s['output_throughput']:,.0f} output tok/s")
    lines.append(latency_table(s))
    extra = []
    if "goodput" in s:
        slo = ", ".join(f"{k.removesuffix('_s')} <= {1000 * v:g} ms" for k, v in s["slo"].items())
        extra.append(f"goodput {s['goodput']:.2f} req/s ({slo})")
    loss = s["preemption_loss"]["mean"]
    extra.append(f"preemptions {s['preemptions']}, preemption loss {ms(loss)} ms per request")
    if "fragmentation" in s:
        f = s["fragmentation"]
        extra.append(f"KV fragmentation: {100 * f['free_share_while_blocked']:.1f} % of blocks free while a queue "
                     f"was blocked ({100 * f['blocked_time_share']:.1f} % of the time)")
    if "migration" in s:
        m = s["migration"]
        aborted = sum(m["aborted"].values())
        down = "" if m["downtime_ms_mean"] is None else f", downtime {m['downtime_ms_mean']:.1f} ms mean"
        extra.append(f"migrations {m['committed']} committed, {aborted} aborted{down}")
    if "instance_seconds" in s:
        inst = s.get("instances", {})
        extra.append(f"instance-seconds {s['instance_seconds']:,.0f} (instances started {inst.get('started', '?')}, "
                     f"max live {inst.get('max_live', '?')})")
    lines.extend(extra)
    for name, c in s.get("classes", {}).items():
        lines.append(f"-- {name} priority: {c['completed']} requests")
        lines.append(latency_table(c))
    return "\n".join(lines)
