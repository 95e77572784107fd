"""Failures end to end (DESIGN §6): real processes on 127.0.0.1 (services.launcher.LocalCluster),
killed and restarted while clients stream through the SDK and the openai HTTP API.

Each test asserts what the client received (greedy output identical to an undisturbed run, or a
clear error, never a hang) and that the used KV blocks of the surviving workers return to zero.
A torch `tiny` cluster (3 workers) serves the identity checks; small sim clusters the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import httpx
import openai
import pytest

from protocol import SchedulerReplies, StatusReply, StatusRequest
from protocol.sockets import request_once
from sdk import AsyncClient, SdkError
from services.config import load_config
from services.launcher import ClusterSpec, LocalCluster, free_ports

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny"
LONG = 3000  # tokens: a tiny stream must outlive the kill, the 2 s detection and the resumption
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
    deadline = time.monotonic() + timeout
    last: StatusReply | Exception | None = None
    while True:
        try:
            last = await status(c, timeout=2.0)
            if pred(last):
                return last
        except Exception as exc:  # noqa: BLE001 - e.g. the scheduler is restarting: ask again
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; last status: {last!r}")
        await asyncio.sleep(0.1)


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


async def holders(c: LocalCluster, rids: list[str], timeout: float = 30.0) -> dict[str, str]:
    """request id → the worker running it, once every one of `rids` runs somewhere."""
    st = await wait_status(c, lambda s: {r.request_id for r in s.requests if r.running} >= set(rids), timeout,
                           "every stream running")
    return {r.request_id: r.worker_id for r in st.requests if r.request_id in rids}


@pytest.fixture(scope="module")
def tiny():
    c = start_cluster(3, {"engine": "torch", "model": MODEL, "dtype": "float32", "num_blocks": 1024,
                          "max_num_seqs": 16})
    try:
        yield c
    finally:
        c.stop()


async def heal(c: LocalCluster, name: str) -> None:
    """Start `name` again and wait until the scheduler lists it alive."""
    await asyncio.to_thread(c.respawn, name)
    await wait_status(c, lambda s: any(i.worker_id == name and i.alive for i in s.instances), 20, f"{name} back")


# ---- worker death ------------------------------------------------------------------------------------

async def test_killed_worker_requests_resume_elsewhere_with_identical_greedy_output(tiny):
    prompts = ["The river", "A lighthouse", "Seven bridges", "Under the hill"]
    resumed_before = metric(tiny, "kvferry_request_resumes_total")
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
        t_kill = time.monotonic()
        tiny.kill(victim)
        # the scheduler notices within 2 s (its heartbeat timeout) and stops dispatching to it
        await wait_status(tiny, lambda s: not next(i for i in s.instances if i.worker_id == victim).alive, 5,
                          f"{victim} declared dead")
        assert time.monotonic() - t_kill < 3.0
        got = [await asyncio.wait_for(t, 240) for t in tasks]
        seeded_got = await asyncio.wait_for(seeded, 240)
        after = [await asyncio.wait_for(collect(sdk, p, 8), 60) for p in ("new one", "new two")]
        # undisturbed twins, run after the kill on the survivors
        refs = await asyncio.gather(*(collect(sdk, p, LONG) for p in prompts))
    for p, toks, ref in zip(prompts, got, refs):
        assert len(toks) == LONG
        assert toks == ref, f"{p!r}: the resumed stream differs from an undisturbed run"
    assert len(seeded_got) == LONG  # seeded: continuous and complete (its continuation differs, see router)
    assert all(len(a) == 8 for a in after)
    assert metric(tiny, "kvferry_request_resumes_total") - resumed_before >= moved
    st = await wait_status(tiny, survivors_idle, 20, "survivors' blocks back to zero")
    assert not next(i for i in st.instances if i.worker_id == victim).alive
    await heal(tiny, victim)


async def test_graceful_stop_sigterm_drains_by_live_migration(tiny):
    """SIGTERM on a worker: it reports draining, the scheduler's migration rounds move its running
    requests to the others (greedy and seeded streams go on identically: live migration keeps the
    sampler's state), it exits 0 well before `stop_deadline_s`; nothing is resumed."""
    cases = [("Once upon a time", 0.0, None), ("In the beginning", 0.9, 5), ("Dear diary", 0.0, None),
             ("Far away", 0.8, 11), ("It was late", 0.0, None), ("Rain again", 0.0, None)]
    resumed_before = metric(tiny, "kvferry_request_resumes_total")
    async with AsyncClient(tiny.sdk_endpoint, timeout=240) as sdk:
        started: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(collect(sdk, p, LONG, t, s, started=started)) for p, t, s in cases]
        rids = [await asyncio.wait_for(started.get(), 60) for _ in cases]
        where = await holders(tiny, rids)
        counts = {w: list(where.values()).count(w) for w in WORKERS}
        victim = max(counts, key=counts.__getitem__)
        assert counts[victim] >= 1 and not any(t.done() for t in tasks)
        child = tiny.kill(victim, signal.SIGTERM)
        t0 = time.monotonic()
        code = await asyncio.to_thread(child.proc.wait, 30)
        assert code == 0 and time.monotonic() - t0 < 15.0
        got = [await asyncio.wait_for(t, 240) for t in tasks]
        refs = await asyncio.gather(*(collect(sdk, p, LONG, t, s) for p, t, s in cases))
    for (p, _, _), toks, ref in zip(cases, got, refs):
        assert toks == ref, f"{p!r}: the drained stream differs from an undisturbed run"
    assert metric(tiny, "kvferry_request_resumes_total") == resumed_before  # moved live, none recomputed
    await wait_status(tiny, survivors_idle, 20, "survivors' blocks back to zero")
    await heal(tiny, victim)


# ---- scheduler death -----------------------------------------------------------------------------------

async def test_scheduler_death_and_restart_fail_no_request(tiny):
    client = openai.AsyncOpenAI(base_url=f"{tiny.http_url}/v1", api_key="x", timeout=120, max_retries=0)
    async with AsyncClient(tiny.sdk_endpoint, timeout=240) as sdk:
        started: asyncio.Queue = asyncio.Queue()
        streams = [asyncio.ensure_future(collect(sdk, p, 1500, started=started)) for p in ("One", "Two", "Three")]
        for _ in streams:
            await asyncio.wait_for(started.get(), 60)
        tiny.kill("scheduler")
        await asyncio.sleep(0.5)
        # the frontend dispatches from its last view while the scheduler is away
        down = await asyncio.gather(*(client.completions.create(model=MODEL, prompt=f"while away {i}", max_tokens=8,
                                                                temperature=0, extra_body={"ignore_eos": True})
                                     for i in range(6)))
        assert all(r.usage.completion_tokens == 8 for r in down)
        await asyncio.to_thread(tiny.respawn, "scheduler")
        # the restarted scheduler rebuilds its view from the workers' registrations and reports
        st = await wait_status(tiny, lambda s: sorted(i.worker_id for i in s.instances if i.alive) == list(WORKERS),
                               30, "every worker registered again")
        assert st.instances
        back = await asyncio.gather(*(client.completions.create(model=MODEL, prompt=f"back {i}", max_tokens=8,
                                                                temperature=0, extra_body={"ignore_eos": True})
                                     for i in range(6)))
        assert all(r.usage.completion_tokens == 8 for r in back)
        got = [await asyncio.wait_for(t, 240) for t in streams]
    await client.close()
    assert [len(t) for t in got] == [1500] * 3
    await wait_status(tiny, survivors_idle, 20, "blocks back to zero")


# ---- frontend death -------------------------------------------------------------------------------------

async def test_frontend_death_frees_its_requests_blocks(tiny):
    async with httpx.AsyncClient(timeout=30) as http:
        body = {"model": MODEL, "prompt": "Endless", "max_tokens": 8000, "stream": True, "ignore_eos": True}
        ctxs = [http.stream("POST", f"{tiny.http_url}/v1/completions", json=body) for _ in range(3)]
        resps = [await cm.__aenter__() for cm in ctxs]
        assert all(r.status_code == 200 for r in resps)
        await wait_status(tiny, lambda s: sum(1 for r in s.requests if r.running) >= 3, 30, "streams running")
        tiny.kill("frontend")
        t0 = time.monotonic()
        # workers notice the missing heartbeats (frontend_timeout_s) and abort its requests
        await wait_status(tiny, survivors_idle, 15, "the dead frontend's requests aborted")
        took = time.monotonic() - t0
        for cm in ctxs:
            with contextlib.suppress(Exception):
                await cm.__aexit__(None, None, None)
    assert took < 12.0
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
            t0 = time.monotonic()
            c.kill(second)  # no worker left, and no resumption left either
            with pytest.raises(SdkError) as err:
                await asyncio.wait_for(task, 30)
            assert time.monotonic() - t0 < 10.0  # an error, not a hang
            assert second in err.value.message and "resum" in err.value.message
        await wait_status(c, lambda s: not any(i.alive for i in s.instances), 10, "both workers dead")
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
