"""The paper's published numbers (the `*_paper.claim` files and plotted values of its artifact,
branch `osdi24ae` of github.com/AlibabaPAI/llumnix) and the tables that put ours beside them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Fig 11, generated traces, Llumnix vs INFaaS++ (the best over traces and rates; preemption loss:
# the average reduction over all runs).
FIG11 = {"e2e_mean": 1.5, "e2e_p99": 1.6, "ttft_mean": 7.7, "ttft_p99": 14.8, "decode_p99": 2.0,
         "preemption_loss_cut": 0.704}
# Fig 13, high priority vs priorities off: ranges over CV 2 -> 8; normal requests: worst slowdown.
FIG13_HIGH = {"e2e_mean": (1.2, 1.5), "ttft_mean": (2.9, 8.6), "ttft_p99": (3.6, 10.0),
              "decode_mean": (1.2, 1.5), "decode_p99": (1.3, 2.2)}
FIG13_NORMAL = {"e2e_mean": 0.045, "ttft_mean": 0.13, "decode_mean": 0.02}
# Fig 14: best cost saving and P99 prefill gain (Poisson, Gamma).
FIG14 = {"poisson": {"cost_cut": 0.16, "ttft_p99": 12.2}, "gamma": {"cost_cut": 0.18, "ttft_p99": 11.0}}
# Fig 15: (average instances, P99 prefill s) per scale-up threshold.
FIG15 = {"load": {5.0: (11.61, 40.1), 25.0: (12.61, 21.5), 45.0: (13.33, 14.3), 65.0: (14.25, 4.59),
                  85.0: (15.1, 3.42)},
         "kvferry": {5.0: (10.44, 11.4), 25.0: (11.39, 4.05), 45.0: (12.3, 3.66), 65.0: (13.3, 3.51),
                     85.0: (14.06, 2.95)}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pairs(rows: Sequence[dict[str, Any]], a: str, b: str, experiment: str) -> list[tuple[dict, dict]]:
    by = {(r["trace"], r["cv"], r["rate"], r.get("scale_up_below"), r["policy"]): r
          for r in rows if r["experiment"] == experiment}
    return [(by[(t, cv, rate, up, a)], rb) for (t, cv, rate, up, pol), rb in by.items()
            if pol == b and (t, cv, rate, up, a) in by]


def fig11_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per trace, kvferry's best gain over `load` across the rates; then the paper's claim beside
    the best over all traces."""
    from workload.report import table

    pairs = _pairs(rows, "load", "kvferry", "serving")
    if not pairs:
        return ""
    keys = ("e2e_mean", "e2e_p99", "ttft_mean", "ttft_p99", "decode_p99")
    lines, best, cuts = [], {k: (0.0, "") for k in keys}, []
    for trace in dict.fromkeys(ra["trace"] for ra, _ in pairs):
        part = [(ra, rb) for ra, rb in pairs if ra["trace"] == trace]
        cells = [trace]
        for k in keys:
            vals = [(_ratio(ra[k], rb[k]) or 0.0, ra["rate"]) for ra, rb in part]
            v, rate = max(vals)
            cells.append(f"{v:.2f}x @{rate:g}")
            if v > best[k][0]:
                best[k] = (v, f"{trace} @{rate:g}")
        part_cuts = [1 - rb["preemption_loss_mean"] / ra["preemption_loss_mean"]
                     for ra, rb in part if ra["preemption_loss_mean"]]
        cuts += part_cuts
        cells.append("-" if not part_cuts else f"{100 * sum(part_cuts) / len(part_cuts):.0f} %")
        lines.append(cells)
    out = ["\nFig 11: kvferry vs load (INFaaS++), best over the rates (load's latency / kvferry's)",
           table(lines, ["trace", "E2E mean", "E2E P99", "prefill mean", "prefill P99", "decode P99",
                         "preemption loss cut"])]
    claim = [[name, f"{FIG11[k]:.1f}x", f"{best[k][0]:.2f}x", best[k][1]] for k, name in
             zip(keys, ("E2E mean", "E2E P99", "prefill mean", "prefill P99", "decode P99"))]
    claim.append(["preemption loss cut (avg)", f"{100 * FIG11['preemption_loss_cut']:.1f} %",
                  "-" if not cuts else f"{100 * sum(cuts) / len(cuts):.1f} %", "all runs"])
    out += ["\nFig 11: the paper (up to) beside ours", table(claim, ["metric", "paper", "kvferry", "where"])]
    return "\n".join(out)


def fig13_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per CV: high-priority gains and normal-request slowdowns of kvferry over kvferry-nopri."""
    from workload.report import table

    pairs = [(a, b) for a, b in _pairs(rows, "kvferry-nopri", "kvferry", "priority")
             if "classes" in a and "classes" in b]
    if not pairs:
        return ""
    lines = []
    for a, b in sorted(pairs, key=lambda p: p[0]["cv"]):
        ha, hb, na, nb = a["classes"]["high"], b["classes"]["high"], a["classes"]["normal"], b["classes"]["normal"]
        lines.append([f"{a['cv']:g}"] + [_x(_ratio(ha[k], hb[k])) for k in FIG13_HIGH]
                     + [f"{100 * (nb[k] / na[k] - 1):+.1f} %" if na[k] else "-" for k in FIG13_NORMAL])
    lines.append(["paper"] + [f"{lo:g}-{hi:g}x" for lo, hi in FIG13_HIGH.values()]
                 + [f"<= +{100 * v:g} %" for v in FIG13_NORMAL.values()])
    return ("\nFig 13: priorities, kvferry vs kvferry-nopri (high: nopri's latency / kvferry's; "
            "normal: kvferry's change)\n"
            + table(lines, ["CV", "high E2E mean", "high prefill mean", "high prefill P99", "high decode mean",
                            "high decode P99", "normal E2E mean", "normal prefill mean", "normal decode mean"]))


def fig14_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per point: average instances and P99 prefill of both, the cost cut and the prefill gain."""
    from workload.report import table

    pairs = sorted(_pairs(rows, "load", "kvferry", "scaling"), key=lambda p: (p[0]["cv"], p[0]["rate"]))
    if not pairs:
        return ""
    lines, best = [], {"poisson": [0.0, 0.0], "gamma": [0.0, 0.0]}
    for a, b in pairs:
        kind = "poisson" if a["cv"] == 1.0 else "gamma"
        cut = 1 - b["avg_instances"] / a["avg_instances"]
        gain = _ratio(a["ttft_p99"], b["ttft_p99"]) or 0.0
        best[kind][0], best[kind][1] = max(best[kind][0], cut), max(best[kind][1], gain)
        lines.append([kind, f"{a['rate']:g}", f"{a['cv']:g}", f"{a['avg_instances']:.2f}", f"{b['avg_instances']:.2f}",
                      f"{100 * cut:+.1f} %", f"{a['ttft_p99']:.2f}", f"{b['ttft_p99']:.2f}", f"{gain:.2f}x"])
    claim = [[k, f"{100 * FIG14[k]['cost_cut']:g} %", f"{100 * best[k][0]:.1f} %", f"{FIG14[k]['ttft_p99']:g}x",
              f"{best[k][1]:.2f}x"] for k in ("poisson", "gamma") if any(ln[0] == k for ln in lines)]
    return ("\nFig 14: auto-scaling (load = INFaaS++ with the same scaler; cost = average instances)\n"
            + table(lines, ["arrivals", "req/s", "CV", "load inst", "kvferry inst", "cost cut", "load P99 prefill s",
                            "kvferry P99 prefill s", "prefill gain"])
            + "\n\nFig 14: the paper (up to) beside ours\n"
            + table(claim, ["arrivals", "paper cost cut", "kvferry", "paper P99 prefill gain", "kvferry"]))


def fig15_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per scale-up threshold: average instances and P99 prefill, paper's and ours, both systems."""
    from workload.report import table

    pts = {(r["policy"], r["scale_up_below"]): r for r in rows if r["experiment"] == "threshold"}
    if not pts:
        return ""
    lines = []
    for up in sorted({u for _, u in pts}):
        cells = [f"{up:g}/{up + 50:g}"]
        for pol in ("load", "kvferry"):
            r = pts.get((pol, up))
            p = FIG15[pol].get(up)
            cells += ["-" if p is None else f"{p[0]:.2f} / {p[1]:.2f}",
                      "-" if r is None else f"{r['avg_instances']:.2f} / {r['ttft_p99']:.2f}"]
        lines.append(cells)
    return ("\nFig 15: scaling thresholds, average instances / P99 prefill (s)\n"
            + table(lines, ["up/down", "INFaaS++ paper", "load ours", "Llumnix paper", "kvferry ours"]))


def below_curve(rows: Sequence[dict[str, Any]]) -> tuple[int, int, int] | None:
    """kvferry's (average instances, P99 prefill) points against load's curve: (points below it,
    points inside load's instance range, points outside it). Load's P99 is interpolated linearly
    at each kvferry point's instance count; points with fewer (or more) instances than any of
    load's have nothing to compare with. None without both curves."""
    pts = {pol: sorted((r["avg_instances"], r["ttft_p99"]) for r in rows
                       if r["experiment"] == "threshold" and r["policy"] == pol) for pol in ("load", "kvferry")}
    if len(pts["load"]) < 2 or not pts["kvferry"]:
        return None
    import numpy as np

    xs, ys = zip(*pts["load"])
    inside = [(x, y) for x, y in pts["kvferry"] if xs[0] <= x <= xs[-1]]
    below = sum(1 for x, y in inside if y < float(np.interp(x, xs, ys)))
    return below, len(inside), len(pts["kvferry"]) - len(inside)
