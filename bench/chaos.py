"""`kvferry bench chaos`: failures under load (design §6), on 127.0.0.1 only, bounded in time.

Starts a scheduler (policy kvferry: load-balancing migrations on), --workers sim workers (latency
profile --profile, default `instant`: a flat 1 ms step; small KV caches so the policy migrates)
and one frontend, then drives them through the SDK with --concurrency closed-loop clients:

1. baseline: --baseline-requests requests, nothing disturbed;
2. chaos: --requests requests of the same mix (more if needed, until the controller has done each
   of its actions at least once) while a controller keeps breaking the cluster, one action at a
   time every --chaos-interval seconds, in the cycle: kill -9 a worker (restarted --down-s later),
   kill -9 the scheduler (restarted --down-s later), kill -9 a worker, SIGTERM a worker (a graceful
   stop: drained by live migration, then restarted); never the last live worker. Clients also
   cancel --cancel-prob of their requests at a random token.

Every request is greedy with ignore_eos and a random prompt (--prompt-len) and max_tokens
(--max-tokens), so its complete answer has exactly max_tokens tokens. Per phase it reports:
completed; cancelled (by the client); rejected (429/503 before any token); failed with an error
(after tokens, or any other error); hung (no answer within --hang-s: must be 0); resumed (the
frontend's kvferry_request_resumes_total); lost tokens (for completed requests: tokens missing
from max_tokens or skipped in the stream's first_index sequence: must be 0) and duplicated ones;
e2e latency p50/p99 of completed requests and the P99 impact (chaos / baseline). Then leaked
blocks: used blocks on live workers once idle (must be 0).

With --torch-requests N (default 24; 0 skips it) a short second run does the same with 3 torch
`tiny` workers and one worker killed mid-run, and checks that every completed greedy answer is
identical to an undisturbed rerun of the same prompts (sim tokens depend on the output index, so
a resumed sim request continues with other tokens; the torch model's do not).

Everything stops by itself: requests are bounded by --hang-s, each phase by --time-limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ACTIONS = ("kill", "scheduler", "kill", "drain")


@dataclass
class Options:
    """`kvferry bench chaos`'s settings (the flags, same names; their defaults are the CLI's)."""

    json: str | None
    requests: int
    baseline_requests: int
    workers: int
    concurrency: int
    profile: str
    max_num_seqs: int
    max_waiting: int
    num_blocks: int
    migrate_in_above: float
    prompt_len: tuple[int, int]  # MIN, MAX
    max_tokens: tuple[int, int]  # MIN, MAX
    cancel_prob: float
    chaos_interval: float
    down_s: float
    stop_deadline: float
    hang_s: float
    time_limit: float
    torch_requests: int
    seed: int
    log_level: str


# ---- one request ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What one client saw."""

    kind: str  # completed | cancelled | rejected | failed | hung
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    lost: int = 0  # completed: tokens missing (gaps in first_index, or fewer than max_tokens)
    duplicates: int = 0  # tokens delivered twice (a chunk starting before what was received)
    e2e_s: float = 0.0
    ttft_s: float | None = None
    error: str = ""
    prompt: list[int] = field(default_factory=list)


async def one_request(sdk: Any, prompt: list[int], max_tokens: int, cancel_at: int | None, hang_s: float) -> Outcome:
    """Stream one greedy request and classify what came back."""
    from sdk import GenerateTimeout, Overloaded, SdkError, Unavailable

    out = Outcome("completed", max_tokens, prompt=prompt)
    t0 = time.monotonic()
    finish = None
    nxt = 0  # the output index the next chunk should start at
    try:
        async with contextlib.aclosing(sdk.stream(prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True,
                                                  timeout=hang_s)) as chunks:
            async for ch in chunks:
                if ch.token_ids:
                    if out.ttft_s is None:
                        out.ttft_s = time.monotonic() - t0
                    ids = list(ch.token_ids)
                    if ch.first_index > nxt:  # a gap: tokens the client never gets
                        out.lost += ch.first_index - nxt
                        nxt = ch.first_index
                    elif ch.first_index < nxt:  # tokens it already has
                        dup = min(nxt - ch.first_index, len(ids))
                        out.duplicates += dup
                        ids = ids[dup:]
                    out.tokens.extend(ids)
                    nxt += len(ids)
                finish = ch.finish_reason or finish
                if cancel_at is not None and len(out.tokens) >= cancel_at and finish is None:
                    out.kind = "cancelled"
                    break
    except GenerateTimeout as exc:
        out.kind, out.error = "hung", str(exc)
    except (Overloaded, Unavailable) as exc:
        out.kind, out.error = ("rejected" if not out.tokens else "failed"), str(exc)
    except SdkError as exc:
        out.kind, out.error = "failed", str(exc)
    out.e2e_s = time.monotonic() - t0
    if out.kind == "completed":
        if finish is None:
            out.kind, out.error = "failed", "the stream ended without a finish"
        else:
            out.lost += max(0, max_tokens - nxt)
    return out


async def run_load(endpoint: str, n: int, concurrency: int, make: Callable[[int], tuple[list[int], int, int | None]],
                   hang_s: float, time_limit: float, more: Callable[[], bool] = lambda: False,
                   ) -> tuple[list[Outcome], float]:
    """`n` requests (and more while `more()`) over `concurrency` closed-loop clients (one SDK
    connection each); returns the outcomes and the wall time. No request starts after
    `time_limit` seconds."""
    from sdk import AsyncClient

    outcomes: list[Outcome] = []
    next_i = 0
    t0 = time.monotonic()

    async def client() -> None:
        nonlocal next_i
        async with AsyncClient(endpoint, timeout=hang_s) as sdk:
            while (next_i < n or more()) and time.monotonic() - t0 < time_limit:
                i = next_i
                next_i += 1
                prompt, max_tokens, cancel_at = make(i)
                outcomes.append(await one_request(sdk, prompt, max_tokens, cancel_at, hang_s))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes, time.monotonic() - t0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100.0 * len(v) + 0.5)) - 1))]


def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    by: dict[str, int] = {k: 0 for k in ("completed", "cancelled", "rejected", "failed", "hung")}
    for o in outcomes:
        by[o.kind] += 1
    done = [o for o in outcomes if o.kind == "completed"]
    e2e = [o.e2e_s for o in done]
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.kind in ("failed", "rejected", "hung"):
            key = o.error.split(":", 1)[0][:60]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(outcomes), **by,
        "lost_tokens": sum(o.lost for o in done), "duplicated_tokens": sum(o.duplicates for o in outcomes),
        "tokens": sum(len(o.tokens) for o in outcomes), "wall_s": round(wall_s, 2),
        "tokens_per_s": round(sum(len(o.tokens) for o in outcomes) / max(wall_s, 1e-9)),
        "e2e_p50_s": _r(_pct(e2e, 50)), "e2e_p99_s": _r(_pct(e2e, 99)),
        "ttft_p50_s": _r(_pct(ttft, 50)), "ttft_p99_s": _r(_pct(ttft, 99)),
        "errors": errors,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# ---- the cluster and its chaos ---------------------------------------------------------------------

def start_cluster(opts: Options, worker: dict[str, Any], workers: int,  # noqa: ANN201 - LocalCluster
                  policy: str = "kvferry", scheduler: dict[str, Any] | None = None):
    from services.config import load_config
    from services.launcher import ClusterSpec, LocalCluster, free_port_block, free_ports

    http, base = free_ports(workers)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "scheduler": {"policy": policy, "metrics_port": free_port_block(1), **(scheduler or {})},
        "worker": {"stop_deadline_s": opts.stop_deadline, **worker},
        "frontend": {"model": "tiny", "max_inflight": 4096},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=workers, ready_timeout_s=180,
                                 extra_env={"KVFERRY_LOG_LEVEL": opts.log_level.upper()}))
    c.start()
    return c


async def scheduler_status(c: Any, timeout: float = 3.0) -> Any:
    from protocol import SchedulerReplies, StatusRequest
    from protocol.sockets import request_once

    return await request_once(c.scheduler_endpoint, StatusRequest(), SchedulerReplies, timeout)


async def leaked_blocks(c: Any, wait_s: float = 30.0) -> tuple[int, dict[str, int]]:
    """Used blocks on live workers once they are idle (waits up to `wait_s` for it): must be 0."""
    deadline = time.monotonic() + wait_s
    used: dict[str, int] = {}
    while True:
        with contextlib.suppress(Exception):
            st = await scheduler_status(c)
            used = {i.worker_id: i.total_blocks - i.free_blocks for i in st.instances if i.alive}
            if used and not any(used.values()) and not st.requests:
                return 0, used
        if time.monotonic() > deadline:
            return sum(used.values()), used
        await asyncio.sleep(0.25)


def prom_sum(url: str, name: str, label: str = "") -> float:
    """The sum of a Prometheus metric's samples at `url` whose labels contain `label` (0 when the
    service does not answer)."""
    import httpx

    try:
        text = httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and label in line and not line.startswith("#"))


def frontend_metric(c: Any, name: str, label: str = "") -> float:
    return prom_sum(f"{c.http_url}/metrics", name, label)


def migrations(c: Any) -> dict[str, float]:
    """Migration results the scheduler counted since it (last) started, by outcome."""
    url = c.metrics_urls().get("scheduler")
    if url is None:
        return {}
    return {o: prom_sum(url, "kvferry_scheduler_migrations_total", f'outcome="{o}"') for o in ("committed", "aborted")}


class Chaos(threading.Thread):
    """Breaks the cluster, one action at a time, until `stop` is set (then heals it). Runs on its
    own thread: restarts block for seconds, and clients' latency must not pay for it."""

    def __init__(self, c: Any, workers: list[str], interval_s: float, down_s: float, drain_wait_s: float,
                 rng: random.Random, actions: tuple[str, ...] = ACTIONS) -> None:
        super().__init__(name="chaos", daemon=True)
        self.c, self.workers, self.rng = c, workers, rng
        self.interval_s, self.down_s, self.drain_wait_s = interval_s, down_s, drain_wait_s
        self.actions = actions
        self.stop = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.done = 0  # actions completed (restarts included)
        self.migrations: dict[str, float] = {}  # counted by schedulers killed meanwhile
        self.m0 = migrations(c)
        self.t0 = time.monotonic()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            k = 0
            # Never the last worker: one action at a time, each restarts what it broke.
            actions = self.actions if len(self.workers) > 1 else ("scheduler",)
            self.actions = actions
            while not self.stop.wait(self.interval_s):
                self.act(actions[k % len(actions)])
                self.done += 1
                k += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the bench
            self.error = exc

    def act(self, action: str) -> None:
        t = round(time.monotonic() - self.t0, 2)
        if action == "scheduler":
            for k, v in migrations(self.c).items():  # its counters die with it
                self.migrations[k] = self.migrations.get(k, 0.0) + v - self.m0.get(k, 0.0)
            self.m0 = {}
            self.c.kill("scheduler")
            self.stop.wait(self.down_s)
            self.c.respawn("scheduler")
            self.events.append({"t_s": t, "action": "kill -9 scheduler, restart"})
            return
        name = self.rng.choice(self.workers)
        if action == "kill":
            self.c.kill(name)
            self.stop.wait(self.down_s)
            self.events.append({"t_s": t, "action": f"kill -9 {name}, restart"})
        else:
            child = self.c.kill(name, signal.SIGTERM)
            t_drain = time.monotonic()
            try:
                code = child.proc.wait(self.drain_wait_s)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: a drain that overran its deadline
                child.proc.kill()
                code = "killed"
            self.events.append({"t_s": t, "action": f"SIGTERM {name} (drain), restart", "exit": code,
                                "drain_s": round(time.monotonic() - t_drain, 2)})
        self.c.respawn(name)

    def migration_totals(self) -> dict[str, int]:
        now = migrations(self.c)
        return {k: round(self.migrations.get(k, 0.0) + now.get(k, 0.0) - self.m0.get(k, 0.0)) for k in now}

    def cycle_done(self) -> bool:
        return self.done >= len(self.actions) or self.error is not None


# ---- the runs --------------------------------------------------------------------------------------

def sim_run(opts: Options) -> dict[str, Any]:
    rng = random.Random(opts.seed)
    worker = {"engine": "sim", "model": opts.profile, "num_blocks": opts.num_blocks,
              "max_num_seqs": opts.max_num_seqs, "max_waiting": opts.max_waiting}
    c = start_cluster(opts, worker, opts.workers, scheduler={"migrate_in_above": opts.migrate_in_above})

    def mix(seed: int) -> Callable[[int], tuple[list[int], int, int | None]]:
        def make(i: int) -> tuple[list[int], int, int | None]:
            r = random.Random(seed * 1_000_003 + i)
            prompt = [r.randrange(1, 256) for _ in range(r.randint(*opts.prompt_len))]
            max_tokens = r.randint(*opts.max_tokens)
            cancel_at = r.randint(1, max_tokens) if r.random() < opts.cancel_prob else None
            return prompt, max_tokens, cancel_at
        return make

    out: dict[str, Any] = {}
    try:
        if opts.baseline_requests > 0:
            _progress(f"baseline: {opts.baseline_requests} requests, {opts.concurrency} clients")
            res, wall = asyncio.run(run_load(c.sdk_endpoint, opts.baseline_requests, opts.concurrency,
                                             mix(opts.seed + 1), opts.hang_s, opts.time_limit))
            out["baseline"] = summarize(res, wall)
            out["baseline"]["leaked_blocks"] = asyncio.run(leaked_blocks(c))[0]
        resumed0 = frontend_metric(c, "kvferry_request_resumes_total", 'outcome="resumed"')
        failed0 = frontend_metric(c, "kvferry_request_resumes_total", 'outcome="failed"')
        chaos = Chaos(c, [f"worker-{i}" for i in range(opts.workers)], opts.chaos_interval, opts.down_s,
                      opts.stop_deadline + 10.0, rng)
        _progress(f"chaos: {opts.requests} requests (more until the cycle {', '.join(ACTIONS)} is done), "
                  f"{opts.concurrency} clients, an action every {opts.chaos_interval:g} s")
        chaos.start()
        try:
            res, wall = asyncio.run(run_load(c.sdk_endpoint, opts.requests, opts.concurrency, mix(opts.seed + 2),
                                             opts.hang_s, opts.time_limit, more=lambda: not chaos.cycle_done()))
        finally:
            chaos.stop.set()
            chaos.join(120)
        s = summarize(res, wall)
        s["resumed"] = round(frontend_metric(c, "kvferry_request_resumes_total", 'outcome="resumed"') - resumed0)
        s["resume_failed"] = round(frontend_metric(c, "kvferry_request_resumes_total", 'outcome="failed"') - failed0)
        leaked, per_worker = asyncio.run(leaked_blocks(c))
        s["leaked_blocks"], s["used_blocks_after"] = leaked, per_worker
        s["events"] = chaos.events
        s["migrations"] = chaos.migration_totals()
        if chaos.error is not None:
            s["chaos_error"] = f"{type(chaos.error).__name__}: {chaos.error}"
        out["chaos"] = s
        base = out.get("baseline", {})
        if base.get("e2e_p99_s") and s.get("e2e_p99_s"):
            out["p99_impact"] = round(s["e2e_p99_s"] / base["e2e_p99_s"], 2)
            out["ttft_p99_impact"] = round(s["ttft_p99_s"] / base["ttft_p99_s"], 2) if base.get("ttft_p99_s") else None
    finally:
        c.stop()  # also unlinks the staging buffers of workers it killed
    return out


def torch_run(opts: Options) -> dict[str, Any]:
    """Greedy identity under a worker kill, on the torch `tiny` model."""
    n = opts.torch_requests
    worker = {"engine": "torch", "model": "tiny", "dtype": "float32", "num_blocks": 1024, "max_num_seqs": 16}
    c = start_cluster(opts, worker, 3, policy="load")
    rng = random.Random(opts.seed + 7)
    prompts = [[rng.randrange(1, 256) for _ in range(rng.randint(4, 32))] for _ in range(n)]
    lengths = [rng.randint(400, 1200) for _ in range(n)]

    def make(i: int) -> tuple[list[int], int, int | None]:
        return prompts[i], lengths[i], None

    try:
        resumed0 = frontend_metric(c, "kvferry_request_resumes_total", 'outcome="resumed"')

        async def disturbed() -> tuple[list[Outcome], float]:
            load = asyncio.ensure_future(run_load(c.sdk_endpoint, n, n, make, opts.hang_s * 3, opts.time_limit))
            await asyncio.sleep(1.5)
            victim = None
            with contextlib.suppress(Exception):
                st = await scheduler_status(c)
                counts: dict[str, int] = {}
                for r in st.requests:
                    counts[r.worker_id] = counts.get(r.worker_id, 0) + 1
                victim = max(counts, key=counts.__getitem__) if counts else None
            victim = victim or "worker-0"
            c.kill(victim)
            res, wall = await load
            await asyncio.to_thread(c.respawn, victim)
            return res, wall

        _progress(f"torch tiny: {n} greedy requests, 3 workers, one killed mid-run")
        res, wall = asyncio.run(disturbed())
        resumed = round(frontend_metric(c, "kvferry_request_resumes_total", 'outcome="resumed"') - resumed0)
        _progress("torch tiny: the same prompts again, undisturbed")
        ref, _ = asyncio.run(run_load(c.sdk_endpoint, n, n, make, opts.hang_s * 3, opts.time_limit))
        by_prompt = {tuple(o.prompt): o.tokens for o in ref if o.kind == "completed"}
        done = [o for o in res if o.kind == "completed"]
        same = sum(1 for o in done if by_prompt.get(tuple(o.prompt)) == o.tokens)
        s = summarize(res, wall)
        s.update(resumed=resumed, greedy_identical=same, compared=len(done),
                 leaked_blocks=asyncio.run(leaked_blocks(c))[0])
        return s
    finally:
        c.stop()  # also unlinks the staging buffers of workers it killed


def _progress(msg: str) -> None:
    print(f"[bench chaos] {msg}", file=sys.stderr, flush=True)


# ---- report ----------------------------------------------------------------------------------------

def table(results: dict[str, Any]) -> str:
    cols = [("requests", "requests"), ("completed", "completed"), ("cancelled", "cancelled"),
            ("rejected", "rejected 429/503"), ("failed", "failed with error"), ("hung", "hung"),
            ("resumed", "resumed"), ("lost_tokens", "lost tokens"), ("duplicated_tokens", "dup. tokens"),
            ("leaked_blocks", "leaked blocks"), ("e2e_p50_s", "e2e p50 s"), ("e2e_p99_s", "e2e p99 s"),
            ("ttft_p99_s", "TTFT p99 s")]
    rows = [("phase", *[h for _, h in cols])]
    for name in ("baseline", "chaos", "torch"):
        r = results.get(name)
        if r is not None:
            rows.append((name, *[("-" if r.get(k) is None else str(r.get(k))) for k, _ in cols]))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" if i == 0 else "---:" for i in range(len(rows[0]))) + "|")
    extra = []
    if "p99_impact" in results:
        extra.append(f"P99 e2e latency impact (chaos / baseline): {results['p99_impact']}x; "
                     f"P99 TTFT: {results.get('ttft_p99_impact')}x")
    m = results.get("chaos", {}).get("migrations")
    if m:
        extra.append(f"live migrations during the chaos phase: {m.get('committed', 0)} committed, "
                     f"{m.get('aborted', 0)} aborted (each leaves the request running exactly once)")
    if "torch" in results:
        t = results["torch"]
        extra.append(f"torch tiny: {t['greedy_identical']}/{t['compared']} completed greedy answers identical to an "
                     "undisturbed run")
    for e in results.get("chaos", {}).get("events", []):
        extra.append(f"  t={e['t_s']:>6} s  {e['action']}" + (f" (exit {e['exit']} after {e['drain_s']} s)"
                                                              if "drain_s" in e else ""))
    return "\n".join(lines + [""] + extra)


def run(opts: Options, config: dict[str, Any] | None = None) -> int:
    """`config`: the settings as the JSON records them (default: the options)."""
    from bench.frontend import machine_info

    results: dict[str, Any] = {"bench": "chaos", "machine": machine_info(),
                               "config": dataclasses.asdict(opts) if config is None else config}
    t0 = time.monotonic()
    results.update(sim_run(opts))
    if opts.torch_requests > 0:
        results["torch"] = torch_run(opts)
    results["seconds"] = round(time.monotonic() - t0, 1)
    print(table(results))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=1, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                      else str(o))
            f.write("\n")
    ch = results.get("chaos", {})
    bad = ch.get("hung", 0) + ch.get("lost_tokens", 0) + ch.get("leaked_blocks", 0)
    tr = results.get("torch")
    if tr is not None:
        bad += tr.get("hung", 0) + tr.get("lost_tokens", 0) + tr.get("leaked_blocks", 0)
        bad += tr["compared"] - tr["greedy_identical"]
    return 1 if bad else 0
