"""Prometheus metrics of a running local cluster: `kvferry up` (scheduler, 2 sim workers, frontend)
turns /metrics on for every service and prints where; every name documented in deploy/README.md is
served by its service with its type, and the values move after traffic (requests through the
OpenAI API, a drain that migrates running requests). Plus in-process checks of the scheduler's
event counters and of the metrics server's /health.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocol import DispatchReply, DispatchRequest, ErrorCode, ErrorReply, MigrationResult
from protocol.sockets import Received
from services.launcher import free_ports
from services.metrics_http import call_on_loop, start_metrics_server
from services.scheduler.metrics import SchedulerMetrics
from tests.test_deploy import documented_metrics

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny"  # the frontend's tokenizer with sim workers
LONG_TOKENS = 400  # ~11 s of decode at the llama7b-a10 profile: still running when the drain starts


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[dict[str, str], Samples]:
    """({family name: type}, {(sample name, sorted labels): value}) of one /metrics endpoint."""
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, (url, r.status_code)
    types: dict[str, str] = {}
    samples: Samples = {}
    for fam in text_string_to_metric_families(r.text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


class Up:
    """`kvferry up` with 2 sim workers; the endpoints it prints."""

    def __init__(self) -> None:
        self.http, self.base = free_ports(2)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
        env["KVFERRY_LOG_LEVEL"] = "WARNING"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "up", "--engine", "sim", "--model", "llama7b-a10", "--workers", "2",
             "--num-blocks", "512", "--http-port", str(self.http), "--base-port", str(self.base),
             "--ready-timeout", "120"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + 150
        while not any(ln.strip().startswith("workers http") for ln in self.lines):
            line = self.proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"kvferry up did not report its metrics endpoints: {self.lines}")
            self.lines.append(line.rstrip("\n"))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # keep draining
        text = "\n".join(self.lines)
        self.urls = {"frontend": re.search(r"metrics\s+: frontend (\S+)", text).group(1),
                     "scheduler": re.search(r"scheduler (http://\S+/metrics)", text).group(1)}
        m = re.search(r"workers http://([\d.]+):(\d+)\.\.(\d+)/metrics", text)
        for i, port in enumerate(range(int(m.group(2)), int(m.group(3)) + 1)):
            self.urls[f"worker-{i}"] = f"http://{m.group(1)}:{port}/metrics"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def up():
    u = Up()
    try:
        yield u
    finally:
        u.stop()


def ctl(up: Up, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", "ctl", *args, "--base-port", str(up.base)],
                          capture_output=True, text=True, timeout=90, cwd=ROOT)


@pytest.mark.slow
def test_every_service_serves_its_documented_metrics_and_they_move(up):
    assert set(up.urls) == {"frontend", "scheduler", "worker-0", "worker-1"}
    docs = documented_metrics()
    before = {name: scrape(url) for name, url in up.urls.items()}
    for service, (types, _) in before.items():
        kind = "worker" if service.startswith("worker-") else service
        for metric, (owner, mtype) in docs.items():
            if owner != kind:
                continue
            family = metric.removesuffix("_total") if mtype == "counter" else metric
            assert types.get(family) == mtype, f"{service}: {metric} ({mtype}) missing or typed {types.get(family)}"
    for url in up.urls.values():  # /health next to /metrics
        assert httpx.get(url.replace("/metrics", "/health"), timeout=10).status_code == 200

    # Traffic: short requests (one streamed), and long streams that a drain of worker-0 migrates.
    api = f"http://127.0.0.1:{up.http}/v1"
    for i in range(4):
        r = httpx.post(f"{api}/completions", json={"model": MODEL, "prompt": f"hello {i}", "max_tokens": 8},
                       timeout=60)
        assert r.status_code == 200, r.text
    with httpx.stream("POST", f"{api}/completions", json={"model": MODEL, "prompt": "stream", "max_tokens": 16,
                                                          "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and "[DONE]" in "".join(r.iter_text())

    results: list[int] = []

    def long_stream(i: int) -> None:
        with httpx.stream("POST", f"{api}/completions", timeout=120,
                          json={"model": MODEL, "prompt": f"a long story {i}", "max_tokens": LONG_TOKENS,
                                "ignore_eos": True, "stream": True}) as r:
            text = "".join(r.iter_text())
            results.append(r.status_code if "[DONE]" in text else -1)

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20  # until worker-0 decodes some of them (load dispatch spreads them)
    while True:
        status = ctl(up, "status", "--json")
        held = [r for r in json.loads(status.stdout)["requests"] if r["worker_id"] == "worker-0"] if \
            status.returncode == 0 else []
        if held:
            break
        assert time.monotonic() < deadline, f"no request reached worker-0: {status.stdout}"
        time.sleep(0.2)
    out = ctl(up, "drain", "worker-0", "--wait", "60")
    assert out.returncode == 0, out.stderr + out.stdout
    for t in threads:
        t.join(150)
    assert results == [200] * 4

    after = {name: scrape(url)[1] for name, url in up.urls.items()}
    old = {name: s for name, (_, s) in before.items()}
    sch = after["scheduler"]

    def grew(service: str, name: str, by: float = 1, **labels: str) -> None:
        delta = value(after[service], name, **labels) - value(old[service], name, **labels)
        assert delta >= by, f"{service}: {name}{labels or ''} grew by {delta}, expected >= {by}"

    # frontend
    grew("frontend", "kvferry_requests_total", 9, outcome="length")
    grew("frontend", "kvferry_generated_tokens_total", 4 * LONG_TOKENS)
    for h in ("kvferry_time_to_first_token_seconds", "kvferry_e2e_request_latency_seconds",
              "kvferry_dispatch_latency_seconds"):
        grew("frontend", f"{h}_count", 9)
    grew("frontend", "kvferry_inter_token_latency_seconds_count", 100)
    # ... and under vLLM's names, for dashboards and autoscalers written for vLLM
    for h in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        grew("frontend", f"{h}_count", 9, model_name=MODEL)
    grew("frontend", "vllm:inter_token_latency_seconds_count", 100, model_name=MODEL)
    grew("frontend", "vllm:generation_tokens_total", 4 * LONG_TOKENS, model_name=MODEL)
    grew("frontend", "vllm:prompt_tokens_total", 9, model_name=MODEL)
    # scheduler
    grew("scheduler", "kvferry_scheduler_dispatches_total", 9, outcome="dispatched")
    grew("scheduler", "kvferry_scheduler_dispatch_decision_seconds_count", 9)
    grew("scheduler", "kvferry_scheduler_migrations_total", 1, outcome="committed", trigger="drain")
    grew("scheduler", "kvferry_scheduler_migration_downtime_seconds_count", 1)
    grew("scheduler", "kvferry_scheduler_instance_seconds_total", 2)
    assert value(sch, "kvferry_scheduler_worker_registrations_total") >= 2
    assert value(sch, "kvferry_scheduler_instances", state="alive") == 2
    for w in ("worker-0", "worker-1"):
        assert value(sch, "kvferry_instance_capacity_blocks", instance_id=w) == 512
        assert value(sch, "kvferry_instance_up", instance_id=w) == 1
    assert value(sch, "kvferry_instance_draining", instance_id="worker-0") == 1
    # workers: worker-0 migrated out, worker-1 took them in
    grew("worker-0", "kvferry_migrations_committed_total", 1, role="out")
    grew("worker-0", "kvferry_migration_downtime_seconds_count", 1)
    grew("worker-1", "kvferry_migrations_committed_total", 1, role="in")
    w0, w1 = after["worker-0"], after["worker-1"]
    assert value(w0, "kvferry_worker_draining") == 1 and value(w1, "kvferry_worker_draining") == 0
    for w, s in (("worker-0", w0), ("worker-1", w1)):
        assert value(s, "kvferry_worker_info", worker_id=w, engine="sim") == 1
        assert value(s, "kvferry_worker_capacity_blocks") == 512
        assert value(s, "kvferry_worker_registered") == 1
        assert value(s, "kvferry_worker_used_blocks") + value(s, "kvferry_worker_free_blocks") == 512
        usage = value(s, "vllm:kv_cache_usage_perc", model_name="llama7b-a10")
        assert usage == pytest.approx(value(s, "kvferry_worker_used_blocks") / 512)
        assert value(s, "vllm:num_requests_running", model_name="llama7b-a10") == value(s, "kvferry_worker_running_requests")
        assert ("vllm:num_requests_waiting", (("model_name", "llama7b-a10"),)) in s


def test_kvferry_up_metrics_port_flag_and_off():
    from cli.up import _metrics_ports
    from services.config import load_config

    cfg = load_config(env={})
    _metrics_ports(cfg, 19300)
    assert (cfg.scheduler.metrics_port, cfg.worker.metrics_port) == (19300, 19301)
    _metrics_ports(cfg, 0)
    assert (cfg.scheduler.metrics_port, cfg.worker.metrics_port) == (0, 0)
    cfg = load_config(env={"KVFERRY_SCHEDULER_METRICS_PORT": "19400", "KVFERRY_WORKER_METRICS_PORT": "19500"})
    _metrics_ports(cfg, None)  # configured ports are kept
    assert (cfg.scheduler.metrics_port, cfg.worker.metrics_port) == (19400, 19500)
    cfg = load_config(env={})
    _metrics_ports(cfg, None)  # free ones otherwise
    assert cfg.scheduler.metrics_port > 0 and cfg.worker.metrics_port == cfg.scheduler.metrics_port + 1


async def test_scheduler_event_counters():
    """The handler wrapper counts dispatch outcomes and migration results (bounded reason labels)."""
    m = SchedulerMetrics()
    replies = iter([DispatchReply(reply_to="a", request_id="r1", worker_id="w0", worker_address="tcp://h:1"),
                    ErrorReply(reply_to="b", code=ErrorCode.UNAVAILABLE, message="none"),
                    ErrorReply(reply_to="c", code=ErrorCode.INVALID, message="bad")])

    async def handler(rec: Received):  # noqa: ANN202
        return next(replies) if isinstance(rec.msg, DispatchRequest) else None

    handle = m.wrap(handler, trigger_of=lambda mid: "drain" if mid == "m1" else None)
    for i in range(3):
        await handle(Received(peer=b"p", msg=DispatchRequest(request_id=f"r{i}", num_prompt_tokens=4,
                                                             frontend_id="f")))
    result = dict(request_id="r1", src_worker_id="w0", dst_worker_id="w1")
    await handle(Received(peer=b"p", msg=MigrationResult(migration_id="m1", outcome="committed", downtime_ms=12.0,
                                                         **result)))
    await handle(Received(peer=b"p", msg=MigrationResult(migration_id="m2", outcome="aborted",
                                                         reason="destination: no_room", **result)))
    for i in range(40):
        m.on_migration_result(MigrationResult(migration_id=f"x{i}", outcome="aborted", reason=f"odd{i}", **result),
                              "load")
    v = m.registry.get_sample_value
    assert v("kvferry_scheduler_dispatches_total", {"outcome": "dispatched"}) == 1
    assert v("kvferry_scheduler_dispatches_total", {"outcome": "unavailable"}) == 1
    assert v("kvferry_scheduler_dispatches_total", {"outcome": "error"}) == 1
    assert v("kvferry_scheduler_dispatch_decision_seconds_count") == 3
    assert v("kvferry_scheduler_migrations_total", {"outcome": "committed", "reason": "none", "trigger": "drain"}) == 1
    assert v("kvferry_scheduler_migrations_total", {"outcome": "aborted", "reason": "destination",
                                                    "trigger": "unknown"}) == 1
    assert v("kvferry_scheduler_migration_downtime_seconds_sum") == pytest.approx(0.012)
    reasons = {s.labels["reason"] for fam in m.registry.collect() for s in fam.samples
               if s.name == "kvferry_scheduler_migrations_total"}
    assert "other" in reasons and len(reasons) <= 33


async def test_metrics_server_health_and_loop_calls():
    from prometheus_client import CollectorRegistry, Counter

    loop = asyncio.get_running_loop()
    reg = CollectorRegistry()
    Counter("kvferry_test_things", "things", registry=reg).inc(3)
    state = {"ok": True}
    server = start_metrics_server("127.0.0.1", 0, reg,
                                  health=lambda: call_on_loop(loop, lambda: (state["ok"], {"n": 1}), 2.0))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            r = await client.get("/metrics")
            assert "kvferry_test_things_total 3.0" in r.text
            r = await client.get("/health")
            assert r.status_code == 200 and r.json() == {"status": "ok", "n": 1}
            state["ok"] = False
            r = await client.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "unavailable"
    finally:
        server.close()
    assert call_on_loop(loop, lambda: 7) == 7  # on the loop's own thread: called directly


def test_a_repeated_prompt_is_served_from_the_prefix_cache_and_a_salt_keeps_it_apart(up):
    """Four times the same long prompt over 2 workers: at most two misses (one per worker), so at
    least two requests find their prompt cached; the hits show on the workers' /metrics. The same
    prompt under a cache_salt of its own finds nothing."""
    api = f"http://127.0.0.1:{up.http}/v1"
    prompt = "You are a careful assistant who answers briefly. " * 16  # ~780 byte tokens: 48 blocks
    workers = [w for w in up.urls if w.startswith("worker-")]

    def totals() -> tuple[float, float]:
        scraped = [scrape(up.urls[w])[1] for w in workers]
        return (sum(value(s, "kvferry_worker_prefix_cache_hits_total") for s in scraped),
                sum(value(s, "kvferry_worker_prefix_cache_queries_total") for s in scraped))

    def ask(**extra: str) -> None:
        r = httpx.post(f"{api}/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra},
                       timeout=60)
        assert r.status_code == 200, r.text

    hits0, queries0 = totals()
    for _ in range(4):
        ask()
    hits1, queries1 = totals()
    assert queries1 - queries0 >= 4 * 700
    assert hits1 - hits0 >= 2 * 40 * 16  # two requests, nearly all of their ~48 blocks
    ask(cache_salt="tenant-b")
    assert totals()[0] == hits1  # another tenant's request reuses nothing
    r = httpx.post(f"{api}/completions", json={"model": MODEL, "prompt": "x", "cache_salt": 5}, timeout=30)
    assert r.status_code == 400 and "cache_salt" in r.text
