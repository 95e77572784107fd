"""vLLM workers end to end: `kvferry up`'s processes (scheduler, 2 `--engine vllm` workers on the
tiny model's HF folder, frontend) on 127.0.0.1. Requests stream through the official openai
client and the SDK while `kvferry ctl migrate` / `ctl drain` move them between the vLLM workers
through the kvferry KV connector. Each stream must equal an unmigrated run (and, greedy, kvferry's
own torch engine); the destinations' /metrics must show the connector loaded the moved KV and
vLLM recomputed none of it; every worker's blocks return to zero."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import openai
import pytest

pytest.importorskip("vllm")

from services.config import load_config  # noqa: E402
from services.launcher import ClusterSpec, LocalCluster, free_port_block, free_ports  # noqa: E402
from tests.test_e2e_cluster import reference, wait_idle  # noqa: E402
from tests.test_e2e_migration import (  # noqa: E402
    ctl_migrate,
    drain_busiest_worker,
    locate,
    locate_soon,
    openai_stream,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "tiny"
BS = 32
LONG = 3000
WORKERS = ("worker-0", "worker-1")


@pytest.fixture(scope="module")
def cluster():
    http, base = free_ports(2)
    metrics = free_port_block(2)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "scheduler": {"policy": "load"},  # only ctl moves requests here
        "worker": {"engine": "vllm", "model": MODEL, "dtype": "float32", "block_size": BS, "max_num_seqs": 16,
                   "metrics_port": metrics},
        "frontend": {"model": MODEL},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=2, ready_timeout_s=240))
    c.start()
    c.metrics_base = metrics  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        c.stop()


def worker_metrics(c: LocalCluster, index: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_base + index}/metrics", timeout=10) as r:  # type: ignore[attr-defined]
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(kvferry_worker_vllm_\w+) ([0-9.e+-]+)$", text, re.M)}


async def test_ctl_migrate_moves_openai_streams_between_vllm_workers(cluster):
    before = [worker_metrics(cluster, i) for i in range(2)]
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=300)
    prompts = {"greedy": ("The river", 0.0, None), "seeded": ("A lighthouse", 1.0, 77)}

    def stream(prompt: str, temperature: float, seed: int | None, ids: asyncio.Queue):  # noqa: ANN202
        return openai_stream(client, prompt, LONG, temperature, seed, ids, MODEL)

    ids: asyncio.Queue = asyncio.Queue()
    tasks = {name: asyncio.ensure_future(stream(*p, ids)) for name, p in prompts.items()}
    rids = [await asyncio.wait_for(ids.get(), 60) for _ in prompts]
    moves = 0
    for rid in rids:
        found = await locate_soon(cluster, rid)
        worker_rid, src = found
        for _ in range(2):  # there and back
            dst = next(w for w in WORKERS if w != src)
            await ctl_migrate(cluster, worker_rid, dst, 30.0)
            assert (await locate(cluster, rid)) == (worker_rid, dst)
            src = dst
            moves += 1
    texts = {name: await asyncio.wait_for(t, 300) for name, t in tasks.items()}
    # Unmigrated twins, run after: never touched by ctl.
    twins = {name: await asyncio.wait_for(stream(*p, asyncio.Queue()), 300) for name, p in prompts.items()}
    await client.close()
    for name in prompts:
        assert texts[name] == twins[name], f"{name}: the migrated stream differs from an unmigrated run"
        assert len(texts[name]) > LONG // 2
    ref = await asyncio.to_thread(reference, "The river", LONG, True)  # kvferry's torch engine, same weights
    assert texts["greedy"] == ref["text"]
    after = [worker_metrics(cluster, i) for i in range(2)]
    started = sum(a["kvferry_worker_vllm_continuations_total"] - b["kvferry_worker_vllm_continuations_total"]
                  for a, b in zip(after, before))
    loaded = sum(a["kvferry_worker_vllm_kv_loaded_tokens_total"] - b["kvferry_worker_vllm_kv_loaded_tokens_total"]
                 for a, b in zip(after, before))
    assert started == moves == 4
    assert loaded > 4 * BS  # the moved KV came through the connector, not a prefill
    for m in after:  # none of a moved request's computed tokens is computed again (the issue allows a block)
        assert m["kvferry_worker_vllm_kv_recomputed_tokens_max"] == 0
    wait_idle(cluster)


async def test_drain_moves_sdk_streams_off_a_vllm_worker(cluster):
    prompts = [("Once upon a time", 0.0, None), ("Dear diary", 0.0, None), ("In the beginning", 0.0, None)]
    n = 1200
    _, _, got = await drain_busiest_worker(cluster, prompts, n)
    refs = await asyncio.gather(*(asyncio.to_thread(reference, p, n, True) for p, _, _ in prompts))  # all greedy
    for (prompt, _, _), toks, ref in zip(prompts, got, refs):
        assert toks == ref["token_ids"], f"{prompt!r}: drained stream differs from kvferry's engine"
    wait_idle(cluster)


async def test_vllm_workers_feed_the_scheduler_s_prefix_index(cluster):
    """vLLM's KV cache events, re-hashed by each worker, reach the scheduler's prefix index: the
    blocks of a served prompt show as indexed on the worker that served it."""
    from protocol import SchedulerReplies, StatusRequest
    from protocol.sockets import request_once
    from testkit.wait import until

    async def indexed() -> int:
        st = await request_once(cluster.scheduler_endpoint, StatusRequest(include_requests=False),
                                SchedulerReplies, 10.0)
        return sum(i.indexed_blocks for i in st.instances if i.alive)

    before = await indexed()
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", max_retries=0, timeout=120)
    prompt = "A prompt long enough for several full blocks of thirty-two byte tokens each. " * 4
    r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    await client.close()
    want = before + len(prompt) // BS - 1

    async def grown() -> bool:
        return await indexed() >= want

    assert await until(grown, 30, "the prompt's blocks indexed")
    wait_idle(cluster)


async def test_logprobs_echo_sampling_controls_and_grammars_on_vllm_workers(cluster):
    """The same request fields as on torch workers, answered by vLLM: logprobs and echo in OpenAI's
    shapes, vLLM's penalties, and a regex / choice grammar through vLLM's guidance backend."""
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=300, max_retries=0)
    try:
        out = await client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=6, logprobs=2, echo=True,
                                              temperature=0, extra_body={"ignore_eos": True})
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == 10 and lp.token_logprobs[0] is None
        assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) >= 1 for t in lp.top_logprobs[1:])
        pen = await client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0,
                                              frequency_penalty=1.5, extra_body={"ignore_eos": True,
                                                                                 "repetition_penalty": 1.3})
        assert pen.choices[0].text
        rx = await client.completions.create(model=MODEL, prompt="abc", max_tokens=20,
                                             extra_body={"guided_regex": "[a-e]{3,6}!"})
        assert re.fullmatch("[a-e]{3,6}!", rx.choices[0].text), rx.choices[0].text
        ch = await client.completions.create(model=MODEL, prompt="abc", max_tokens=20,
                                             extra_body={"guided_choice": ["left", "right"]})
        assert ch.choices[0].text in ("left", "right")
    finally:
        await client.close()
    wait_idle(cluster)
