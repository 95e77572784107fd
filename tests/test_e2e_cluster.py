"""End to end: `kvferry up`'s processes (scheduler, 2 torch workers, frontend) on 127.0.0.1,
driven by the official openai client, the SDK and `kvferry ctl`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from sdk import AsyncClient
from services.config import load_config
from services.launcher import ClusterSpec, LocalCluster, free_ports
from testkit.wait import wait_until

MODEL = "tiny"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def cluster():
    http, base = free_ports(2)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "worker": {"engine": "torch", "model": MODEL, "dtype": "float32", "num_blocks": 512, "max_num_seqs": 64},
        "frontend": {"model": MODEL},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=2, ready_timeout_s=120))
    c.start()
    try:
        yield c
    finally:
        c.stop()
    assert all(ch.proc.returncode is not None for ch in c.children)


def ctl_status(c: LocalCluster) -> dict:
    out = subprocess.run([sys.executable, "-m", "cli.main", "ctl", "status", "--json", "--scheduler",
                          c.scheduler_endpoint], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_idle(c: LocalCluster, timeout_s: float = 60.0) -> dict:
    """Until every worker reports zero used blocks and no request."""
    last: dict = {}

    def idle() -> dict | None:
        st = last["status"] = ctl_status(c)
        if all(i["used_blocks"] == 0 and i["num_running"] == 0 and i["num_waiting"] == 0 for i in st["instances"]):
            return st
        return None

    return wait_until(idle, timeout_s, lambda: f"idle workers; they still hold blocks: {last['status']['instances']}",
                      step_s=0.3)


@functools.lru_cache(maxsize=None)
def reference(prompt: str, max_tokens: int, ignore_eos: bool = False) -> dict:
    """`kvferry generate`'s greedy output on kvferry's torch engine, `--json` (text and token ids; a
    process start and a model build: asked once per args)."""
    out = subprocess.run([sys.executable, "-m", "cli.main", "generate", "--model", MODEL, "--dtype", "float32",
                          "--prompt", prompt, "--max-tokens", str(max_tokens), "--json",
                          *(["--ignore-eos"] if ignore_eos else [])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_cluster_serves_two_workers(cluster):
    st = ctl_status(cluster)
    assert sorted(i["worker_id"] for i in st["instances"]) == ["worker-0", "worker-1"]
    assert all(i["alive"] for i in st["instances"])
    assert httpx.get(f"{cluster.http_url}/health", timeout=10).status_code == 200


def test_greedy_completion_equals_kvferry_generate(cluster):
    ref = reference(PROMPT, 24)
    client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=60)
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert resp.choices[0].text == ref["text"]
    assert resp.usage.completion_tokens == len(ref["token_ids"])
    # streaming gives the same text, in pieces, with usage at the end
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(parts) == ref["text"]
    assert usage is not None and usage.completion_tokens == len(ref["token_ids"])


def test_chat_stream_and_non_stream_agree(cluster):
    client = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=60)
    messages = [{"role": "user", "content": "Say something."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content
    assert full.usage.prompt_tokens > 0


async def test_fifty_concurrent_streams_over_two_workers(cluster):
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=120)

    async def one(i: int) -> tuple[int, int, str]:
        n = 8 + i % 9
        stream = await client.completions.create(model=MODEL, prompt=f"request {i}:", max_tokens=n, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        usage, rid = None, ""
        async for chunk in stream:
            rid = chunk.id
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None
        return n, usage.completion_tokens, rid

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(want == got for want, got, _ in results)
    assert len({rid for _, _, rid in results}) == 50
    await client.close()
    metrics = httpx.get(f"{cluster.http_url}/metrics", timeout=10).text
    assert "kvferry_time_to_first_token_seconds_bucket" in metrics
    assert "kvferry_inter_token_latency_seconds_bucket" in metrics
    assert "kvferry_e2e_request_latency_seconds_bucket" in metrics
    assert "kvferry_requests_total" in metrics
    wait_idle(cluster)


async def test_client_disconnect_frees_blocks(cluster):
    async with httpx.AsyncClient(timeout=30) as http:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8000, "stream": True, "ignore_eos": True}
        async with http.stream("POST", f"{cluster.http_url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()  # kept open: leaving an `async for` early closes the connection
            line = await anext(lines)
            while not line.startswith("data: "):
                line = await anext(lines)
            rid = json.loads(line[6:])["id"]
            # while the stream is open, its request holds blocks on one worker
            st = await asyncio.to_thread(ctl_status, cluster)
            assert any(r["request_id"] in rid for r in st["requests"]), st["requests"]
            assert sum(i["used_blocks"] for i in st["instances"]) > 0
        # leaving the block closed the connection mid-stream
    st = wait_idle(cluster)
    assert st["requests"] == []


async def test_sdk_matches_http(cluster):
    ref = reference(PROMPT, 24)  # the same as test_greedy_completion_equals_kvferry_generate's
    async with AsyncClient(cluster.sdk_endpoint, timeout=60) as sdk:
        res = await sdk.generate(PROMPT, max_tokens=24)
        assert res.text == ref["text"]
        assert res.token_ids == ref["token_ids"]
        assert res.usage is not None and res.usage.completion_tokens == len(ref["token_ids"])
        pieces = []
        async with contextlib.aclosing(sdk.stream(PROMPT, max_tokens=24)) as chunks:
            async for c in chunks:
                pieces.append(c.text)
        assert "".join(pieces) == ref["text"]


async def test_hostile_frames_on_the_frontend_sockets_are_refused_and_it_keeps_serving(cluster):
    """Random bytes, truncated msgpack, an unknown type, a wrong version and an oversized envelope
    on the SDK endpoint get an ErrorReply; garbage on the token ingress is dropped; then a normal
    request through both HTTP and the SDK still works."""
    import msgpack
    import zmq
    import zmq.asyncio

    from protocol import ErrorReply, decode
    from protocol.client import GenerateRequest
    from protocol.codec import encode

    valid = encode(GenerateRequest(prompt="hi", stream=False))
    hostile = [
        b"\x00\x01garbage\xff",
        valid[: len(valid) // 2],
        msgpack.packb([1, "NoSuchMessage", {}]),
        msgpack.packb([99, "GenerateRequest", {}]),
        b"\x93" + b"x" * (33 << 20),  # above the 32 MiB envelope limit
    ]
    ctx = zmq.asyncio.Context()
    try:
        sdk = ctx.socket(zmq.DEALER)
        sdk.setsockopt(zmq.LINGER, 0)
        sdk.connect(cluster.sdk_endpoint)
        codes = []
        for i, frame in enumerate(hostile):
            await sdk.send(frame)
            # The oversized one is dropped unanswered (ZMQ's message size limit closes the
            # connection): a short look for an answer, not a 10 s wait.
            if await sdk.poll(10_000 if i < 4 else 500):
                reply = decode(await sdk.recv())
                assert isinstance(reply, ErrorReply)
                codes.append(reply.code)
        assert {"malformed", "unknown_type", "version_mismatch"} <= set(codes)
        tokens = ctx.socket(zmq.PUSH)
        tokens.setsockopt(zmq.LINGER, 0)
        tokens.connect(cluster.spec.config.cluster.frontend_tokens(0))
        for frame in hostile[:4]:
            await tokens.send(frame)
    finally:
        ctx.destroy(linger=0)
    client = openai.AsyncOpenAI(base_url=f"{cluster.http_url}/v1", api_key="x", timeout=60)
    resp = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert resp.usage.completion_tokens == 4
    await client.close()
    async with AsyncClient(cluster.sdk_endpoint, timeout=60) as sdk_client:
        assert (await sdk_client.generate(PROMPT, max_tokens=4)).usage.completion_tokens == 4


async def test_sdk_chunks_of_a_step_come_batched_only_to_a_client_that_asked(cluster):
    """Over a raw DEALER: 4 streams with `batch_chunks` get GenerateChunks (several requests' chunks
    in one message) and lose or reorder nothing; without it, only single GenerateChunk arrive."""
    import zmq
    import zmq.asyncio

    from protocol import decode
    from protocol.client import GenerateChunk, GenerateChunks, GenerateRequest
    from protocol.codec import encode
    from protocol.payloads import SamplingParams

    async def run(batch: bool) -> tuple[dict[str, list[int]], set[str], int]:
        ctx = zmq.asyncio.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(cluster.sdk_endpoint)
            reqs = [GenerateRequest(prompt=f"{PROMPT} {k}", sampling=SamplingParams(max_tokens=12, ignore_eos=True),
                                    batch_chunks=batch) for k in range(4)]
            for r in reqs:
                await sock.send(encode(r))
            ids: dict[str, list[int]] = {r.msg_id: [] for r in reqs}
            kinds: set[str] = set()
            most = 0
            done = 0
            deadline = time.monotonic() + 60
            while done < len(reqs):
                assert await sock.poll(max(0, int(1000 * (deadline - time.monotonic())))), "no answer in time"
                msg = decode(await sock.recv())
                kinds.add(type(msg).__name__)
                chunks = msg.chunks if isinstance(msg, GenerateChunks) else [msg]
                most = max(most, len(chunks))
                for c in chunks:
                    assert isinstance(c, GenerateChunk), c
                    assert c.first_index == len(ids[c.reply_to])  # in order per request
                    ids[c.reply_to].extend(c.token_ids)
                    done += c.finish_reason is not None
            return ids, kinds, most
        finally:
            ctx.destroy(linger=0)

    ids, kinds, most = await run(batch=True)
    assert all(len(v) == 12 for v in ids.values()) and "GenerateChunks" in kinds and most >= 2
    ids, kinds, most = await run(batch=False)
    assert all(len(v) == 12 for v in ids.values()) and kinds == {"GenerateChunk"} and most == 1
    wait_idle(cluster)
