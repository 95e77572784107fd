"""`kvferry bench paper --quick`: runs every experiment small, prints the tables, writes the JSON
rows with the documented keys and the PNG plots."""

from __future__ import annotations

import json
import subprocess
import sys

KEYS = ("trace", "rate", "cv", "policy", "ttft_mean", "ttft_p99", "decode_mean", "decode_p99", "e2e_mean", "e2e_p99",
        "preemption_loss_mean", "instance_seconds")


def test_bench_paper_quick(tmp_path):
    out, plots = tmp_path / "paper.json", tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "paper", "--quick", "--requests", "60",
                           "--json", str(out), "--plots", str(plots)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("256-256, Poisson", "256-256, Gamma CV 4", "kvferry vs load", "priorities:", "auto-scaling:"):
        assert text in proc.stdout, text
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for r in rows:
        for k in KEYS:
            assert k in r, (k, r)
        assert r["ttft_mean"] > 0 and r["instance_seconds"] > 0
        assert not any(k.startswith("_") for k in r)
    by = {e: [r for r in rows if r["experiment"] == e] for e in ("serving", "priority", "scaling")}
    assert {r["policy"] for r in by["serving"]} == {"kvferry", "load", "rr"}
    assert {r["cv"] for r in by["serving"]} == {1.0, 4.0}
    assert {r["policy"] for r in by["priority"]} == {"kvferry", "kvferry-nopri"}
    for r in by["priority"]:
        assert set(r["classes"]) == {"high", "normal"}
        assert all(k in r["classes"]["high"] for k in KEYS[4:11])
    assert len({(r["scale_up_below"], r["scale_down_above"]) for r in by["scaling"]}) == 2
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["cdf_256-256.png", "latency_256-256_gamma4.png", "latency_256-256_poisson.png",
                     "priority.png", "scaling.png"]
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
