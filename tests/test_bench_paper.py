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
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "paper", "--quick", "--requests", "24",
                           "--jobs", "1", "--json", str(out), "--plots", str(plots)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("128-128, Poisson", "kvferry vs load", "Fig 11: the paper (up to) beside ours", "priorities:",
                 "Fig 13: priorities", "Fig 14: auto-scaling", "Fig 15: scaling thresholds", "INFaaS++ paper"):
        assert text in proc.stdout, text
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for r in rows:
        for k in KEYS:
            assert k in r, (k, r)
        assert r["ttft_mean"] > 0 and r["instance_seconds"] > 0
        assert not any(k.startswith("_") for k in r)
    by = {e: [r for r in rows if r["experiment"] == e] for e in ("serving", "priority", "scaling", "threshold")}
    assert {r["policy"] for r in by["serving"]} == {"kvferry", "load", "rr"}
    assert {r["trace"] for r in by["serving"]} == {"128-128"} and {r["cv"] for r in by["serving"]} == {1.0}
    assert {r["policy"] for r in by["priority"]} == {"kvferry", "kvferry-nopri"}
    for r in by["priority"]:
        assert set(r["classes"]) == {"high", "normal"}
        assert all(k in r["classes"]["high"] for k in KEYS[4:11])
    for r in by["scaling"] + by["threshold"]:
        assert 1.0 <= r["avg_instances"] <= 4.0 and r["start_instances"] == 2
    assert {r["cv"] for r in by["scaling"]} == {1.0, 2.0, 6.0}  # Poisson and Gamma points
    assert {r["scale_up_below"] for r in by["threshold"]} == {5.0, 85.0}
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["cdf_128-128.png", "latency_128-128_poisson.png", "priority.png", "scaling.png",
                     "thresholds.png"]
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_the_plan_runs_the_papers_settings():
    from bench.paper_runs import SERVING, plan, policy_of

    specs = plan(10000, 16, 0)
    serving = [s for s in specs if s.experiment == "serving"]
    assert {s.trace for s in serving} == set(SERVING)
    assert sorted({s.rate for s in serving if s.trace == "256-256"}) == [7.4, 7.7, 8.0]
    assert all(s.max_num_batched_tokens == 12800 and s.requests == 10000 for s in serving)
    assert {s.migrate_threshold for s in serving if s.trace == "256-256"} == {10.0}
    pri = [s for s in specs if s.experiment == "priority"]
    assert {(s.trace, s.rate, s.high_priority_fraction) for s in pri} == {("128-128", 26.0, 0.1)}
    assert sorted({s.cv for s in pri}) == [2.0, 4.0, 6.0, 8.0]
    sc = [s for s in specs if s.experiment == "scaling"]
    assert sorted({s.rate for s in sc if s.cv == 1.0}) == [2.0, 2.2, 2.4, 2.6, 2.8, 3.0]
    assert sorted({s.cv for s in sc if s.cv != 1.0}) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert all((s.start_instances, s.instances, s.scale_up_below, s.scale_down_above) == (8, 16, 10.0, 60.0)
               for s in sc)
    th = [s for s in specs if s.experiment == "threshold"]
    assert sorted({(s.scale_up_below, s.scale_down_above) for s in th}) == [(u, u + 50) for u in (5, 25, 45, 65, 85)]
    base = policy_of(next(s for s in th if s.policy == "load"))
    ours = policy_of(next(s for s in th if s.policy == "kvferry"))
    assert not base.migrate and not base.drain_migrates and ours.migrate and ours.drain_migrates
    assert ours.priority_load_cap_tokens == 1600 and ours.migrate_out_below == ours.migrate_in_above == 3.0
    assert len(plan(10000, 16, 0, all_rates=True)) > len(specs)
