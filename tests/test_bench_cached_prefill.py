"""`kvferry bench cached-prefill` on the tiny model: the three kinds of prefill are timed, the cached
ones really hit the prefix cache, and bad settings are refused."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_cached_prefill_tiny(tmp_path):
    out = tmp_path / "cp.json"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "cached-prefill", "--model", "tiny",
                           "--dtype", "float32", "--prompt-len", "160", "--cached", "128", "--repeat", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio cached / new" in proc.stdout
    d = json.loads(out.read_text())
    assert d["new"] == 32 and d["hit_tokens_per_cached_prefill"] == 128  # every cached prefill hit the prefix
    assert all(d[k] > 0 for k in ("new_ms", "cached_ms", "cold_ms", "ratio", "speedup"))
    assert len(d["samples_ms"]["cached"]) == 2
    bad = subprocess.run([sys.executable, "-m", "cli.main", "bench", "cached-prefill", "--model", "tiny",
                          "--prompt-len", "160", "--cached", "100"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "multiple of the block size" in bad.stderr
