"""`kvferry bench chaos`: a short run (sim workers only) goes through each chaos action and reports
no hung request, no lost token and no leaked block."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)


def test_bench_chaos_short_run(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "chaos", "--requests", "60",
                           "--baseline-requests", "20", "--concurrency", "8", "--chaos-interval", "0.5",
                           "--torch-requests", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "| chaos |" in proc.stdout and "P99 e2e latency impact" in proc.stdout
    d = json.loads(out.read_text())
    ch = d["chaos"]
    actions = " ".join(e["action"] for e in ch["events"])
    assert "kill -9 worker" in actions and "kill -9 scheduler" in actions and "SIGTERM worker" in actions
    assert ch["requests"] >= 60 and ch["hung"] == 0 and ch["lost_tokens"] == 0 and ch["leaked_blocks"] == 0
    assert ch["completed"] + ch["cancelled"] + ch["rejected"] + ch["failed"] == ch["requests"]
    assert d["baseline"]["completed"] > 0 and d["p99_impact"] > 0
