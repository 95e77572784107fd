"""The monitoring files of deploy/ against a real Prometheus (marker `deploy`: `make test-deploy`,
which installs Debian's prometheus package first; `make test` leaves this module out).

- promtool checks deploy/prometheus/prometheus.yml (and the alerts.yml it loads) and runs the
  alert rules' unit tests (deploy/prometheus/alerts_test.yml); the job names the rules and the
  dashboard match on are the ones prometheus.yml scrapes.
- A local cluster (scheduler, 2 torch `tiny` workers, frontend, every /metrics endpoint on) is
  scraped by a Prometheus of our own (127.0.0.1, a free port, a temporary storage dir) whose
  configuration is deploy/prometheus/prometheus.yml with only the targets (and the scrape
  interval: 1 s) changed. Traffic then exercises what the dashboard graphs: completions and chats,
  streamed and not; a migration aborted for want of room, one commanded through the scheduler
  (the command `kvferry ctl migrate` sends), one made by the drain of a worker stopped with
  SIGTERM; that worker started again (a deregistration and a registration).
- Every PromQL expression of every panel of deploy/grafana/kvferry-dashboard.json (rows'
  nested panels too; Grafana's $__ variables and the dashboard's template variables substituted)
  is evaluated through Prometheus' HTTP API: each returns series, with finite values, >= 0 (but
  the freeness, which is signed), P50 <= P99 among a panel's quantiles of one histogram, the
  labels its legend names present, and the panels of counters the traffic moved above zero. A
  future panel is checked the same way. The alert rules, loaded by the same Prometheus, evaluate
  without error and none fires (the worker's restart was a clean one).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from protocol import ErrorReply, MigrateRequestTo, SchedulerReplies, StatusReply, StatusRequest
from protocol.sockets import request_once
from services.config import load_config
from services.launcher import ClusterSpec, LocalCluster, _die_with_parent, free_port_block, free_ports
from testkit.wait import until, wait_until

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "deploy" / "prometheus"
PROM_YML = PROM_DIR / "prometheus.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "kvferry-dashboard.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(420)]
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus and promtool are not on PATH: `make test-deploy` installs them (`make install-prometheus`: "
           "Debian's prometheus package)")

MODEL = "tiny"
NUM_BLOCKS = 512  # x 16 tokens: 8192 tokens per worker, the tiny model's context
# Two requests of LONG_PROMPT tokens (the byte tokenizer: one per character) cannot share a worker:
# 2 x 4150 tokens > 8192, so a migration of one onto the other's worker is refused (no_room).
LONG_PROMPT, LONG_TOKENS = 4150, 3900  # + LONG_TOKENS <= 8192; decoding them takes >= ~5 s
# Scraped (and rules evaluated) every 1 s instead of prometheus.yml's 5 s, so that the waits for
# targets and for counters to reach Prometheus, and the minimum rate window (4 scrapes), are short.
SCRAPE_S = 1
JOB_OF = {"frontend": "kvferry-frontend", "scheduler": "kvferry-scheduler"}  # else: kvferry-worker
# Series that may be negative: the freeness is -1e9 for a draining or dead instance.
SIGNED = {"kvferry_instance_freeness"}
# Counters the traffic below moves: a dashboard expression over one of them must sum above zero.
MOVED = {
    "kvferry_requests_total", "kvferry_generated_tokens_total", "kvferry_scheduler_dispatches_total",
    "kvferry_scheduler_instance_seconds_total", "kvferry_scheduler_worker_registrations_total",
    "kvferry_scheduler_worker_deregistrations_total", "kvferry_scheduler_migrations_total",
    "kvferry_migrations_started_total", "kvferry_migrations_committed_total", "kvferry_migrations_aborted_total",
    "kvferry_migration_bytes_total",
}


# ---- the dashboard ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str
    legend: str

    def __str__(self) -> str:
        return f"{self.panel!r} {self.ref}: {self.expr}"


def dashboard_queries(dash: dict[str, Any]) -> list[Query]:
    """Every Prometheus target of every panel, rows' nested (collapsed) panels included."""
    out: list[Query] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            if p.get("type") == "row":
                continue
            exprs = [t for t in p.get("targets", []) if t.get("expr")]
            assert exprs, f"panel {p.get('title')!r} has no PromQL target"
            out.extend(Query(p["title"], t.get("refId", "?"), t["expr"], t.get("legendFormat", "")) for t in exprs)

    walk(dash["panels"])
    return out


def substitute(expr: str, window_s: int, variables: dict[str, str]) -> str:
    """Grafana's interpolation for one instant evaluation over the last `window_s` seconds: the
    dashboard seen over exactly the traffic, so that $__rate_interval (a rate's window) and
    $__range cover it all; $__interval is one scrape (Grafana's floor for it). Template variables:
    their current value, `.*` for all (they stand in `=~` matchers)."""
    builtins = {"__rate_interval": f"{window_s}s", "__range": f"{window_s}s", "__range_s": str(window_s),
                "__range_ms": str(window_s * 1000), "__interval": f"{SCRAPE_S}s", "__interval_ms": str(SCRAPE_S * 1000)}
    values = {**variables, **builtins}
    for name in sorted(values, key=len, reverse=True):
        for form in (f"${{{name}}}", f"[[{name}]]", f"${name}"):
            expr = expr.replace(form, values[name])
    assert "$" not in expr and "[[" not in expr, f"a variable left unsubstituted in {expr}"
    return expr


def template_values(dash: dict[str, Any]) -> dict[str, str]:
    out = {}
    for v in dash.get("templating", {}).get("list", []):
        cur = (v.get("current") or {}).get("value")
        if isinstance(cur, list):
            cur = "|".join(cur)
        out[v["name"]] = ".*" if cur in (None, "", "$__all") else str(cur)
    return out


def metric_names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"\b(kvferry_\w+|vllm:\w+)", expr)}


QUANTILE = re.compile(r"^\s*histogram_quantile\(\s*([0-9.]+)\s*,")


def jobs_named(expr: str) -> set[str]:
    """The job names an expression matches on (`job="..."`, or each alternative of `job=~"a|b"`)."""
    out: set[str] = set()
    for op, value in re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', expr):
        out |= set(value.split("|")) if op == "=~" else {value}
    return out


# ---- Prometheus ------------------------------------------------------------------------------------

def live_targets(cluster: LocalCluster) -> dict[str, list[str]]:
    """prometheus.yml's job names -> the cluster's host:port of each (every metrics path /metrics)."""
    out: dict[str, list[str]] = defaultdict(list)
    for name, url in sorted(cluster.metrics_urls().items()):
        u = urlsplit(url)
        assert u.path == "/metrics", url
        out[JOB_OF.get(name, "kvferry-worker")].append(u.netloc)
    return dict(out)


def derived_config(cluster: LocalCluster) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the live cluster's targets: its jobs, metrics paths,
    target labels (the `cpu` profile's group: these workers run on the CPU) and rule files kept;
    the scrape and evaluation intervals 1 s (SCRAPE_S)."""
    cfg = yaml.safe_load(PROM_YML.read_text())
    cfg["global"].update(scrape_interval=f"{SCRAPE_S}s", scrape_timeout=f"{SCRAPE_S}s",
                         evaluation_interval=f"{SCRAPE_S}s")
    live = live_targets(cluster)
    assert {j["job_name"] for j in cfg["scrape_configs"]} == set(live), "prometheus.yml's jobs are not the services"
    for job in cfg["scrape_configs"]:
        assert "scrape_interval" not in job and "scrape_timeout" not in job, job["job_name"]
        groups = job["static_configs"]
        group = next((g for g in groups if (g.get("labels") or {}).get("profile") == "cpu"), groups[0])
        job["static_configs"] = [{**group, "targets": live[job["job_name"]]}]
    cfg["rule_files"] = [str((PROM_DIR / f).resolve()) for f in cfg.get("rule_files", [])]
    return cfg


class Prometheus:
    """A Prometheus process of our own: 127.0.0.1 on a free port, storage in `tmp`."""

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        self.port = free_port_block(1)
        self.url = f"http://127.0.0.1:{self.port}"
        conf = tmp / "prometheus.yml"
        conf.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = tmp / "prometheus.log"
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.close()
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def log_tail(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"prometheus exited ({self.proc.returncode}): {self.log_tail()}"
            with contextlib.suppress(httpx.HTTPError):
                return self.http.get("/-/ready").status_code == 200
            return False

        wait_until(ready, timeout_s, lambda: f"prometheus ready at {self.url}: {self.log_tail()}", step_s=0.2)

    def api(self, path: str, **params: Any) -> Any:
        r = self.http.get(f"/api/v1/{path}", params=params)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {r.status_code} {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's series as [{"metric": labels, "value": float}] (a scalar: one, no labels)."""
        data = self.api("query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": float(data["result"][1])}]
        assert data["resultType"] == "vector", data
        return [{"metric": s["metric"], "value": float(s["value"][1])} for s in data["result"]]

    def value(self, expr: str) -> float:
        """The sum of an instant query's values now (0 when it has none)."""
        return sum(s["value"] for s in self.query(expr))

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def all_up(prom: Prometheus, jobs: dict[str, list[str]]) -> bool:
    got = {(t["labels"]["job"], t["labels"]["instance"]): t["health"] for t in prom.targets()}
    want = {(job, target) for job, targets in jobs.items() for target in targets}
    return set(got) == want and all(h == "up" for h in got.values())


# ---- the cluster and its traffic -------------------------------------------------------------------

def start_cluster() -> LocalCluster:
    http, base = free_ports(2)
    metrics = free_port_block(3)  # as `kvferry up` does: the scheduler's, then worker i's at +1+i
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "scheduler": {"metrics_port": metrics},
        "worker": {"engine": "torch", "model": MODEL, "dtype": "float32", "num_blocks": NUM_BLOCKS,
                   "max_num_seqs": 64, "metrics_port": metrics + 1},
        "frontend": {"model": MODEL},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=2, ready_timeout_s=180))
    c.start()
    return c


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def sample_sum(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def status(c: LocalCluster) -> StatusReply:
    return await request_once(c.scheduler_endpoint, StatusRequest(), SchedulerReplies, 10.0)


class LongStream:
    """A streamed completion of a long prompt (ignore_eos), read until `close()` drops the
    connection (the frontend then aborts the request)."""

    def __init__(self, http: httpx.AsyncClient, prompt: str, max_tokens: int) -> None:
        self.id = ""
        self.tokens = 0
        self.started = asyncio.Event()  # the first token came: the prompt is prefilled
        self.finished = False
        self.task = asyncio.create_task(self._read(http, prompt, max_tokens))

    async def _read(self, http: httpx.AsyncClient, prompt: str, max_tokens: int) -> None:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    self.id = chunk["id"]
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        self.tokens += 1
                        self.started.set()
        self.finished = True

    async def where(self, c: LocalCluster) -> tuple[str, str] | None:
        """(the id the workers know it by, its worker), as the scheduler sees it; None if nowhere."""
        for r in (await status(c)).requests:
            if self.id and (r.request_id in self.id or self.id in r.request_id):
                return r.request_id, r.worker_id
        return None

    def alive(self) -> bool:
        if self.task.done() and self.task.exception() is not None:
            raise self.task.exception()
        assert not self.finished, f"{self.id} finished ({self.tokens} tokens) before the test was done with it"
        return True

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def long_prompt(seed: int) -> str:
    """LONG_PROMPT characters sharing no prefix with another seed's (no prefix-cache hit)."""
    import random

    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(LONG_PROMPT))


async def short_traffic(http_url: str) -> None:
    """Completions and chats, streamed and not, concurrently (TTFT, ITL, end-to-end, dispatch)."""
    client = openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key="x", timeout=120)

    async def completion(i: int) -> None:
        r = await client.completions.create(model=MODEL, prompt=f"request {i}:", max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 12

    async def streamed(i: int) -> None:
        s = await client.completions.create(model=MODEL, prompt=f"stream {i}:", max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
        usage = None
        async for chunk in s:
            usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens == 24

    async def chat(stream: bool) -> None:
        messages = [{"role": "user", "content": "Say something."}]
        if stream:
            s = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stream=True)
            assert [c async for c in s]
        else:
            r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
            assert r.choices[0].message.content is not None

    try:
        await asyncio.gather(*(completion(i) for i in range(6)), *(streamed(i) for i in range(6)),
                             chat(True), chat(False))
    finally:
        await client.close()


async def migrate(c: LocalCluster, request_id: str, dst: str) -> Any:
    """The scheduler's migrate command (MigrateRequestTo, what `kvferry ctl migrate` sends): Ack
    once the source has started it, or ErrorReply."""
    return await request_once(c.scheduler_endpoint, MigrateRequestTo(request_id=request_id, dst_worker_id=dst),
                              SchedulerReplies, 30.0, raise_errors=False)


async def migrations_and_a_restart(c: LocalCluster, prom: Prometheus) -> dict[str, str]:
    """A: a long request on one worker, B: on the other. B -> A's worker: aborted (no room), twice. A
    dropped; B -> A's worker: committed. A's worker stopped with SIGTERM: it drains (B moves back,
    trigger drain), deregisters and exits; started again, it registers. Returns what happened."""
    sched_metrics = c.metrics_urls()["scheduler"]
    async with httpx.AsyncClient(base_url=c.http_url, timeout=httpx.Timeout(120, connect=10)) as http:
        a = LongStream(http, long_prompt(1), LONG_TOKENS)
        b: LongStream | None = None
        try:
            await until(a.started.wait, 60, "request A's first token")
            rid_a, w_a = await until(lambda: a.where(c), 30, "request A on a worker", step_s=0.05)
            b = LongStream(http, long_prompt(2), LONG_TOKENS)
            await until(b.started.wait, 60, "request B's first token")
            rid_b, w_b = await until(lambda: b.where(c), 30, "request B on a worker", step_s=0.05)
            assert w_a != w_b, f"A and B ({LONG_PROMPT} prompt tokens each) were both dispatched to {w_a}"

            # 1. B onto A's worker: it cannot hold both, the destination refuses (no_room). Twice,
            # with a scrape between: an abort reason's series starts with its first abort (the
            # reasons are open-ended, their series are not made in advance), and rate() sees no
            # increase in a series' first sample; the second abort is what the panels show.
            for n in (1, 2):
                a.alive()
                b.alive()
                reply = await migrate(c, rid_b, w_a)
                assert not isinstance(reply, ErrorReply), reply
                await until(lambda n=n: sample_sum(scrape(sched_metrics), "kvferry_scheduler_migrations_total",
                                                   outcome="aborted") >= n,
                            30, f"aborted migration {n}'s result", step_s=0.1)
                if n == 1:  # the scheduler's series and both workers' (out on B's, in on A's) scraped
                    await until(lambda: asyncio.to_thread(
                        lambda: prom.value('sum(kvferry_scheduler_migrations_total{outcome="aborted"})') >= 1
                        and prom.value("count(kvferry_migrations_aborted_total)") >= 2),
                        30, "prometheus to scrape the first abort", step_s=0.2)
            sch = scrape(sched_metrics)
            assert sample_sum(sch, "kvferry_scheduler_migrations_total", outcome="aborted", reason="no_room") == 2, sch
            # the source's label is the reason's first word, as the destination's (not its free text)
            src = scrape(c.metrics_urls()[w_b])
            assert sample_sum(src, "kvferry_migrations_aborted_total", role="out", reason="no_room") == 2, src
            assert sample_sum(scrape(c.metrics_urls()[w_a]), "kvferry_migrations_aborted_total", role="in",
                              reason="no_room") == 2
            assert (await b.where(c))[1] == w_b  # B kept running where it was

            # 2. A dropped (its client goes away): B fits on A's worker now.
            b.alive()
            await a.close()
            await until(lambda: _gone(c, rid_a), 30, f"A gone from {w_a}", step_s=0.05)
            reply = await migrate(c, rid_b, w_a)
            assert not isinstance(reply, ErrorReply), reply
            await until(lambda: _on(c, rid_b, w_a), 30, f"B on {w_a}", step_s=0.05)

            # 3. SIGTERM to A's worker: it drains (B back to the other worker), deregisters, exits.
            b.alive()
            child = c.kill(w_a, signal.SIGTERM)
            await until(lambda: child.proc.poll() is not None, 60, f"{w_a} stopped after its drain", step_s=0.1)
            assert child.proc.returncode == 0, child.proc.returncode
            b.alive()
            assert await _on(c, rid_b, w_b), f"B did not move back to {w_b} in {w_a}'s drain"
            sch = scrape(sched_metrics)
            assert sample_sum(sch, "kvferry_scheduler_migrations_total", outcome="committed", trigger="ctl") == 1, sch
            assert sample_sum(sch, "kvferry_scheduler_migrations_total", outcome="committed", trigger="drain") == 1, sch
        finally:
            await a.close()
            if b is not None:
                await b.close()
    # 4. Started again: it registers (the scheduler's second registration of it).
    await asyncio.to_thread(c.respawn, w_a, 120)
    return {"a": w_a, "b": w_b}


async def _gone(c: LocalCluster, request_id: str) -> bool:
    return all(r.request_id != request_id for r in (await status(c)).requests)


async def _on(c: LocalCluster, request_id: str, worker_id: str) -> bool:
    return any(r.request_id == request_id and r.worker_id == worker_id for r in (await status(c)).requests)


# ---- checks of a result ----------------------------------------------------------------------------

def problems_of(q: Query, series: list[dict[str, Any]]) -> list[str]:
    """What is wrong with one expression's result (empty: nothing)."""
    if not series:
        return [f"{q}: no series"]
    out = []
    signed = bool(metric_names(q.expr) & SIGNED)
    for s in series:
        v = s["value"]
        if not math.isfinite(v):
            out.append(f"{q}: {s['metric']} = {v}")
        elif v < 0 and not signed:
            out.append(f"{q}: {s['metric']} = {v} < 0")
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", q.legend):
            if label not in s["metric"]:
                out.append(f"{q}: legend {q.legend!r} names {label}, absent from {s['metric']}")
    if metric_names(q.expr) & MOVED and not sum(s["value"] for s in series) > 0:
        out.append(f"{q}: 0 over the traffic (which moved {sorted(metric_names(q.expr) & MOVED)}): {series}")
    return out


def quantile_order_problems(results: dict[Query, list[dict[str, Any]]]) -> list[str]:
    """Among one panel's histogram_quantile targets over the same expression, a higher quantile
    never comes out lower (per label set)."""
    groups: dict[tuple[str, str], list[tuple[float, Query]]] = defaultdict(list)
    for q in results:
        m = QUANTILE.match(q.expr)
        if m:
            groups[(q.panel, QUANTILE.sub("histogram_quantile(Q,", q.expr, count=1))].append((float(m.group(1)), q))
    out = []
    for members in groups.values():
        members.sort(key=lambda m: m[0])
        for (_, lo), (_, hi) in itertools.pairwise(members):
            low = {json.dumps(s["metric"], sort_keys=True): s["value"] for s in results[lo]}
            for s in results[hi]:
                key = json.dumps(s["metric"], sort_keys=True)
                if key in low and not s["value"] >= low[key] - 1e-12:
                    out.append(f"{hi} = {s['value']} < {lo} = {low[key]}")
    return out


# ---- tests -----------------------------------------------------------------------------------------

@needs_prometheus
def test_promtool_checks_the_config_and_unit_tests_the_alert_rules():
    out = subprocess.run([PROMTOOL, "check", "config", str(PROM_YML)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "alerts.yml" in out.stdout, "prometheus.yml loads no alerts.yml"
    out = subprocess.run([PROMTOOL, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rules_and_dashboard_name_only_jobs_that_prometheus_yml_scrapes():
    prom = yaml.safe_load(PROM_YML.read_text())
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    for rules_file in prom["rule_files"]:
        rules = [r for g in yaml.safe_load((PROM_DIR / rules_file).read_text())["groups"] for r in g["rules"]]
        assert rules, rules_file
        for r in rules:
            assert jobs_named(r["expr"]) <= jobs, (r.get("alert"), jobs_named(r["expr"]) - jobs)
    for q in dashboard_queries(json.loads(DASHBOARD.read_text())):
        assert jobs_named(q.expr) <= jobs, (str(q), jobs_named(q.expr) - jobs)
    # Every worker target carries a profile label, as the compose profiles (gpu, cpu) name them.
    workers = next(j for j in prom["scrape_configs"] if j["job_name"] == "kvferry-worker")
    assert {(g.get("labels") or {}).get("profile") for g in workers["static_configs"]} == {"gpu", "cpu"}


@needs_prometheus
async def test_every_dashboard_query_has_sane_data_from_a_live_cluster():
    dash = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dash)
    variables = template_values(dash)
    cluster = await asyncio.to_thread(start_cluster)
    prom: Prometheus | None = None
    tmp = tempfile.TemporaryDirectory(prefix="kvferry-prometheus-")
    try:
        jobs = live_targets(cluster)
        assert len(jobs["kvferry-worker"]) == 2, jobs
        prom = Prometheus(derived_config(cluster), Path(tmp.name))
        await asyncio.to_thread(prom.wait_ready, 60)
        await until(lambda: asyncio.to_thread(all_up, prom, jobs), 60, lambda: "every target up: "
                    f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in prom.targets()]}", step_s=0.5)
        t0 = time.time()

        await short_traffic(cluster.http_url)
        await migrations_and_a_restart(cluster, prom)

        # Until Prometheus has scraped it all: every target up again (the restarted worker), two
        # live instances, the registration, the abort and both commits.
        settled = {
            "sum(up)": sum(len(t) for t in jobs.values()),
            'kvferry_scheduler_instances{state="alive"}': 2,
            f"increase(kvferry_scheduler_worker_registrations_total[{int(time.time() - t0) + 5}s]) > 0": 1,
            'sum(kvferry_scheduler_migrations_total{outcome="aborted"})': 2,
            'sum(kvferry_scheduler_migrations_total{outcome="committed"})': 2,
        }

        def caught_up() -> bool:
            return all_up(prom, jobs) and all(prom.value(e) >= v for e, v in settled.items())

        await until(lambda: asyncio.to_thread(caught_up), 60,
                    lambda: f"prometheus to see it all: {[(e, prom.value(e), v) for e, v in settled.items()]}",
                    step_s=0.5)
        await asyncio.sleep(2 * SCRAPE_S)  # two more scrapes of every counter after the last event
        at = time.time()
        window = max(4 * SCRAPE_S, math.ceil(at - t0) + 2 * SCRAPE_S)

        results = {q: await asyncio.to_thread(prom.query, substitute(q.expr, window, variables), at) for q in queries}
        report = "\n".join(f"  {q}\n    -> {[(s['metric'], s['value']) for s in r]}" for q, r in results.items())
        problems = [p for q, r in results.items() for p in problems_of(q, r)] + quantile_order_problems(results)
        assert not problems, "dashboard queries:\n" + "\n".join(problems) + "\n\nall results:\n" + report

        # The alert rules loaded, evaluate without error, and none fires: the restart was clean.
        groups = prom.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len([r for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
                                  for r in g["rules"]])
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
        firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, firing
    finally:
        if prom is not None:
            prom.stop()
        await asyncio.to_thread(cluster.stop)
        tmp.cleanup()
