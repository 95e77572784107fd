"""`kvferry bench migration`: the downtime arithmetic on synthetic timestamps, and a short real run
(two tiny-model worker processes) that writes the documented JSON and a PNG plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.migration import (
    REQUIRED_KEYS,
    BenchError,
    OthersCPU,
    Stream,
    _proc_cpu_s,
    downtime_ms,
    evaluate_targets,
    first_gap_after,
    gaps_ending_in,
    median_ms,
    migration_plan,
    recent_gaps,
    slowdown_pct,
    switch_index,
)

ROOT = Path(__file__).resolve().parents[1]


# ---- pure computations ------------------------------------------------------------------------------

def test_stream_stitches_out_of_order_batches_and_rejects_repeats():
    s = Stream("r")
    s.feed(0, [10, 11], "worker-0", 1.0)
    s.feed(3, [13], "worker-1", 1.2)  # the new owner's first token overtakes the old owner's last one
    assert len(s) == 2
    with pytest.raises(BenchError):
        s.check_complete()
    s.feed(2, [12], "worker-0", 1.1)
    assert s.tokens == [10, 11, 12, 13]
    assert s.times == [1.0, 1.0, 1.1, 1.2]  # arrival times, not the time the gap was filled
    assert s.owner_runs() == [("worker-0", 0), ("worker-1", 3)]
    assert switch_index(s.workers, 1, "worker-1") == 3 and switch_index(s.workers, 0, "worker-2") is None
    s.check_complete()
    with pytest.raises(BenchError, match="twice"):
        s.feed(3, [99], "worker-0", 1.3)  # both owners produced index 3
    s.feed(4, [], "worker-1", 1.4, finish_reason="abort")  # a final batch may carry no token
    assert s.finish_reason == "abort"
    with pytest.raises(BenchError, match="after its final batch"):
        s.feed(4, [14], "worker-1", 1.5)


def test_gap_windows():
    t = [0.0, 0.010, 0.020, 0.030, 0.045, 0.060, 0.070]
    assert gaps_ending_in(t, 0.020, 0.045) == pytest.approx([0.010, 0.015])
    assert gaps_ending_in(t, 0.020, 0.045, include_end=False) == pytest.approx([0.010])
    assert gaps_ending_in(t, 0.071, 1.0) == []
    assert first_gap_after(t, 0.031) == pytest.approx([0.015])
    assert first_gap_after(t, 0.070) == []
    # the last 3 gaps before index 5, not reaching back before index 1
    assert recent_gaps(t, 1, 5, 3) == pytest.approx([0.010, 0.010, 0.015])
    assert recent_gaps(t, 3, 5, 10) == pytest.approx([0.015])
    assert median_ms([0.010, 0.030, 0.020]) == pytest.approx(20.0)
    assert median_ms([]) is None


def test_downtime_is_the_extra_gap():
    # tokens every 20 ms; the migration's switch takes 50 ms: 30 ms of downtime
    assert downtime_ms(1.000, 1.050, 20.0) == pytest.approx(30.0)
    # a fully hidden migration: about zero, either sign
    assert downtime_ms(1.000, 1.019, 20.0) == pytest.approx(-1.0)
    assert slowdown_pct(20.0, 20.2) == pytest.approx(1.0)
    assert slowdown_pct(None, 20.0) is None


def test_migration_plan_alternates_and_ends_with_one_recompute():
    assert migration_plan(1) == [("live", 0, 1), ("blocking", 1, 0), ("recompute", 0, 1)]
    assert migration_plan(2) == [("live", 0, 1), ("live", 1, 0), ("blocking", 0, 1), ("blocking", 1, 0),
                                 ("recompute", 0, 1)]
    assert [m for m, _, _ in migration_plan(3)] == ["live"] * 3 + ["blocking"] * 3 + ["recompute"]


def test_cpu_accounting_reads_live_processes():
    sum(i * i for i in range(200_000))  # some CPU time of our own
    assert _proc_cpu_s(os.getpid()) > 0
    assert _proc_cpu_s(2**22 + 12345) == 0.0  # no such process
    watch = OthersCPU([os.getpid()])
    assert watch.cores() is None or watch.cores() >= 0


def _record(ctx: int, live: float, recompute: float, step: float = 20.0, slow: float = 0.5) -> dict:
    return {"context_tokens": ctx, "live_ms": live, "blocking_ms": 2 * live, "recompute_ms": recompute,
            "decode_step_ms": step, "decode_step_during_migration_ms": step * (1 + slow / 100),
            "decode_slowdown_pct": slow, "decode_slowdown_dst_pct": slow / 2}


def test_targets():
    good = [_record(256, 5.0, 40.0), _record(4096, 6.0, 900.0), _record(8192, 7.0, 2500.0)]
    t = evaluate_targets(good)
    assert all(v["met"] for v in t.values()), t
    assert t["live_flatness"]["value"] == pytest.approx(1.4)
    assert t["recompute_over_live_at_4096"]["value"] == pytest.approx(150.0)
    bad = [_record(256, 5.0, 40.0), _record(4096, 30.0, 200.0, slow=3.0), _record(8192, 40.0, 2500.0)]
    t = evaluate_targets(bad)
    assert not t["live_flatness"]["met"] and not t["live_decode_steps"]["met"]
    assert t["live_decode_steps"]["at"] == 8192
    assert not t["recompute_over_live_at_4096"]["met"]
    assert not t["decode_slowdown_pct"]["met"] and t["decode_slowdown_pct"]["at"] == "source 4096"
    # downtimes within the timing floor count as equal; 4096 not measured: not judged
    t = evaluate_targets([_record(64, -0.5, 10.0), _record(200, 0.8, 12.0)])
    assert t["live_flatness"]["met"] and t["recompute_over_live_at_4096"]["met"] is None


# ---- a real run -------------------------------------------------------------------------------------

def test_bench_migration_tiny_run(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "migration", "--model", "tiny",
                           "--lengths", "64,200", "--migrations", "2", "--json", str(out), "--plot", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "recompute/live" in proc.stdout
    d = json.loads(out.read_text())
    assert d["model"] == "tiny" and d["machine"]["cpus"] >= 1
    assert [r["context_tokens"] for r in d["records"]] == [64, 200]
    for r in d["records"]:
        for key in REQUIRED_KEYS:
            assert isinstance(r[key], (int, float)), (key, r)
        for key in ("blocking_ms", "recompute_ms", "decode_step_ms", "decode_step_during_migration_ms",
                    "decode_step_dst_ms", "decode_step_dst_during_migration_ms"):
            assert r[key] > 0, (key, r)
        assert r["live_ms"] > -r["decode_step_ms"]  # a hidden migration is ~0, never far below
        migs = r["migrations"]
        assert [len(migs[mode]) for mode in ("live", "blocking", "recompute")] == [2, 2, 1]
        for m in migs["live"] + migs["blocking"] + migs["recompute"]:
            # gap_ms is measured at the sink, between tokens that came over two workers' sockets: on a
            # loaded machine the destination's first can arrive a few ms before the source's last
            assert isinstance(m["gap_ms"], float) and m["worker_downtime_ms"] > 0 and m["stages"] >= 1
        assert [(m["src"], m["dst"]) for m in migs["live"] + migs["blocking"]] == [("worker-0", "worker-1"),
                                                                                ("worker-1", "worker-0")] * 2
        assert all(m["bytes_moved"] > 0 for m in migs["live"] + migs["blocking"])
        assert migs["recompute"][0]["bytes_moved"] == 0  # only the state moves
        assert r["decode_gaps"]["src"] > 0 and r["decode_gaps"]["src_during"] > 0
        assert r["attempts"] == 1 and (r["others_cpu_cores"] is None or r["others_cpu_cores"] >= 0)
    assert set(d["targets"]) == {"live_flatness", "live_decode_steps", "recompute_over_live_at_4096",
                                 "decode_slowdown_pct"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
