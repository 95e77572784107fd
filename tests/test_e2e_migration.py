"""Live migration end to end: `kvferry up`'s processes (scheduler, 3 torch workers, frontend) on
127.0.0.1; clients stream with the official openai client and the SDK while `kvferry ctl migrate`
and `kvferry ctl drain` move their requests between workers. Each client must receive exactly the
text / tokens of an unmigrated run, and every worker's blocks must return to zero."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time

import openai
import pytest

from sdk import AsyncClient
from services.launcher import LocalCluster
from testkit.wait import until
from tests.test_e2e_cluster import ctl_status, wait_idle
from tests.test_e2e_failures import references

MODEL = "tiny"
# tokens: a stream must outlive four `kvferry ctl migrate` round trips (~1 s each: a process start);
# the tiny model takes a few ms per token, more on a loaded machine, where ctl starts slower too
LONG = 2500
DRAIN_LONG = 1500  # outlives the status polls and a `kvferry ctl drain` round trip


@pytest.fixture
def cluster(tiny3):
    """The 3-worker torch cluster shared with test_e2e_failures (conftest.py: `tiny3`), whole and
    idle, restored after each test. Its policy is "load": ctl is the only one to move requests here
    (the default kvferry has load-balancing migrations)."""
    return tiny3


def ctl(c: LocalCluster, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", "ctl", *args, "--scheduler", c.scheduler_endpoint],
                          capture_output=True, text=True, timeout=timeout)


async def scheduler_status(c: LocalCluster):  # noqa: ANN201 - protocol.StatusReply
    """The scheduler's StatusReply, asked directly (no `kvferry ctl` process)."""
    from protocol import SchedulerReplies, StatusRequest
    from protocol.sockets import request_once

    return await request_once(c.scheduler_endpoint, StatusRequest(), SchedulerReplies, 10.0)


async def locate(c: LocalCluster, client_rid: str) -> tuple[str, str] | None:
    """(the id workers know the request by, its worker), asked of the scheduler directly."""
    reply = await scheduler_status(c)
    for r in reply.requests:
        if r.request_id in client_rid or client_rid in r.request_id:
            return r.request_id, r.worker_id
    return None


async def locate_soon(c: LocalCluster, client_rid: str, timeout: float = 30.0) -> tuple[str, str]:
    """`locate`, asked until the scheduler lists the request: it learns where requests run from the
    workers' load reports, so one dispatched a moment ago may not be listed yet."""
    return await until(lambda: locate(c, client_rid), timeout, f"{client_rid} listed by the scheduler", step_s=0.05)


async def openai_stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, temperature: float,
                        seed: int | None, ids: asyncio.Queue, model: str = MODEL) -> str:
    """A streamed completion's text (ignore_eos); its id goes to `ids` with the first chunk."""
    s = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                        seed=seed, stream=True, extra_body={"ignore_eos": True})
    text, sent = [], False
    async for chunk in s:
        if not sent:
            await ids.put(chunk.id)
            sent = True
        text.append(chunk.choices[0].text if chunk.choices else "")
    return "".join(text)


async def ctl_migrate(c: LocalCluster, worker_rid: str, dst: str, wait_s: float = 20.0) -> None:
    """`kvferry ctl migrate --wait`, asked again while the scheduler's view lags behind a move."""
    for _ in range(10):
        out = await asyncio.to_thread(ctl, c, "migrate", worker_rid, "--to", dst, "--wait", str(wait_s))
        # The scheduler locates requests from load reports: right after a move, or while a
        # loaded worker is in a long step, they can lag a little. Ask again then.
        if out.returncode == 0 or not any(w in out.stderr for w in ("not_found", "already migrating")):
            break
        await asyncio.sleep(0.3)
    assert out.returncode == 0, out.stdout + out.stderr  # --wait: it is listed on dst now


async def test_ctl_migrate_moves_openai_streams_without_a_seam(cluster):
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=300)
    prompts = {"greedy": ("The river", 0.0, None), "seeded": ("A lighthouse", 1.0, 77)}

    def stream(prompt: str, temperature: float, seed: int | None, ids: asyncio.Queue):  # noqa: ANN202
        return openai_stream(client, prompt, LONG, temperature, seed, ids)

    ids: asyncio.Queue = asyncio.Queue()
    tasks = {name: asyncio.ensure_future(stream(*p, ids)) for name, p in prompts.items()}
    rids = [await asyncio.wait_for(ids.get(), 60) for _ in prompts]
    # Unmigrated twins, started after the ids above were taken: never touched by ctl.
    twins = {name: asyncio.ensure_future(stream(*p, asyncio.Queue())) for name, p in prompts.items()}
    moved = 0
    try:
        for rid in rids:
            found = await locate_soon(cluster, rid)
            worker_rid, src = found
            for _ in range(2):  # there and on again: each request is migrated twice
                dst = next(w for w in ("worker-0", "worker-1", "worker-2") if w != src)
                await ctl_migrate(cluster, worker_rid, dst)
                assert (await locate(cluster, rid)) == (worker_rid, dst)
                src = dst
                moved += 1
        texts = {name: await asyncio.wait_for(t, 300) for name, t in tasks.items()}
        refs = {name: await asyncio.wait_for(t, 300) for name, t in twins.items()}
    finally:  # no stream outlives the test (the next one counts the cluster's requests)
        for t in [*tasks.values(), *twins.values()]:
            t.cancel()
        await asyncio.gather(*tasks.values(), *twins.values(), return_exceptions=True)
        await client.close()
    for name in prompts:
        assert texts[name] == refs[name], f"{name}: the migrated stream differs from an unmigrated run"
        assert len(texts[name]) > LONG // 2
    assert moved == 4
    wait_idle(cluster)


SHAPED = {"temperature": 0.9, "seed": 21, "presence_penalty": 0.4, "frequency_penalty": 0.3, "logprobs": 3,
          "extra_body": {"ignore_eos": True, "repetition_penalty": 1.1, "min_p": 0.02, "logit_bias": {"65": 1.5},
                         "min_tokens": 10}}
SHAPED_LONG = 1500


async def shaped_stream(client: openai.AsyncOpenAI, prompt: str, ids: asyncio.Queue) -> tuple[str, list, list]:
    """A streamed completion with penalties, bias, min-p and logprobs: (text, token logprobs, top logprobs)."""
    s = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=SHAPED_LONG, stream=True, **SHAPED)
    text, lps, tops, sent = [], [], [], False
    async for chunk in s:
        if not sent:
            await ids.put(chunk.id)
            sent = True
        if chunk.choices:
            text.append(chunk.choices[0].text)
            if chunk.choices[0].logprobs:
                lps += chunk.choices[0].logprobs.token_logprobs
                tops += chunk.choices[0].logprobs.top_logprobs
    return "".join(text), lps, tops


async def test_sampling_controls_and_logprobs_survive_ctl_migrate(cluster):
    """Penalties count the request's own tokens, which move with it; the destination computes the
    logprobs of what it samples: a stream migrated twice equals an unmigrated one, logprobs too."""
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=300)
    ids: asyncio.Queue = asyncio.Queue()
    task = asyncio.ensure_future(shaped_stream(client, "The harbour", ids))
    rid = await asyncio.wait_for(ids.get(), 60)
    twin = asyncio.ensure_future(shaped_stream(client, "The harbour", asyncio.Queue()))
    try:
        found = await locate_soon(cluster, rid)
        worker_rid, src = found
        for _ in range(2):
            dst = next(w for w in ("worker-0", "worker-1", "worker-2") if w != src)
            await ctl_migrate(cluster, worker_rid, dst)
            src = dst
        text, lps, tops = await asyncio.wait_for(task, 300)
        ref_text, ref_lps, ref_tops = await asyncio.wait_for(twin, 300)
    finally:
        for t in (task, twin):
            t.cancel()
        await asyncio.gather(task, twin, return_exceptions=True)
        await client.close()
    assert text == ref_text and len(lps) == SHAPED_LONG
    assert lps == pytest.approx(ref_lps, abs=1e-4)
    assert [list(t) for t in tops] == [list(t) for t in ref_tops]
    wait_idle(cluster)


async def drain_busiest_worker(cluster: LocalCluster, prompts: list[tuple[str, float, int | None]],
                               max_tokens: int) -> tuple[str, dict, list[list[int]]]:
    """Stream `prompts` through the SDK, `ctl drain --wait` the worker holding most of them (it
    must be left with none), wait for every stream, undrain. Returns the drained worker, the
    status right after the drain and each stream's tokens."""
    async with AsyncClient(cluster.sdk_endpoint, timeout=300) as sdk:
        async def run(prompt: str, temperature: float, seed: int | None) -> list[int]:
            toks: list[int] = []
            async with contextlib.aclosing(sdk.stream(prompt, max_tokens=max_tokens, temperature=temperature,
                                                      seed=seed, ignore_eos=True)) as chunks:
                async for ch in chunks:
                    toks.extend(ch.token_ids)
            return toks

        tasks = [asyncio.ensure_future(run(*p)) for p in prompts]
        deadline = time.monotonic() + 60
        while True:  # every stream has started on some worker (asked directly: no ctl process per poll)
            st = await scheduler_status(cluster)
            if len(st.requests) >= len(prompts):
                break
            assert time.monotonic() < deadline, f"not every stream started within 60 s: {st.requests}"
            assert not any(t.done() for t in tasks), "a stream ended before the drain: raise max_tokens"
            await asyncio.sleep(0.1)
        counts: dict[str, int] = {}
        for r in st.requests:
            counts[r.worker_id] = counts.get(r.worker_id, 0) + 1
        victim = max(counts, key=counts.__getitem__)
        try:
            out = await asyncio.to_thread(ctl, cluster, "drain", victim, "--wait", "120", timeout=180)
            assert out.returncode == 0, out.stdout + out.stderr
            st = await asyncio.to_thread(ctl_status, cluster)
            assert not [r for r in st["requests"] if r["worker_id"] == victim]
            got = [await asyncio.wait_for(t, 300) for t in tasks]
        finally:  # the module's cluster is whole again for the next test, whatever happened here
            for t in tasks:
                t.cancel()
            assert (await asyncio.to_thread(ctl, cluster, "undrain", victim)).returncode == 0
    return victim, st, got


async def test_drain_moves_every_sdk_stream_off_a_worker(cluster):
    prompts = [("Once upon a time", 0.0, None), ("In the beginning", 0.9, 5), ("Dear diary", 0.0, None)]
    refs = asyncio.ensure_future(asyncio.to_thread(references, prompts, DRAIN_LONG))  # meanwhile, in this process
    victim, drained, got = await drain_busiest_worker(cluster, prompts, DRAIN_LONG)
    assert any(i["worker_id"] == victim and i["draining"] for i in drained["instances"])
    for (prompt, _, _), toks, ref in zip(prompts, got, await refs):
        assert toks == ref, f"{prompt!r}: drained stream differs from an unmigrated run"
    wait_idle(cluster)
