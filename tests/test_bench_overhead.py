"""`kvferry bench overhead`: a short paired run (the tiny model, in process and through a live
1-worker cluster) reports TPOT, TTFT and prefill on both sides, their ratios and the serving
path's CPU per token, as JSON and a table. No speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def test_bench_overhead_short_run(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "overhead", "--model", "tiny", "--dtype",
                           "float32", "--batch-sizes", "1,3", "--pairs", "2", "--prompt-len", "16", "--output-len",
                           "8", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kvferry bench overhead" in proc.stdout and "TPOT served" in proc.stdout
    d = json.loads(out.read_text())
    assert [s["batch"] for s in d["summary"]] == [1, 3]
    assert [(r["batch"], r["pair"]) for r in d["rows"]] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    for r in d["rows"]:
        for side in ("in_process", "served"):
            assert r[side]["tpot_ms"] > 0 and r[side]["ttft_ms"] > 0 and r[side]["prefill_tok_s"] > 0
            assert 0.0 <= r[side]["steal"] <= 1.0
        assert r["tpot_ratio"] > 0 and r["prefill_ratio"] > 0 and r["worker_loop_us_per_token"] >= 0
