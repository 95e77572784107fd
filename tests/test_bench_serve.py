"""`kvferry bench serve` against a real local cluster (scheduler, 2 sim workers, frontend): about 20
requests over HTTP and over the SDK; the JSON has the metrics and the policy read from the cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.config import load_config
from services.launcher import ClusterSpec, LocalCluster, free_ports


@pytest.fixture(scope="module")
def cluster():
    http, base = free_ports(2)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "worker": {"engine": "sim", "model": "instant", "num_blocks": 4096, "max_num_seqs": 64},
        "frontend": {"model": "tiny"},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=2, ready_timeout_s=60, extra_env={"KVFERRY_LOG_LEVEL": "warning"}))
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.parametrize("via", ["http", "sdk"])
def test_bench_serve_replays_a_trace(cluster, tmp_path, via):
    out, saved = tmp_path / "serve.json", tmp_path / "trace.jsonl"
    target = ["--url", cluster.http_url] if via == "http" else ["--sdk", cluster.sdk_endpoint]
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "serve", *target,
                           "--scheduler", cluster.scheduler_endpoint, "--trace", "uniform:8:32-uniform:4:16",
                           "--rate", "40", "--requests", "20", "--high-priority-fraction", "0.2",
                           "--goodput", "ttft:5000", "--save-trace", str(saved), "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "20/20 done" in proc.stderr  # the progress bar
    assert "TTFT" in proc.stdout and "E2E latency" in proc.stdout
    d = json.loads(out.read_text())
    assert d["via"] == via and d["policy"] == cluster.spec.config.scheduler.policy
    s = d["summary"]
    assert s["completed"] == 20 and s["failed"] == 0
    for key in ("ttft", "tpot", "itl", "e2e"):
        assert set(s[key]) == {"mean", "median", "p90", "p99"}
        assert 0 < s[key]["median"] <= s[key]["p99"]
    assert s["ttft"]["mean"] < s["e2e"]["mean"]
    assert 0 < s["goodput"] <= s["request_throughput"]
    assert set(s["classes"]) == {"high", "normal"}
    for key in ("ttft_mean", "ttft_p99", "decode_mean", "decode_p99", "e2e_mean", "e2e_p99", "preemption_loss_mean"):
        assert d[key] is not None
    # ignore_eos + max_tokens: every request produced exactly its output length
    want = sum(json.loads(line)["output_len"] for line in saved.read_text().splitlines())
    assert round(s["output_throughput"] * s["duration_s"]) == want


def test_reuse_traces_send_prompts_that_share_their_segments() -> None:
    from bench.serve import PROMPT_IDS, request_prompt
    from workload.reuse import generate_reuse

    trace = generate_reuse("system-prompt", 20, 5.0, seed=1)
    a = trace[0]
    b = next(r for r in trace[1:] if r.segments[0] == a.segments[0])
    pa, pb = request_prompt(a, 0), request_prompt(b, 1)
    n = a.segments[0][1]
    assert len(pa) == a.input_len and pa[:n] == pb[:n] and pa[n:] != pb[n:]
    assert set(pa) <= set(PROMPT_IDS)
    turns = generate_reuse("multi-turn", 8, 2.0, seed=1)
    later = next(r for r in turns if len(r.segments) > 2)
    assert len(request_prompt(later, 5)) == later.input_len


def test_bench_serve_replays_a_reuse_trace(cluster, tmp_path):
    import asyncio

    from protocol import SchedulerReplies, StatusReply, StatusRequest
    from protocol.sockets import request_once

    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "serve", "--sdk", cluster.sdk_endpoint,
                           "--scheduler", cluster.scheduler_endpoint, "--trace", "system-prompt",
                           "--rate", "20", "--requests", "12", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = json.loads(out.read_text())
    assert d["trace"] == "system-prompt" and d["summary"]["completed"] == 12
    # The workers cached the shared prefixes and told the scheduler (its prefix index).
    st = asyncio.run(request_once(cluster.scheduler_endpoint, StatusRequest(include_requests=False),
                                  SchedulerReplies, 10.0))
    assert isinstance(st, StatusReply) and sum(i.indexed_blocks for i in st.instances) >= 96
    bad = subprocess.run([sys.executable, "-m", "cli.main", "bench", "serve", "--sdk", cluster.sdk_endpoint,
                          "--trace", "multi-turn", "--rate", "5", "--cv", "3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Poisson" in bad.stderr
