"""`kvferry bench transfer --between-hosts`: the frames path between two network-namespace hosts
moves KV bit-identical, and a short real run writes the documented JSON (bandwidth rows for
loopback and the veth, the downtime row of a cluster across two hosts with Curve) and leaves no
namespace behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.transfer import HOSTS_PATH, run_pair
from testkit.netns import HostNetwork, NetnsUnavailable, check_available, netns_names

ROOT = Path(__file__).resolve().parents[1]

try:
    check_available()
except NetnsUnavailable as exc:  # not root, no iproute2, or namespaces refused: say which
    pytest.skip(f"network namespaces unavailable: {exc}", allow_module_level=True)


def test_frames_between_hosts_arrive_bit_identical():
    with HostNetwork(["a", "b"]) as net:
        a, b = net.hosts["a"], net.hosts["b"]
        # SmolLM2 blocks (360 KiB) in 1 MiB chunks: many chunks over the veth, two in flight.
        times, ok = run_pair("frames", 64, torch.bfloat16, [(list(range(0, 40)), list(range(20, 60)))], reps=2,
                             seed=5, verify=True, opts={"chunk_bytes": 1 << 20, "depth": 2}, timeout=120,
                             hosts=((a.netns, a.address), (b.netns, b.address)))
        prefix = net.prefix
    assert ok == [True, True] and len(times[0]) == 2
    assert not [ns for ns in netns_names() if ns.startswith(prefix + "-")]


def test_bench_transfer_between_hosts_short_run(tmp_path: Path):
    out = tmp_path / "transfer.json"
    cmd = [sys.executable, "-m", "cli.main", "bench", "transfer", "--between-hosts", "--sizes", "1MB", "--paths",
           "frames", "--reps", "1", "--migrations", "1", "--model", "tiny", "--context", "128", "--clusters", "two-hosts-curve",
           "--json", str(out)]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "KVFERRY_LOG_LEVEL": "WARNING"}) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    data = json.loads(out.read_text())
    paths = {r["path"]: r for r in data["results"]}
    assert {"frames", HOSTS_PATH} <= set(paths) and paths[HOSTS_PATH]["gb_per_s"] > 0
    rows = {r["cluster"]: r for r in data["migrations"]}
    assert set(rows) == {"two hosts + Curve"}  # one cluster keeps `make test` short; each is the same code
    for r in rows.values():
        assert r["migrations"] == 1 and r["bytes_per_move"] > 0 and r["downtime_ms_median"] >= 0, r
    assert "two hosts + Curve" in stdout and HOSTS_PATH in stdout
    # The bench's namespaces (its own and its clusters', named after its pid) are gone.
    assert not [ns for ns in netns_names() if ns.startswith(f"kvf{proc.pid}-")]
