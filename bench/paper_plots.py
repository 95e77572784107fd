"""PNG plots of `kvferry bench paper`'s rows (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

LATENCY_PANELS = (("ttft_mean", "mean TTFT"), ("ttft_p99", "P99 TTFT"), ("decode_mean", "mean decode (TPOT)"),
                  ("decode_p99", "P99 decode (TPOT)"), ("e2e_mean", "mean E2E"), ("e2e_p99", "P99 E2E"))
STYLE = {"kvferry": ("tab:red", "o"), "load": ("tab:blue", "s"), "rr": ("tab:gray", "^"),
         "kvferry-nopri": ("tab:orange", "D")}



def _plt():  # noqa: ANN202 - matplotlib.pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def arrival_name(cv: float) -> str:
    return "Poisson" if cv == 1.0 else f"Gamma CV {cv:g}"


def plot_all(rows: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    """Every plot the rows allow; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    files: list[str] = []
    serving = [r for r in rows if r["experiment"] == "serving"]
    for trace in dict.fromkeys(r["trace"] for r in serving):
        for cv in dict.fromkeys(r["cv"] for r in serving if r["trace"] == trace):
            files.append(latency_vs_rate([r for r in serving if r["trace"] == trace and r["cv"] == cv], out_dir))
        cdf_rows = [r for r in serving if r["trace"] == trace and "_cdf" in r]
        if cdf_rows:
            files.append(cdfs(cdf_rows, out_dir))
    pri = [r for r in rows if r["experiment"] == "priority"]
    if pri:
        files.append(priorities(pri, out_dir))
    sc = [r for r in rows if r["experiment"] == "scaling"]
    if sc:
        files.append(scaling(sc, out_dir))
    th = [r for r in rows if r["experiment"] == "threshold"]
    if th:
        files.append(thresholds(th, out_dir))
    return files


def latency_vs_rate(rows: Sequence[dict[str, Any]], out_dir: str) -> str:
    """Six panels (TTFT, decode, E2E; mean and P99) against the request rate, one line per policy."""
    plt = _plt()
    trace, cv = rows[0]["trace"], rows[0]["cv"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.T.flat, LATENCY_PANELS):
        for pol in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["rate"], r[key]) for r in rows if r["policy"] == pol and r[key] is not None)
            color, marker = STYLE.get(pol, (None, "x"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=pol)
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("seconds")
        if key.startswith("ttft"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{trace}, {arrival_name(cv)}: latency vs request rate "
                 f"(simulated, {rows[0]['instances']} x LLaMA-7B/A10)")
    return _save(plt, fig, out_dir, f"latency_{trace}_{'poisson' if cv == 1.0 else f'gamma{cv:g}'}.png")


def cdfs(rows: Sequence[dict[str, Any]], out_dir: str) -> str:
    """CDFs of TTFT, decode and E2E at the highest rate, one row per arrival process."""
    plt = _plt()
    trace = rows[0]["trace"]
    cvs = list(dict.fromkeys(r["cv"] for r in rows))
    fig, axes = plt.subplots(len(cvs), 3, figsize=(13, 3.6 * len(cvs)), squeeze=False)
    for i, cv in enumerate(cvs):
        for j, (key, title) in enumerate((("ttft", "TTFT"), ("decode", "decode (TPOT)"), ("e2e", "E2E"))):
            ax = axes[i][j]
            for r in (r for r in rows if r["cv"] == cv):
                xs = r["_cdf"][key]
                color, _ = STYLE.get(r["policy"], (None, "x"))
                ax.plot(xs, [k / (len(xs) - 1) for k in range(len(xs))], color=color, label=r["policy"])
            if key != "decode":  # decode latencies span less than a decade
                ax.set_xscale("log")
            ax.set_title(f"{title}, {arrival_name(cv)}, {_rate(rows, cv):g} req/s")
            ax.set_xlabel("seconds")
            ax.set_ylabel("CDF")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{trace}: latency CDFs at the highest rate")
    return _save(plt, fig, out_dir, f"cdf_{trace}.png")


def _save(plt: Any, fig: Any, out_dir: str, name: str) -> str:
    """Lay out, write to out_dir/name and close the figure; returns the path."""
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _rate(rows: Sequence[dict[str, Any]], cv: float) -> float:
    return next(r["rate"] for r in rows if r["cv"] == cv)


def priorities(rows: Sequence[dict[str, Any]], out_dir: str) -> str:
    """Fig 13's form: bars per CV of mean E2E, mean prefill and mean decode, high and normal
    requests, kvferry against kvferry-nopri."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    cvs = sorted(dict.fromkeys(r["cv"] for r in rows))
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    width = 0.8 / max(1, len(pols))
    for i, cls in enumerate(("high", "normal")):
        for j, (key, title) in enumerate((("e2e_mean", "mean E2E"), ("ttft_mean", "mean prefill"),
                                          ("decode_mean", "mean decode"))):
            ax = axes[i][j]
            for k, pol in enumerate(pols):
                by = {r["cv"]: r["classes"][cls][key] for r in rows if r["policy"] == pol and "classes" in r}
                color, _ = STYLE.get(pol, (None, "x"))
                ax.bar([c + (k - (len(pols) - 1) / 2) * width for c in range(len(cvs))],
                       [by.get(cv) or 0.0 for cv in cvs], width, color=color, label=pol)
            ax.set_xticks(range(len(cvs)), [f"CV {cv:g}" for cv in cvs])
            ax.set_title(f"{cls} priority: {title}")
            ax.set_ylabel("seconds")
            ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"Fig 13: priorities, {r0['trace']} at {r0['rate']:g} req/s (Gamma), "
                 f"{100 * r0['high_priority_fraction']:g} % high priority")
    return _save(plt, fig, out_dir, "priority.png")


def scaling(rows: Sequence[dict[str, Any]], out_dir: str) -> str:
    """Fig 14's form: P99 prefill, mean E2E and average instances against the rate (Poisson) and
    the CV (Gamma), one line per policy."""
    plt = _plt()
    kinds = [k for k in ("poisson", "gamma") if any((r["cv"] == 1.0) == (k == "poisson") for r in rows)]
    fig, axes = plt.subplots(len(kinds), 3, figsize=(13, 3.6 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        part = [r for r in rows if (r["cv"] == 1.0) == (kind == "poisson")]
        xkey = "rate" if kind == "poisson" else "cv"
        for j, (key, title) in enumerate((("ttft_p99", "P99 prefill (s)"), ("e2e_mean", "mean E2E (s)"),
                                          ("avg_instances", "average instances"))):
            ax = axes[i][j]
            for pol in dict.fromkeys(r["policy"] for r in part):
                color, marker = STYLE.get(pol, (None, "x"))
                pts = sorted((r[xkey], r[key]) for r in part if r["policy"] == pol)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=pol)
            ax.set_title(f"{'Poisson' if kind == 'poisson' else 'Gamma'}: {title}")
            ax.set_xlabel("request rate (req/s)" if kind == "poisson" else "CV")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    r0 = rows[0]
    fig.suptitle(f"Fig 14: auto-scaling, {r0['trace']}, scale up below {r0['scale_up_below']:g}, "
                 f"down above {r0['scale_down_above']:g}")
    return _save(plt, fig, out_dir, "scaling.png")


def thresholds(rows: Sequence[dict[str, Any]], out_dir: str) -> str:
    """Fig 15's form: P99 prefill against average instances, one point per threshold; the paper's
    curves dashed."""
    from bench.paper_claims import FIG15

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for pol, paper_name in (("load", "INFaaS++"), ("kvferry", "Llumnix")):
        color, marker = STYLE.get(pol, (None, "x"))
        pts = sorted((r["avg_instances"], r["ttft_p99"], r["scale_up_below"]) for r in rows if r["policy"] == pol)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=f"{pol} (ours)")
        for x, y, up in pts:
            ax.annotate(f"{up:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        paper = sorted(FIG15[pol].values())
        ax.plot([p[0] for p in paper], [p[1] for p in paper], "--", marker=marker, color=color, alpha=0.5,
                label=f"{paper_name} (paper)")
    ax.set_yscale("log")
    ax.set_xlabel("average instances")
    ax.set_ylabel("P99 prefill (s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    r0 = rows[0]
    ax.set_title(f"Fig 15: {r0['trace']}, Gamma CV {r0['cv']:g} at {r0['rate']:g} req/s (labels: scale-up threshold)",
                 fontsize=9)
    return _save(plt, fig, out_dir, "thresholds.png")
