"""Cache-aware dispatch over live processes (design §4): a scheduler (policy kvferry), 2 sim workers
and a frontend on 127.0.0.1. The workers' KV events build the scheduler's prefix index; a prompt
that extends a cached one goes to the worker holding it, where plain load balancing would have
sent it to the other one; another cache_salt finds nothing; a restarted scheduler rebuilds the
index from the workers' resyncs. Which worker served a request shows in its prefix-cache hits
(its /metrics); what the scheduler chose shows in its hit-tokens histogram.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from protocol import DrainInstance, SchedulerReplies, StatusReply, UndrainInstance
from protocol.sockets import request_once
from services.launcher import free_port_block
from tests.test_e2e_failures import start_cluster, wait_status
from tests.test_metrics_cluster import scrape, value
from testkit.wait import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODEL = "tiny"  # the frontend's tokenizer (byte tokens) with sim workers
PROMPT = "You are a careful assistant who answers briefly and cites sources. " * 12  # ~800 tokens: 50 blocks
BLOCKS = len(PROMPT) // 16
WORKERS = ("worker-0", "worker-1")


@pytest.fixture(scope="module")
def cluster():
    metrics = free_port_block(3)  # the scheduler's, then worker i's at + 1 + i
    c = start_cluster(2, {"engine": "sim", "model": "llama7b-a10", "num_blocks": 512, "metrics_port": metrics + 1},
                      scheduler={"policy": "kvferry", "metrics_port": metrics})
    try:
        yield c
    finally:
        c.stop()


async def ask_scheduler(c, msg):  # noqa: ANN001, ANN201
    return await request_once(c.scheduler_endpoint, msg, SchedulerReplies, 10.0)


def hits(c) -> dict[str, float]:  # noqa: ANN001
    """Prompt tokens each worker found in its prefix cache so far."""
    urls = c.metrics_urls()
    return {w: value(scrape(urls[w])[1], "kvferry_worker_prefix_cache_hits_total") for w in WORKERS}


def indexed(st: StatusReply, wid: str) -> int:
    return next((i.indexed_blocks for i in st.instances if i.worker_id == wid and i.alive), 0)


async def complete(c, prompt: str, **extra: str) -> None:  # noqa: ANN001
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{c.http_url}/v1/completions",
                            json={"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra})
    assert r.status_code == 200, r.text


async def test_a_prompt_goes_where_its_prefix_is_cached_and_a_restarted_scheduler_relearns_it(cluster):
    c = cluster
    await wait_status(c, lambda s: sorted(i.worker_id for i in s.instances if i.alive) == list(WORKERS), 60,
                      "both workers registered")
    # The long prompt lands on worker-1 (worker-0 drained meanwhile): load balancing alone would
    # send its followers to worker-0 (equal load, the lower id), so a hit proves the index.
    await ask_scheduler(c, DrainInstance(worker_id="worker-0"))
    await complete(c, PROMPT)
    await ask_scheduler(c, UndrainInstance(worker_id="worker-0"))
    st = await wait_status(c, lambda s: indexed(s, "worker-1") >= BLOCKS and not any(i.draining for i in s.instances),
                           30, "worker-1's blocks in the scheduler's index")
    assert indexed(st, "worker-0") < BLOCKS
    assert next(i for i in st.instances if i.worker_id == "worker-1").cached_blocks >= BLOCKS

    before = hits(c)
    sched_url = c.metrics_urls()["scheduler"]
    sched_before = scrape(sched_url)[1]
    for k in range(3):
        await complete(c, f"{PROMPT}Question {k}: why?")
        now = hits(c)
        assert now["worker-1"] - before["worker-1"] >= (k + 1) * (BLOCKS - 1) * 16, (k, before, now)
        assert now["worker-0"] == before["worker-0"], (k, before, now)
    sched = scrape(sched_url)[1]
    chose = value(sched, "kvferry_scheduler_dispatch_hit_tokens_sum") - \
        value(sched_before, "kvferry_scheduler_dispatch_hit_tokens_sum")
    assert chose >= 3 * (BLOCKS - 1) * 16
    assert value(sched, "kvferry_scheduler_kv_events_total", outcome="applied") >= 2
    assert value(sched, "kvferry_instance_prefix_index_blocks", instance_id="worker-1") >= BLOCKS

    # Another tenant's salt: other hashes, no hit anywhere (wherever it runs).
    salted = hits(c)
    await complete(c, f"{PROMPT}Question 0: why?", cache_salt="tenant-b")
    assert hits(c) == salted

    # A restarted scheduler knows nothing until the workers register again and resync.
    sched_child = c.kill("scheduler")
    await asyncio.to_thread(sched_child.proc.wait, 30)
    await asyncio.to_thread(c.respawn, "scheduler")
    await wait_status(c, lambda s: indexed(s, "worker-1") >= BLOCKS and len([i for i in s.instances if i.alive]) == 2,
                      60, "the index rebuilt from worker-1's resync")

    async def frontend_back() -> bool:  # it dispatches through the scheduler again (not from its last view)
        async with httpx.AsyncClient(timeout=10) as http:
            return (await http.get(f"{c.http_url}/health")).json().get("scheduler") == "ok"
    await until(frontend_back, 30, "the frontend to reach the scheduler again", step_s=0.2)
    before = hits(c)
    await complete(c, f"{PROMPT}Question 9: and after the restart?")
    now = hits(c)
    assert now["worker-1"] - before["worker-1"] >= (BLOCKS - 1) * 16 and now["worker-0"] == before["worker-0"]
