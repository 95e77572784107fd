"""`kvferry bench pd --quick`: every (trace, rate, mode) row with the fields its JSON promises."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_pd_quick_writes_a_row_per_trace_rate_and_mode(tmp_path):
    out = tmp_path / "pd.json"
    r = subprocess.run([sys.executable, "-m", "cli.main", "bench", "pd", "--quick", "--requests", "80", "--jobs", "2",
                        "--traces", "2048-256,shift", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(x["trace"], x["mode"]) for x in rows} == {(t, m) for t in ("2048-256", "shift")
                                                      for m in ("colocated", "pd-1:3", "pd-2:2", "adaptive")}
    for x in rows:
        assert {"trace", "rate", "mode", "ttft_p99", "itl_p99", "tpot_p99", "goodput"} <= set(x)
        assert x["completed"] == 80 and (x["handoffs"] > 0) == (x["mode"] != "colocated")
    assert "ITL P99 s" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "cli.main", "bench", "pd", "--modes", "pd-9:9", "--quick"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "P + D" in bad.stderr
