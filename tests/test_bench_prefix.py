"""`kvferry bench prefix --quick`: rows per (trace, rate, policy) with the paper's fields and hit rates."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_prefix_quick(tmp_path):
    out = tmp_path / "prefix.json"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "prefix", "--quick", "--requests", "60",
                           "--traces", "system-prompt", "--json", str(out)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "oracle hit" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["rr", "load", "prefix", "kvferry"]
    for r in rows:
        for key in ("trace", "rate", "cv", "policy", "ttft_mean", "ttft_p99", "e2e_p99", "hit_rate", "oracle_hit_rate",
                    "throughput", "blocks_skipped"):
            assert key in r, key
    hit = {r["policy"]: r["hit_rate"] for r in rows}
    assert hit["prefix"] > hit["rr"] and hit["kvferry"] > hit["load"]
    bad = subprocess.run([sys.executable, "-m", "cli.main", "bench", "prefix", "--traces", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--traces" in bad.stderr
