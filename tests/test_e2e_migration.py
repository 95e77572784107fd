"""Live migration end to end: `kvferry up`'s processes (scheduler, 3 torch workers, frontend) on
127.0.0.1; clients stream with the official openai client and the SDK while `kvferry ctl migrate`
and `kvferry ctl drain` move their requests between workers. Each client must receive exactly the
text / tokens of an unmigrated run, and every worker's blocks must return to zero."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time

import openai
import pytest

from sdk import AsyncClient
from services.config import load_config
from services.launcher import ClusterSpec, LocalCluster, free_ports
from tests.test_e2e_cluster import ctl_status, wait_idle

MODEL = "tiny"
LONG = 5000  # tokens: the tiny model decodes fast, a stream must outlive four ctl round trips
DRAIN_LONG = 1500


@pytest.fixture(scope="module")
def cluster():
    http, base = free_ports(3)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        # ctl is the only one to move requests here: no load-balancing migrations (the default kvferry has them)
        "scheduler": {"policy": "load"},
        "worker": {"engine": "torch", "model": MODEL, "dtype": "float32", "num_blocks": 1024, "max_num_seqs": 16},
        "frontend": {"model": MODEL},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=3, ready_timeout_s=120))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def ctl(c: LocalCluster, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", "ctl", *args, "--scheduler", c.scheduler_endpoint],
                          capture_output=True, text=True, timeout=timeout)


def reference(prompt: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> dict:
    args = [sys.executable, "-m", "cli.main", "generate", "--model", MODEL, "--dtype", "float32", "--prompt", prompt,
            "--max-tokens", str(max_tokens), "--ignore-eos", "--temperature", str(temperature), "--json"]
    if seed is not None:
        args += ["--seed", str(seed)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def locate(c: LocalCluster, client_rid: str) -> tuple[str, str] | None:
    """(the id workers know the request by, its worker), asked of the scheduler directly."""
    from protocol import SchedulerReplies, StatusRequest
    from protocol.sockets import request_once

    reply = await request_once(c.scheduler_endpoint, StatusRequest(), SchedulerReplies, 5.0)
    for r in reply.requests:
        if r.request_id in client_rid or client_rid in r.request_id:
            return r.request_id, r.worker_id
    return None


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
    for rid in rids:
        found = await locate(cluster, rid)
        assert found is not None, f"{rid} is on no worker"
        worker_rid, src = found
        for _ in range(2):  # there and on again: each request is migrated twice
            dst = next(w for w in ("worker-0", "worker-1", "worker-2") if w != src)
            await ctl_migrate(cluster, worker_rid, dst)
            assert (await locate(cluster, rid)) == (worker_rid, dst)
            src = dst
            moved += 1
    texts = {name: await asyncio.wait_for(t, 300) for name, t in tasks.items()}
    refs = {name: await asyncio.wait_for(t, 300) for name, t in twins.items()}
    await client.close()
    for name in prompts:
        assert texts[name] == refs[name], f"{name}: the migrated stream differs from an unmigrated run"
        assert len(texts[name]) > LONG // 2
    assert moved == 4
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
        while True:  # every stream has started on some worker
            st = await asyncio.to_thread(ctl_status, cluster)
            if len(st["requests"]) >= len(prompts) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        counts: dict[str, int] = {}
        for r in st["requests"]:
            counts[r["worker_id"]] = counts.get(r["worker_id"], 0) + 1
        victim = max(counts, key=counts.__getitem__)
        out = await asyncio.to_thread(ctl, cluster, "drain", victim, "--wait", "60", timeout=90)
        assert out.returncode == 0, out.stdout + out.stderr
        st = await asyncio.to_thread(ctl_status, cluster)
        assert not [r for r in st["requests"] if r["worker_id"] == victim]
        got = [await asyncio.wait_for(t, 300) for t in tasks]
    assert ctl(cluster, "undrain", victim).returncode == 0
    return victim, st, got


async def test_drain_moves_every_sdk_stream_off_a_worker(cluster):
    prompts = [("Once upon a time", 0.0, None), ("In the beginning", 0.9, 5), ("Dear diary", 0.0, None)]
    victim, drained, got = await drain_busiest_worker(cluster, prompts, DRAIN_LONG)
    assert next(i for i in drained["instances"] if i["worker_id"] == victim)["draining"]
    refs = await asyncio.gather(*(asyncio.to_thread(reference, p, DRAIN_LONG, t, s) for p, t, s in prompts))
    for (prompt, _, _), toks, ref in zip(prompts, got, refs):
        assert toks == ref["token_ids"], f"{prompt!r}: drained stream differs from an unmigrated run"
    wait_idle(cluster)
