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
    """Per class (high, normal) and policy: mean TTFT, P99 TTFT, mean E2E against the arrival CV."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, (("ttft_mean", "mean TTFT"), ("ttft_p99", "P99 TTFT"), ("e2e_mean", "mean E2E"))):
        for pol in dict.fromkeys(r["policy"] for r in rows):
            color, marker = STYLE.get(pol, (None, "x"))
            for cls, ls in (("high", "-"), ("normal", "--")):
                pts = sorted((r["cv"], r["classes"][cls][key]) for r in rows if r["policy"] == pol and "classes" in r)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker=marker, color=color, label=f"{pol} {cls}")
        ax.set_title(title)
        ax.set_xlabel("CV of inter-arrival times (Gamma)")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"priorities: {r0['trace']} at {r0['rate']:g} req/s, {100 * r0['high_priority_fraction']:g} % high priority")
    return _save(plt, fig, out_dir, "priority.png")


def scaling(rows: Sequence[dict[str, Any]], out_dir: str) -> str:
    """Instance-seconds against P99 TTFT, one point per threshold pair, one line per policy."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for pol in dict.fromkeys(r["policy"] for r in rows):
        color, marker = STYLE.get(pol, (None, "x"))
        pts = sorted((r["ttft_p99"], r["instance_seconds"], r["scale_up_below"], r["scale_down_above"])
                     for r in rows if r["policy"] == pol)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=pol)
        for x, y, up, down in pts:
            ax.annotate(f"{up:g}/{down:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("P99 TTFT (s)")
    ax.set_ylabel("instance-seconds")
    ax.grid(alpha=0.3)
    ax.legend()
    r0 = rows[0]
    ax.set_title(f"auto-scaling: {r0['trace']} at {r0['rate']:g} req/s (labels: scale-up/down freeness)")
    return _save(plt, fig, out_dir, "scaling.png")
