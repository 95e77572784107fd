"""`kvferry bench frontend`: a very short run against a real sim cluster writes the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_frontend_short_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "frontend", "--duration", "1",
                           "--concurrency", "4", "--streams", "4", "--stream-tokens", "32", "--instances", "8",
                           "--dispatch-requests", "200", "--json", str(out)],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "short requests/s" in proc.stdout and "dispatch" in proc.stdout
    d = json.loads(out.read_text())
    for key in ("machine", "requests_per_s", "streamed_tokens_per_s", "dispatch_ms", "short", "stream_http",
                "stream_sdk", "dispatch", "targets", "targets_met", "errors"):
        assert key in d, key
    assert d["machine"]["cpus"] >= 1
    assert d["errors"] == 0
    assert d["requests_per_s"] > 0 and d["short"]["requests"] > 0
    assert d["short"]["latency_ms"]["p50"] <= d["short"]["latency_ms"]["p99"]
    assert d["streamed_tokens_per_s"]["http"] > 0 and d["streamed_tokens_per_s"]["sdk"] > 0
    # every stream ran to max_tokens (ignore_eos): tokens are whole streams
    assert d["stream_http"]["tokens"] == 32 * d["stream_http"]["streams"]
    assert d["stream_sdk"]["tokens"] == 32 * d["stream_sdk"]["streams"]
    assert 0 < d["dispatch_ms"]["p50"] <= d["dispatch_ms"]["p99"] <= d["dispatch_ms"]["p999"]
    assert d["dispatch"]["instances"] == 8
    assert set(d["targets_met"]) == {"requests_per_s", "streamed_tokens_per_s", "dispatch_p99_ms"}
