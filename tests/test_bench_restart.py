"""`kvferry bench restart`: a short run with sim workers reports the cold start and a killed
worker's way back (restarted, READY, registered, served: in that order) as JSON and a table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def test_bench_restart_short_run(tmp_path):
    out = tmp_path / "restart.json"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "restart", "--engine", "sim", "--model",
                           "instant", "--workers", "1", "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cold start" in proc.stdout and "registered" in proc.stdout
    d = json.loads(out.read_text())
    (r,) = d["rounds"]
    assert 0 < r["restart_s"] <= r["ready_s"] <= r["registered_s"] <= r["served_s"]
    assert d["cold_start_s"] > 0 and d["median"]["served_s"] == r["served_s"]
