"""Prefix-aware live migration over live processes (design §5): a scheduler (policy load: only
`kvferry ctl migrate` moves requests), 2 torch `tiny` workers with /metrics, a frontend. Worker-1
serves a long prompt first, so its prefix cache holds the prompt's blocks; two greedy streams of
that prompt start on worker-0, one with another tenant's `cache_salt` (its hashes differ: nothing
cached for it on worker-1). Both move to worker-1: the first sends only its private blocks (the
prompt's are skipped), the second every block; both streams equal an unmigrated run.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from protocol import DrainInstance, UndrainInstance
from sdk import AsyncClient
from services.config import WorkerConfig
from services.launcher import free_port_block
from services.worker.engine_factory import build_engine
from tests.test_e2e_failures import MODEL, references, start_cluster, wait_status
from tests.test_e2e_kv_reuse import ask_scheduler
from tests.test_e2e_migration import ctl_migrate
from tests.test_metrics_cluster import scrape, value
from testkit.wait import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

WORKER = {"engine": "torch", "model": MODEL, "dtype": "float32", "num_blocks": 1024}
PROMPT = "A careful assistant answers briefly, cites its sources and never guesses. " * 10  # ~740 byte tokens
BS = 16
LONG = 2000  # tokens: the streams outlive two `kvferry ctl migrate` round trips (a process start each)


@pytest.fixture(scope="module")
def cluster():
    metrics = free_port_block(3)  # the scheduler's, then worker i's at + 1 + i
    c = start_cluster(2, {**WORKER, "metrics_port": metrics + 1}, scheduler={"metrics_port": metrics})
    try:
        yield c
    finally:
        c.stop()


async def only(c, worker_id: str) -> None:  # noqa: ANN001
    """Drain the other worker: new requests go to `worker_id`."""
    other = "worker-1" if worker_id == "worker-0" else "worker-0"
    await ask_scheduler(c, UndrainInstance(worker_id=worker_id))
    await ask_scheduler(c, DrainInstance(worker_id=other))
    await wait_status(c, lambda s: {i.worker_id for i in s.instances if i.draining} == {other}, 30, f"only {worker_id}")


def source_metrics(c) -> tuple[float, float, float]:  # noqa: ANN001
    """worker-0's migration counters: (committed out, KV bytes sent, blocks skipped)."""
    samples = scrape(c.metrics_urls()["worker-0"])[1]
    return (value(samples, "kvferry_migrations_committed_total", role="out"),
            value(samples, "kvferry_migration_bytes_total"), value(samples, "kvferry_migration_blocks_skipped_total"))


async def test_a_destination_caching_the_prompt_is_sent_only_the_private_blocks(cluster):
    c = cluster
    await wait_status(c, lambda s: sum(i.alive for i in s.instances) == 2, 60, "both workers registered")
    ref = asyncio.ensure_future(asyncio.to_thread(references, [(PROMPT, 0.0, None)], LONG))
    per_block = build_engine(WorkerConfig(**{**WORKER, "block_size": BS, "num_blocks": 1}))[1].kv_bytes_per_block
    await only(c, "worker-1")
    async with httpx.AsyncClient(timeout=60) as http:  # worker-1 computes (and caches) the prompt
        r = await http.post(f"{c.http_url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200, r.text
    await only(c, "worker-0")
    await wait_status(c, lambda s: not s.requests, 30, "the warming request gone from the scheduler's view")

    async with AsyncClient(c.sdk_endpoint, timeout=300) as sdk:
        async def run(salt: str) -> list[int]:
            toks: list[int] = []
            async with contextlib.aclosing(sdk.stream(PROMPT, max_tokens=LONG, temperature=0.0, ignore_eos=True,
                                                      cache_salt=salt)) as chunks:
                async for ch in chunks:
                    toks.extend(ch.token_ids)
            return toks

        streams, rids = [], []
        try:
            for salt in ("", "tenant-b"):  # one at a time: the scheduler's new id is this stream's
                streams.append(asyncio.ensure_future(run(salt)))
                st = await wait_status(c, lambda s: len([q for q in s.requests if q.running]) > len(rids), 60,
                                       "the stream running")
                rids += [q.request_id for q in st.requests if q.request_id not in rids]
                assert all(q.worker_id == "worker-0" for q in st.requests)
            await ask_scheduler(c, UndrainInstance(worker_id="worker-1"))
            await wait_status(c, lambda s: not any(i.draining for i in s.instances), 30, "no worker draining")
            moved = []
            for rid in rids:
                before = source_metrics(c)
                await ctl_migrate(c, rid, "worker-1")
                # The source counts a migration once the destination acknowledged its commit.
                after = await until(lambda: (m := source_metrics(c))[0] > before[0] and m, 30,
                                    "the source to count the migration", step_s=0.1)
                moved.append((after[1] - before[1], after[2] - before[2]))
            got = [await asyncio.wait_for(t, 300) for t in streams]
        finally:
            for t in streams:
                t.cancel()
    (hot_bytes, hot_skipped), (cold_bytes, cold_skipped) = moved
    prompt_blocks = len(PROMPT) // BS
    print(f"bytes sent: cached prefix {hot_bytes:.0f} ({hot_skipped:.0f} blocks skipped), "
          f"none cached {cold_bytes:.0f}; {per_block} bytes per block")
    # The hot move's sent blocks + the skipped ones are all its blocks: it sends at most its
    # private blocks (past the prompt's full ones) + 1.
    assert hot_skipped >= prompt_blocks - 1 and cold_skipped == 0, moved
    assert 0 < hot_bytes < cold_bytes and cold_bytes >= prompt_blocks * per_block, moved
    assert got == [(await ref)[0]] * 2  # both moved streams equal an unmigrated run
