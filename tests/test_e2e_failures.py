"""Failures end to end (design §6): real processes on 127.0.0.1 (services.launcher.LocalCluster),
killed and restarted while clients stream through the SDK and the openai HTTP API.

Each test asserts what the client received (greedy output identical to an undisturbed run, or a
clear error, never a hang) and that the used KV blocks of the surviving workers return to zero.
A torch `tiny` cluster (3 workers, shared with test_e2e_migration and restored after each test)
serves the identity checks; small sim clusters the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time

import httpx
import openai
import pytest

from protocol import SchedulerReplies, StatusReply, StatusRequest, UndrainInstance
from protocol.sockets import request_once
from sdk import AsyncClient, SdkError
from services.config import load_config
from services.launcher import ClusterSpec, LocalCluster, free_ports
from testkit.wait import until

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny"
# tokens: a tiny stream must still run when the test kills (or SIGTERMs) the worker holding it, a
# status round trip after its first token; the rest is produced elsewhere after the resumption (or
# migration), however long detection takes. A few ms per token: seconds of margin.
LONG = 1200
WORKERS = ("worker-0", "worker-1", "worker-2")


# ---- helpers ---------------------------------------------------------------------------------------

def start_cluster(workers: int, worker: dict, frontend: dict | None = None, scheduler: dict | None = None,
                  ) -> LocalCluster:
    http, base = free_ports(workers)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "scheduler": {"policy": "load", **(scheduler or {})},  # no load-balancing migrations: fewer moving parts
        "worker": worker,
        "frontend": {"model": MODEL, **(frontend or {})},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=workers, ready_timeout_s=120))
    c.start()
    return c


async def status(c: LocalCluster, timeout: float = 5.0) -> StatusReply:
    """The scheduler's StatusReply (asked directly: faster than `kvferry ctl status`)."""
    return await request_once(c.scheduler_endpoint, StatusRequest(), SchedulerReplies, timeout)


async def wait_status(c: LocalCluster, pred, timeout: float, what: str) -> StatusReply:  # noqa: ANN001
    last: object = None

    async def matching() -> StatusReply | None:
        nonlocal last
        try:
            last = await status(c, timeout=2.0)
            return last if pred(last) else None
        except Exception as exc:  # noqa: BLE001 - e.g. the scheduler is restarting: ask again
            last = exc
            return None

    return await until(matching, timeout, lambda: f"{what}; last status: {last!r}", step_s=0.1)


def survivors_idle(st: StatusReply) -> bool:
    """Every live worker holds no block and no request."""
    live = [i for i in st.instances if i.alive]
    return bool(live) and all(i.free_blocks == i.total_blocks and i.num_running == 0 and i.num_waiting == 0
                              for i in live) and not st.requests


def metric(c: LocalCluster, name: str) -> float:
    text = httpx.get(f"{c.http_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def collect(sdk: AsyncClient, prompt: str, max_tokens: int, temperature: float = 0.0,
                  seed: int | None = None, started: asyncio.Queue | None = None) -> list[int]:
    """One streamed generation's token ids; asserts the chunks are gapless (first_index)."""
    toks: list[int] = []
    async with contextlib.aclosing(sdk.stream(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                              ignore_eos=True)) as chunks:
        async for ch in chunks:
            assert ch.first_index == len(toks) or not ch.token_ids, (ch.first_index, len(toks))
            toks.extend(ch.token_ids)
            if started is not None and toks:
                await started.put(ch.request_id)
                started = None
    return toks


def references(prompts: list[tuple[str, float, int | None]], max_tokens: int) -> list[list[int]]:
    """Each (prompt, temperature, seed)'s tokens from an engine in this process, as `kvferry generate
    --model tiny --dtype float32 --ignore-eos` makes them (cli/generate.py), in one batch (float32:
    batching does not change a token). The undisturbed runs the tests compare with, computed in a
    thread while the cluster serves the disturbed streams (test_e2e_cluster checks the command
    itself against the cluster)."""
    from cli.common import build_engine
    from engine.request import SamplingParams

    engine = build_engine(MODEL, "float32", "cpu", kv_cache_bytes=64 << 20)
    for k, (prompt, temperature, seed) in enumerate(prompts):
        engine.add_request(f"ref-{k}", engine.tokenizer.encode(prompt),
                           SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True))
    out: dict[str, list[int]] = {f"ref-{k}": [] for k in range(len(prompts))}
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert not o.error, o.error
            out[o.request_id].extend(o.new_token_ids)
    return [out[f"ref-{k}"] for k in range(len(prompts))]


async def holders(c: LocalCluster, rids: list[str], timeout: float = 30.0) -> dict[str, str]:
    """request id → the worker running it, once every one of `rids` runs somewhere."""
    st = await wait_status(c, lambda s: {r.request_id for r in s.requests if r.running} >= set(rids), timeout,
                           "every stream running")
    return {r.request_id: r.worker_id for r in st.requests if r.request_id in rids}


TINY3_WORKER = {"engine": "torch", "model": MODEL, "dtype": "float32", "num_blocks": 1024, "max_num_seqs": 16,
                # a SIGTERM'd worker's drain (below) has all the time a loaded machine needs
                "stop_deadline_s": 120}


def start_tiny3() -> LocalCluster:
    """The 3-worker torch `tiny` cluster that this module and test_e2e_migration share (the
    session fixture `tiny3` in conftest.py): policy "load", so only the tests move requests."""
    return start_cluster(3, TINY3_WORKER)


def full_size(st: StatusReply) -> bool:
    return sorted(i.worker_id for i in st.instances if i.alive) == list(WORKERS)


def whole(st: StatusReply) -> bool:
    """Every worker registered, alive, not draining, idle."""
    return full_size(st) and not any(i.draining for i in st.instances) and survivors_idle(st)


async def restore(c: LocalCluster) -> None:
    """Every service of the shared cluster running again (each killed one respawned), every worker
    registered alive and undrained, nothing running: the state each test of it starts from."""
    with c._lock:  # noqa: SLF001 - the latest child of each service name
        latest = {ch.name: ch for ch in c.children}
    for name in ("scheduler", *WORKERS, "frontend"):
        child = latest[name]
        if child.proc.poll() is None and not child.retired:
            continue
        if child.proc.poll() is None:  # killed (e.g. SIGTERM'd) but not gone yet
            try:
                await asyncio.to_thread(child.proc.wait, 60)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                await asyncio.to_thread(child.proc.wait, 10)
        await asyncio.to_thread(c.respawn, name)
    st = await wait_status(c, full_size, 60, "every worker registered and alive")
    for i in st.instances:
        if i.draining:
            await request_once(c.scheduler_endpoint, UndrainInstance(worker_id=i.worker_id), SchedulerReplies, 10)
    async with httpx.AsyncClient(timeout=10) as http:
        deadline = time.monotonic() + 60
        while True:  # the frontend knows a live worker (a respawned one learns it from the scheduler)
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{c.http_url}/health")).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the frontend did not become healthy again"
            await asyncio.sleep(0.1)
    await wait_status(c, whole, 60, "every worker alive, undrained and idle")


@pytest.fixture
def tiny(tiny3):
    """The shared cluster, whole and idle, and restored after the test whatever happened in it (a
    killed service respawned), so that one failing test never fails the next."""
    return tiny3


def dead_or_gone(name: str):  # noqa: ANN201
    """StatusReply predicate: `name` is not listed alive (declared dead, or already forgotten)."""
    return lambda s: not any(i.worker_id == name and i.alive for i in s.instances)


async def heal(c: LocalCluster, name: str) -> None:
    """Start `name` again and wait until the scheduler lists it alive."""
    await asyncio.to_thread(c.respawn, name)
    await wait_status(c, lambda s: any(i.worker_id == name and i.alive for i in s.instances), 60, f"{name} back")


# ---- worker death ------------------------------------------------------------------------------------

async def test_killed_worker_requests_resume_elsewhere_with_identical_greedy_output(tiny):
    prompts = ["The river", "A lighthouse", "Seven bridges", "Under the hill"]
    resumed_before = metric(tiny, "kvferry_request_resumes_total")
    refs = asyncio.ensure_future(asyncio.to_thread(references, [(p, 0.0, None) for p in prompts], LONG))
    async with AsyncClient(tiny.sdk_endpoint, timeout=240) as sdk:
        started: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(collect(sdk, p, LONG, started=started)) for p in prompts]
        seeded = asyncio.ensure_future(collect(sdk, "Dice", LONG, temperature=1.0, seed=3, started=started))
        rids = [await asyncio.wait_for(started.get(), 60) for _ in range(len(prompts) + 1)]
        where = await holders(tiny, rids)
        counts = {w: list(where.values()).count(w) for w in WORKERS}
        victim = max(counts, key=counts.__getitem__)
        moved = counts[victim]
        assert moved >= 1 and not any(t.done() for t in tasks), "streams ended before the kill: raise LONG"
        tiny.kill(victim)
        # the scheduler notices within its 2 s heartbeat timeout and stops dispatching to it (the
        # deadline is for a loaded machine; the timeout itself is tested in test_scheduler_service)
        await wait_status(tiny, dead_or_gone(victim), 30, f"{victim} declared dead")
        got = [await asyncio.wait_for(t, 240) for t in tasks]
        seeded_got = await asyncio.wait_for(seeded, 240)
        after = [await asyncio.wait_for(collect(sdk, p, 8), 60) for p in ("new one", "new two")]
    for p, toks, ref in zip(prompts, got, await refs):
        assert len(toks) == LONG
        assert toks == ref, f"{p!r}: the resumed stream differs from an undisturbed run"
    assert len(seeded_got) == LONG  # seeded: continuous and complete (its continuation differs, see router)
    assert all(len(a) == 8 for a in after)
    assert metric(tiny, "kvferry_request_resumes_total") - resumed_before >= moved
    st = await wait_status(tiny, survivors_idle, 60, "survivors' blocks back to zero")
    assert dead_or_gone(victim)(st)
    await heal(tiny, victim)


async def test_graceful_stop_sigterm_drains_by_live_migration(tiny):
    """SIGTERM on a worker: it reports draining, the scheduler's migration rounds move its running
    requests to the others (greedy and seeded streams go on identically: live migration keeps the
    sampler's state), it exits 0 well before `stop_deadline_s`; nothing is resumed."""
    cases = [("Once upon a time", 0.0, None), ("In the beginning", 0.9, 5), ("Dear diary", 0.0, None),
             ("Far away", 0.8, 11), ("It was late", 0.0, None), ("Rain again", 0.0, None)]
    resumed_before = metric(tiny, "kvferry_request_resumes_total")
    refs = asyncio.ensure_future(asyncio.to_thread(references, cases, LONG))
    async with AsyncClient(tiny.sdk_endpoint, timeout=240) as sdk:
        started: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(collect(sdk, p, LONG, t, s, started=started)) for p, t, s in cases]
        rids = [await asyncio.wait_for(started.get(), 60) for _ in cases]
        where = await holders(tiny, rids)
        counts = {w: list(where.values()).count(w) for w in WORKERS}
        victim = max(counts, key=counts.__getitem__)
        assert counts[victim] >= 1 and not any(t.done() for t in tasks)
        child = tiny.kill(victim, signal.SIGTERM)
        # It exits 0 once drained. Had the drain not moved everything, the stop deadline would have
        # ended what was left with an error, resumed by the frontend: the resume count below says so.
        code = await asyncio.to_thread(child.proc.wait, 180)
        assert code == 0
        got = [await asyncio.wait_for(t, 240) for t in tasks]
    for (p, _, _), toks, ref in zip(cases, got, await refs):
        assert toks == ref, f"{p!r}: the drained stream differs from an undisturbed run"
    assert metric(tiny, "kvferry_request_resumes_total") == resumed_before  # moved live, none recomputed
    await wait_status(tiny, survivors_idle, 60, "survivors' blocks back to zero")
    await heal(tiny, victim)


# ---- scheduler death -----------------------------------------------------------------------------------

async def test_scheduler_death_and_restart_fail_no_request(tiny):
    client = openai.AsyncOpenAI(base_url=f"{tiny.http_url}/v1", api_key="x", timeout=120, max_retries=0)
    async with AsyncClient(tiny.sdk_endpoint, timeout=240) as sdk:
        started: asyncio.Queue = asyncio.Queue()
        streams = [asyncio.ensure_future(collect(sdk, p, 800, started=started)) for p in ("One", "Two", "Three")]
        for _ in streams:
            await asyncio.wait_for(started.get(), 60)
        sched = tiny.kill("scheduler")
        await asyncio.to_thread(sched.proc.wait, 30)  # gone for sure before the requests below
        # the frontend dispatches from its last view while the scheduler is away
        down = await asyncio.gather(*(client.completions.create(model=MODEL, prompt=f"while away {i}", max_tokens=8,
                                                                temperature=0, extra_body={"ignore_eos": True})
                                     for i in range(6)))
        assert all(r.usage.completion_tokens == 8 for r in down)
        await asyncio.to_thread(tiny.respawn, "scheduler")
        # the restarted scheduler rebuilds its view from the workers' registrations and reports
        st = await wait_status(tiny, full_size, 60, "every worker registered again")
        assert st.instances
        back = await asyncio.gather(*(client.completions.create(model=MODEL, prompt=f"back {i}", max_tokens=8,
                                                                temperature=0, extra_body={"ignore_eos": True})
                                     for i in range(6)))
        assert all(r.usage.completion_tokens == 8 for r in back)
        got = [await asyncio.wait_for(t, 240) for t in streams]
    await client.close()
    assert [len(t) for t in got] == [800] * 3
    await wait_status(tiny, survivors_idle, 60, "blocks back to zero")


# ---- frontend death -------------------------------------------------------------------------------------

async def test_frontend_death_frees_its_requests_blocks(tiny):
    async with httpx.AsyncClient(timeout=30) as http:
        body = {"model": MODEL, "prompt": "Endless", "max_tokens": 8000, "stream": True, "ignore_eos": True}
        ctxs = [http.stream("POST", f"{tiny.http_url}/v1/completions", json=body) for _ in range(3)]
        resps = [await cm.__aenter__() for cm in ctxs]
        assert all(r.status_code == 200 for r in resps)
        await wait_status(tiny, lambda s: sum(1 for r in s.requests if r.running) >= 3, 30, "streams running")
        fe = tiny.kill("frontend")
        await asyncio.to_thread(fe.proc.wait, 30)
        # workers notice the missing heartbeats (frontend_timeout_s, 5 s) and abort its requests
        # (the deadline is for a loaded machine: the abort, not its speed, is what is tested)
        await wait_status(tiny, survivors_idle, 60, "the dead frontend's requests aborted")
        for cm in ctxs:
            with contextlib.suppress(Exception):
                await cm.__aexit__(None, None, None)
    await asyncio.to_thread(tiny.respawn, "frontend")
    async with AsyncClient(tiny.sdk_endpoint, timeout=60) as sdk:
        assert len(await collect(sdk, "again", 8)) == 8


# ---- no worker left, resumption limit, overload (sim workers) ------------------------------------------

SIM = {"engine": "sim", "model": "instant", "num_blocks": 256}


async def test_no_worker_left_ends_with_a_clear_error_and_resumptions_are_limited():
    # 27 ms steps (llama7b-a10): a stream outlives two kills and their detection
    c = start_cluster(2, {**SIM, "model": "llama7b-a10", "max_num_seqs": 8}, frontend={"max_resumes": 1})
    try:
        async with AsyncClient(c.sdk_endpoint, timeout=120) as sdk:
            started: asyncio.Queue = asyncio.Queue()
            task = asyncio.ensure_future(collect(sdk, "long", 4000, started=started))
            rid = await asyncio.wait_for(started.get(), 30)
            first = (await holders(c, [rid]))[rid]
            c.kill(first)  # resumed on the other worker (its one allowed resumption)
            second = next(w for w in ("worker-0", "worker-1") if w != first)
            await wait_status(c, lambda s: any(r.request_id == rid and r.worker_id == second for r in s.requests),
                              15, "resumed on the other worker")
            assert not task.done()
            c.kill(second)  # no worker left, and no resumption left either
            with pytest.raises(SdkError) as err:  # an error, not a hang (that would be a TimeoutError)
                await asyncio.wait_for(task, 60)
            assert second in err.value.message and "resum" in err.value.message
        await wait_status(c, lambda s: not any(i.alive for i in s.instances), 30, "both workers dead")
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"{c.http_url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4})
        assert r.status_code == 503 and r.headers.get("retry-after") == "1"
        assert r.json()["error"]["code"] == "unavailable"
    finally:
        c.stop()


async def test_overload_answers_429_and_memory_stays_bounded():
    """Workers bound their waiting queue (max_waiting) and the scheduler stops dispatching to full
    ones: beyond, 429 with Retry-After in OpenAI's error format. The frontend bounds the bytes
    its requests in flight hold (max_queued_bytes): beyond, 429 too."""
    limit = 100_000
    c = start_cluster(2, {**SIM, "max_num_seqs": 2, "max_waiting": 2}, frontend={"max_queued_bytes": limit})
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            async def one(prompt: str, max_tokens: int) -> httpx.Response:
                return await http.post(f"{c.http_url}/v1/completions", json={
                    "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})

            # 12 x 8 * (prompt + 1000 tokens) fit the byte limit; the workers take 2 x (2 + 2)
            rs = await asyncio.gather(*(one(f"q{i}", 1000) for i in range(12)))
            ok = [r for r in rs if r.status_code == 200]
            busy = [r for r in rs if r.status_code == 429]
            assert len(ok) + len(busy) == 12, [r.status_code for r in rs]
            assert 4 <= len(ok) <= 8 and busy, [r.status_code for r in rs]
            assert all(r.json()["usage"]["completion_tokens"] == 1000 for r in ok)
            for r in busy:
                assert r.headers.get("retry-after") == "1"
                err = r.json()["error"]
                assert err["code"] == "overloaded" and err["message"] and "type" in err
            # one big request alone runs; a second one would take the reservations past the limit
            big = asyncio.ensure_future(one("big", 8000))
            await wait_status(c, lambda s: any(r.running for r in s.requests), 10, "the big request running")
            r2 = await one("big too", 8000)
            assert r2.status_code == 429 and "bytes" in r2.json()["error"]["message"]
            assert metric(c, "kvferry_queued_bytes") <= limit
            assert (await big).status_code == 200
        await wait_status(c, survivors_idle, 10, "blocks back to zero")
    finally:
        c.stop()
