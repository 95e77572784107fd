"""Frontend end to end with a fake scheduler and a fake worker played by this test (ZeroMQ on
127.0.0.1), driven by the official `openai` client, raw HTTP, and the SDK.

The fake worker answers every prompt with ANSWER's tokens (tiny's byte tokenizer, so multi-byte
characters are split across tokens), sent out of order and with a duplicate batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket

import httpx
import openai
import pytest
import zmq
import zmq.asyncio

from engine.weights import tiny
from protocol import (
    AbortRequest,
    Ack,
    AddRequest,
    DispatchReply,
    DispatchRequest,
    ErrorReply,
    InstanceStatus,
    Ping,
    Pong,
    SchedulerInbound,
    StatusReply,
    StatusRequest,
    TokenBatch,
    TokenBatches,
    WorkerControlInbound,
    WorkerEndpoints,
)
from protocol.payloads import TokenLogprobs
from protocol.sockets import MessageSocket, serve
from sdk import AsyncClient, Client, InvalidRequest, Overloaded
from services.config import KvferryConfig
from services.frontend.server import Frontend
from testkit.wait import until

pytestmark = pytest.mark.timeout(60)

ANSWER = "Hi é日本😀 there, friend."
TOK = tiny.byte_tokenizer()
ANSWER_IDS = TOK.encode(ANSWER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ep() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


class FakeCluster:
    """A scheduler ROUTER and one worker ROUTER; the worker streams ANSWER_IDS for every request.

    Prompt keywords steer it: "slow" streams 3 tokens then waits for an abort; "overload" answers
    ErrorReply(overloaded)."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.scheduler_ep, self.worker_ep = ep(), ep()
        self.added: list[AddRequest] = []
        self.aborted: list[str] = []
        self.dispatches = 0
        self.tasks: list[asyncio.Task] = []
        self.pushers: dict[str, MessageSocket] = {}
        self.sched_task: asyncio.Task | None = None
        self.sched_sock: MessageSocket | None = None

    def start_scheduler(self) -> None:
        self.sched_sock = MessageSocket.bind(self.ctx, zmq.ROUTER, self.scheduler_ep, SchedulerInbound)
        self.sched_task = asyncio.create_task(serve(self.sched_sock, self.on_scheduler))

    async def stop_scheduler(self) -> None:
        assert self.sched_task and self.sched_sock
        self.sched_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sched_task
        self.sched_sock.close()

    async def start(self) -> None:
        self.start_scheduler()
        wsock = MessageSocket.bind(self.ctx, zmq.ROUTER, self.worker_ep, WorkerControlInbound)
        self.tasks.append(asyncio.create_task(serve(wsock, self.on_worker)))

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.sched_task and not self.sched_task.done():
            await self.stop_scheduler()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.ctx.destroy(linger=0)

    async def on_scheduler(self, rec):
        m = rec.msg
        if isinstance(m, DispatchRequest):
            self.dispatches += 1
            return DispatchReply(reply_to=m.msg_id, request_id=m.request_id, worker_id="worker-0",
                                 worker_address=self.worker_ep)
        if isinstance(m, StatusRequest):
            inst = InstanceStatus(worker_id="worker-0", endpoints=WorkerEndpoints(control=self.worker_ep,
                                                                                  migration=self.worker_ep))
            return StatusReply(reply_to=m.msg_id, scheduler_id="fake", instances=[inst])
        return None

    async def on_worker(self, rec):
        m = rec.msg
        if isinstance(m, AddRequest):
            prompt = TOK.decode(m.prompt_token_ids)
            if "overload" in prompt:
                return ErrorReply(reply_to=m.msg_id, code="overloaded", message="queue full")
            self.added.append(m)
            self.tasks.append(asyncio.create_task(self.stream(m, slow="slow" in prompt)))
            return Ack(reply_to=m.msg_id)
        if isinstance(m, AbortRequest):
            self.aborted.append(m.request_id)
            return Ack(reply_to=m.msg_id)
        if isinstance(m, Ping):  # the frontend's liveness probe
            return Pong.to(m, sender_id="worker-0")
        return None

    async def stream(self, m: AddRequest, slow: bool) -> None:
        push = self.pushers.get(m.reply_address)
        if push is None:
            push = self.pushers[m.reply_address] = MessageSocket.connect(self.ctx, zmq.PUSH, m.reply_address)
        rid, ids = m.request_id, ANSWER_IDS[:m.sampling.max_tokens]
        reason = "length" if len(ids) < len(ANSWER_IDS) else "stop"

        def b(i, j, fin=None):
            lps = plps = None
            if m.sampling.logprobs is not None:  # made-up but checkable: token k has logprob -(k + 1) / 10
                lps = [fake_logprobs(k, ids[k], m.sampling.logprobs) for k in range(i, min(j, n))]
            if m.sampling.prompt_logprobs is not None and i == 0:
                p = m.prompt_token_ids
                plps = [None] + [fake_logprobs(100 + k, p[k], m.sampling.prompt_logprobs) for k in range(1, len(p))]
            return TokenBatch(request_id=rid, first_index=i, token_ids=ids[i:j], worker_id="worker-0",
                              finish_reason=fin, logprobs=lps, prompt_logprobs=plps)

        n = len(ids)
        if slow:
            await push.send(b(0, 3))
            while rid not in self.aborted:
                await asyncio.sleep(0.02)
            return
        n = len(ids)
        # Pauses between sends, as between engine steps: the frontend merges what is already
        # queued into one event, so back-to-back batches could arrive as a single piece.
        for msg in (b(0, 3),
                    b(6, 9),  # ahead of a gap
                    TokenBatches(worker_id="worker-0", batches=[b(0, 3), b(3, 6)]),  # a duplicate, then the gap
                    b(4, 10),  # overlaps
                    b(10, n - 1),
                    b(n - 1, n, reason)):
            await push.send(msg)
            await asyncio.sleep(0.01)


def fake_logprobs(k: int, token: int, top: int) -> TokenLogprobs:
    """The fake worker's logprobs of its k-th token: -(k + 1) / 10, ranked first, alternatives below it."""
    lp = -(k + 1) / 10
    return TokenLogprobs(lp, 1, ([token] + [(token + d) % 256 for d in range(1, top)])[:top],
                         [lp - d for d in range(top)])


@pytest.fixture
async def cluster():
    c = FakeCluster()
    await c.start()
    yield c
    await c.close()


def make_cfg(c: FakeCluster, **frontend) -> KvferryConfig:
    cfg = KvferryConfig()
    cfg.cluster = dataclasses.replace(cfg.cluster, http_port=0, overrides={
        "scheduler": c.scheduler_ep, "frontend.0.sdk": ep(), "frontend.0.tokens": ep()})
    cfg.frontend = dataclasses.replace(cfg.frontend, **frontend)
    return cfg


@pytest.fixture
async def frontend(cluster):
    fe = Frontend(make_cfg(cluster, dispatch_timeout_s=0.3, max_body_bytes=4096), tokenizer=TOK, model_name="tiny",
                  max_context=4096)
    await fe.start()
    yield fe
    await fe.stop()


# ---- validation -------------------------------------------------------------------------------

async def test_bad_requests_get_openai_errors(frontend):
    async with httpx.AsyncClient(base_url=frontend.http_url, timeout=5) as h:
        cases = [
            (b"{not json", 400, "invalid_json", None),
            (b"[1, 2]", 400, None, None),
            ({"model": "tiny", "prompt": 5}, 400, "invalid_type", "prompt"),
            ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
            ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
            ({"model": "tiny", "prompt": "x", "temperature": 3.5}, 400, "invalid_value", "temperature"),
            ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "invalid_value", "top_p"),
            ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "invalid_type", "stream"),
            ({"model": "tiny", "prompt": "x", "stop": [1]}, 400, "invalid_type", "stop"),
            ({"model": "tiny", "prompt": [1, 99999]}, 400, "invalid_value", "prompt"),
            ({"model": "tiny", "prompt": ""}, 400, "invalid_value", "prompt"),
            ({"model": "gpt-4", "prompt": "x"}, 404, "model_not_found", "model"),
            ({"model": "tiny", "prompt": "x", "n": 0}, 400, "invalid_value", "n"),
            ({"model": "tiny", "prompt": "x", "n": 65}, 400, "invalid_value", "n"),
            ({"model": "tiny", "prompt": ["a", "b"], "n": 40}, 400, "invalid_value", "n"),
            ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 1000}}, 400, "invalid_value", "logit_bias"),
            ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_schema"}}, 400,
             "invalid_value", "response_format"),
            ({"model": "tiny", "prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
             "unsupported_parameter", "tools"),
            ({"model": "tiny", "prompt": "x", "stop_token_ids": [-3]}, 400, "invalid_value", "stop_token_ids"),
            ({"model": "tiny", "prompt": "x" * 5000}, 413, "request_too_large", None),
        ]
        for body, status, code, param in cases:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = await h.post("/v1/completions", headers={"content-type": "application/json"}, **kw)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            if code:
                assert err["code"] == code, (body, err)
            if param:
                assert err["param"] == param, (body, err)
        r = await h.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": 3}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
        r = await h.post("/v1/chat/completions", json={"model": "tiny", "messages": "hi"})
        assert r.status_code == 400
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        r = await h.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                       "tools": [tool], "tool_choice": {"function": {"name": "g"}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        r = await h.post("/v1/completions", json={"prompt": "overload me"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"]
        r = await h.get("/nope")
        assert r.status_code == 404 and "error" in r.json()
        # still serving
        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 64})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ANSWER


async def test_models_tokenize_detokenize_and_version(frontend):
    """vLLM's shapes: /v1/models with max_model_len, /v1/models/{id} (404 for another), /tokenize
    of a prompt and of chat messages, /detokenize back, /version; bad bodies get OpenAI errors."""
    async with httpx.AsyncClient(base_url=frontend.http_url, timeout=5) as h:
        card = (await h.get("/v1/models")).json()["data"][0]
        assert card["id"] == "tiny" and card["max_model_len"] == 4096 and card["object"] == "model"
        assert (await h.get("/v1/models/tiny")).json() == card
        r = await h.get("/v1/models/gpt-4")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await h.post("/tokenize", json={"model": "tiny", "prompt": "hello", "return_token_strs": True})
        tok = r.json()
        assert r.status_code == 200 and tok["tokens"] == TOK.encode("hello") and tok["count"] == len(tok["tokens"])
        assert tok["max_model_len"] == 4096 and len(tok["token_strs"]) == tok["count"]
        r = await h.post("/detokenize", json={"model": "tiny", "tokens": tok["tokens"]})
        assert r.status_code == 200 and r.json() == {"prompt": "hello"}
        chat = (await h.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})).json()
        assert chat["tokens"] == TOK.encode_chat([{"role": "user", "content": "hi"}]) and chat["token_strs"] is None
        bare = (await h.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                                "add_generation_prompt": False})).json()
        assert chat["tokens"][:bare["count"]] == bare["tokens"] and bare["count"] < chat["count"]
        for path, body, status, param in (("/tokenize", {"prompt": 5}, 400, "prompt"),
                                          ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
                                          ("/tokenize", {"prompt": "x", "messages": []}, 400, "messages"),
                                          ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                                                         "add_generation_prompt": 0}, 400, "add_generation_prompt"),
                                          ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
                                          ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
                                          ("/detokenize", {}, 400, "tokens")):
            r = await h.post(path, json=body)
            assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)
        r = await h.post("/tokenize", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        v = (await h.get("/version")).json()
        assert isinstance(v["version"], str) and v["version"]


async def test_api_key(cluster):
    fe = Frontend(make_cfg(cluster, api_key="sekret"), tokenizer=TOK, model_name="tiny")
    await fe.start()
    try:
        async with httpx.AsyncClient(base_url=fe.http_url, timeout=5) as h:
            r = await h.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = await h.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
        client = openai.AsyncOpenAI(base_url=fe.http_url + "/v1", api_key="sekret", max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        out = await client.completions.create(model="tiny", prompt="hey", max_tokens=64)
        assert out.choices[0].text == ANSWER
        await client.close()
    finally:
        await fe.stop()


# ---- the OpenAI client ------------------------------------------------------------------------

async def test_openai_client_streams_and_non_streams(frontend, cluster):
    client = openai.AsyncOpenAI(base_url=frontend.http_url + "/v1", api_key="none", max_retries=0)
    prompt = "Say hi"
    n_prompt, n_out = len(TOK.encode(prompt)), len(ANSWER_IDS)

    out = await client.completions.create(model="tiny", prompt=prompt, max_tokens=64)
    assert out.choices[0].text == ANSWER and out.choices[0].finish_reason == "stop"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        n_prompt, n_out, n_prompt + n_out)
    assert out.id.startswith("cmpl-") and out.id == cluster.added[-1].request_id  # the wire id

    texts, usage, reasons = [], None, []
    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=64, stream=True,
                                             stream_options={"include_usage": True})
    async for ch in stream:
        if ch.choices:
            texts.append(ch.choices[0].text)
            reasons.append(ch.choices[0].finish_reason)
        else:
            usage = ch.usage
    assert "".join(texts) == ANSWER and reasons[-1] == "stop" and len(texts) > 2
    assert usage.completion_tokens == n_out and usage.prompt_tokens == n_prompt

    out = await client.completions.create(model="tiny", prompt=list(TOK.encode(prompt)), max_tokens=5)
    assert out.choices[0].text == TOK.decode(ANSWER_IDS[:5]) and out.choices[0].finish_reason == "length"

    msgs = [{"role": "user", "content": "hello"}]
    chat = await client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=64)
    assert chat.choices[0].message.content == ANSWER and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(TOK.encode_chat(msgs)) and chat.id.startswith("chatcmpl-")
    assert cluster.added[-1].prompt_token_ids == TOK.encode_chat(msgs)

    parts, usage = [], None
    stream = await client.chat.completions.create(model="tiny", messages=msgs, stream=True, max_tokens=64,
                                                  stream_options={"include_usage": True}, seed=3, temperature=0.5,
                                                  extra_body={"priority": -2})
    async for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
        else:
            usage = ch.usage
    assert "".join(parts) == ANSWER and usage.completion_tokens == n_out
    add = cluster.added[-1]
    assert add.priority == -2 and add.sampling.seed == 3 and add.sampling.temperature == 0.5
    assert add.first_index == 0 and add.reply_address == frontend.router.reply_address
    await client.close()


def tok_text(t: int) -> str:
    return TOK.decode([t], skip_special_tokens=False)


async def test_logprobs_in_openai_shapes_whole_and_streamed(frontend, cluster):
    """Completions' {tokens, token_logprobs, top_logprobs, text_offset} and chat's content entries
    carry the worker's logprobs, in order through the fake worker's gap, duplicate and overlap, the
    same whole and streamed; the official client parses both."""
    client = openai.AsyncOpenAI(base_url=frontend.http_url + "/v1", api_key="none", max_retries=0)
    n = len(ANSWER_IDS)
    want = [-(k + 1) / 10 for k in range(n)]
    out = await client.completions.create(model="tiny", prompt="Say hi", max_tokens=64, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want) and lp.tokens == [tok_text(t) for t in ANSWER_IDS]
    assert lp.text_offset == [sum(len(tok_text(t)) for t in ANSWER_IDS[:k]) for k in range(n)]
    assert all(len(top) >= 1 and top[tok_text(t)] == pytest.approx(v)
               for top, t, v in zip(lp.top_logprobs, ANSWER_IDS, want))
    assert cluster.added[-1].sampling.logprobs == 2 and cluster.added[-1].sampling.prompt_logprobs is None

    streamed: list[float] = []
    stream = await client.completions.create(model="tiny", prompt="Say hi", max_tokens=64, logprobs=1, stream=True)
    async for ch in stream:
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(want)

    msgs = [{"role": "user", "content": "hello"}]
    chat = await client.chat.completions.create(model="tiny", messages=msgs, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(want) and [c.token for c in content] == \
        [tok_text(t) for t in ANSWER_IDS]
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    assert content[0].bytes == list(content[0].token.encode())
    streamed = []
    stream = await client.chat.completions.create(model="tiny", messages=msgs, logprobs=True, stream=True)
    async for ch in stream:
        if ch.choices and ch.choices[0].logprobs:
            streamed += [c.logprob for c in ch.choices[0].logprobs.content]
    assert streamed == pytest.approx(want)
    plain = await client.chat.completions.create(model="tiny", messages=msgs)
    assert plain.choices[0].logprobs is None and cluster.added[-1].sampling.logprobs is None
    await client.close()


async def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(frontend, cluster):
    """vLLM's stream_options.continuous_usage_stats (guidellm streams with it)."""
    async with httpx.AsyncClient(base_url=frontend.http_url) as h:
        usages = []
        async with h.stream("POST", "/v1/completions", json={
                "model": "tiny", "prompt": "Say hi", "max_tokens": 64, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as s:
            async for line in s.aiter_lines():
                if line.startswith("data: {"):
                    usages.append(json.loads(line[6:])["usage"])
    n_prompt = len(TOK.encode("Say hi"))
    done = [u["completion_tokens"] for u in usages]
    assert all(u["prompt_tokens"] == n_prompt for u in usages) and done == sorted(done)
    assert done[-1] == len(ANSWER_IDS) and len(usages) > 2


async def test_echo_with_logprobs_gives_the_prompt_first_as_lm_eval_reads_it(frontend, cluster):
    """echo + logprobs (+ max_tokens 0): the prompt's text and tokens first, its first token's
    logprob null; lm-evaluation-harness sums token_logprobs[ctxlen:-1] of exactly this answer."""
    async with httpx.AsyncClient(base_url=frontend.http_url) as h:
        prompt = [5, 6, 7, 8]
        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "echo": True,
                                                  "logprobs": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        assert c["text"] == TOK.decode(prompt) + TOK.decode(ANSWER_IDS[:1])
        lp = c["logprobs"]
        assert lp["tokens"] == [tok_text(t) for t in prompt + ANSWER_IDS[:1]]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx([-(100 + k + 1) / 10 for k in range(1, 4)] + [-0.1])
        assert cluster.added[-1].sampling.prompt_logprobs == 1

        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 0, "echo": True,
                                                  "logprobs": 0})
        body = r.json()
        c = body["choices"][0]
        assert c["text"] == "abc" and len(c["logprobs"]["tokens"]) == 3 and c["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 0 and cluster.added[-1].sampling.max_tokens == 1

        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 3, "echo": True})
        assert r.json()["choices"][0]["text"] == "abc" + TOK.decode(ANSWER_IDS[:3])
        assert r.json()["choices"][0]["logprobs"] is None

        events = []
        async with h.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 2,
                                                             "echo": True, "logprobs": 0, "stream": True}) as s:
            async for line in s.aiter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:])["choices"][0])
        assert "".join(e["text"] for e in events) == "abc" + TOK.decode(ANSWER_IDS[:2])
        assert [v for e in events if e["logprobs"] for v in e["logprobs"]["token_logprobs"]][0] is None

        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": [9, 10, 11], "max_tokens": 2,
                                                  "prompt_logprobs": 0})
        plp = r.json()["choices"][0]["prompt_logprobs"]
        assert plp[0] is None and list(plp[1]) == ["10"] and plp[1]["10"]["logprob"] == pytest.approx(-10.2)
        r = await h.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                       "prompt_logprobs": 1, "max_tokens": 2})
        assert r.json()["prompt_logprobs"][0] is None and "prompt_logprobs" not in r.json()["choices"][0]


async def test_best_of_answers_the_most_likely_samples(frontend, cluster):
    """best_of 3, n 1: three engine requests whose logprobs rank them; the answer is one choice."""
    async with httpx.AsyncClient(base_url=frontend.http_url) as h:
        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4, "best_of": 3,
                                                  "temperature": 1.0})
        body = r.json()
        assert r.status_code == 200 and len(body["choices"]) == 1 and body["choices"][0]["index"] == 0
        assert body["choices"][0]["logprobs"] is None and body["usage"]["completion_tokens"] == 12
        assert [a.sampling.logprobs for a in cluster.added[-3:]] == [0, 0, 0]


async def test_include_stop_str_in_output_keeps_the_stop_string(frontend, cluster):
    async with httpx.AsyncClient(base_url=frontend.http_url) as h:
        for include, want in ((False, "Hi é日本😀 "), (True, "Hi é日本😀 there")):
            r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 64,
                                                      "stop": ["there"], "include_stop_str_in_output": include})
            assert r.json()["choices"][0]["text"] == want and r.json()["choices"][0]["finish_reason"] == "stop"
        # min_tokens: a stop string completed within the first min_tokens tokens does not count ("é"
        # is the 4th and 5th byte token)
        for min_tokens, want in ((5, "Hi "), (6, ANSWER)):
            r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 64, "stop": ["é"],
                                                      "min_tokens": min_tokens})
            assert r.json()["choices"][0]["text"] == want


async def test_responses_api_text_subset_with_the_openai_client(frontend, cluster):
    """/v1/responses: input + instructions become the chat prompt; the answer is a Response (output_text),
    streamed as the Responses event sequence; max_output_tokens cuts it to status incomplete."""
    client = openai.AsyncOpenAI(base_url=frontend.http_url + "/v1", api_key="none", max_retries=0)
    r = await client.responses.create(model="tiny", input="Say hi", instructions="Be brief.")
    assert r.output_text == ANSWER and r.status == "completed" and r.id.startswith("resp_")
    assert r.usage.output_tokens == len(ANSWER_IDS)
    want = TOK.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}])
    assert cluster.added[-1].prompt_token_ids == want
    short = await client.responses.create(model="tiny", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Say"}, {"type": "input_text", "text": " hi"}]}], max_output_tokens=5)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.output_text == TOK.decode(ANSWER_IDS[:5])
    kinds, deltas, final = [], [], None
    async for ev in await client.responses.create(model="tiny", input="Say hi", stream=True):
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
        if ev.type == "response.completed":
            final = ev.response
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(deltas) == ANSWER and final.output_text == ANSWER
    for extra, param in (({"tools": [{"type": "web_search"}]}, "tools"), ({"max_output_tokens": 0}, "max_output_tokens"),
                         ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"input": 5}, "input"),
                         ({"text": {"format": {"type": "xml"}}}, "text")):
        with pytest.raises(openai.BadRequestError) as err:
            await client.responses.create(model="tiny", **{"input": "x", **extra})
        assert err.value.body["param"] == param, (extra, err.value.body)
    await client.close()


async def test_n_choices_and_batched_prompts_are_engine_requests_of_their_own(frontend, cluster):
    """n > 1 and a list of prompts: one engine request per choice (`{id}-{index}`), choices indexed
    prompt by prompt, usage summed (each prompt counted once); seeded samples differ and repeat;
    streamed choices carry their index."""
    client = openai.AsyncOpenAI(base_url=frontend.http_url + "/v1", api_key="none", max_retries=0)
    before = len(cluster.added)
    out = await client.completions.create(model="tiny", prompt="Say hi", max_tokens=64, n=3, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2] and all(c.text == ANSWER for c in out.choices)
    assert out.usage.prompt_tokens == len(TOK.encode("Say hi"))
    assert out.usage.completion_tokens == 3 * len(ANSWER_IDS)
    adds = cluster.added[before:]
    assert sorted(a.request_id for a in adds) == [f"{out.id}-{k}" for k in range(3)]
    assert sorted(a.sampling.seed for a in adds) == [7, 8, 9]  # seed + sample index: distinct, repeatable

    before = len(cluster.added)
    out = await client.completions.create(model="tiny", prompt=["one", "three", [5, 6]], max_tokens=64, n=2)
    assert len(out.choices) == 6 and all(c.text == ANSWER for c in out.choices)
    assert out.usage.prompt_tokens == len(TOK.encode("one")) + len(TOK.encode("three")) + 2
    by_id = {a.request_id: a.prompt_token_ids for a in cluster.added[before:]}
    assert [by_id[f"{out.id}-{k}"] for k in range(6)] == [TOK.encode("one")] * 2 + [TOK.encode("three")] * 2 + [[5, 6]] * 2

    msgs = [{"role": "user", "content": "hello"}]
    chat = await client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=64, n=2)
    assert [c.message.content for c in chat.choices] == [ANSWER, ANSWER] and chat.usage.completion_tokens == 2 * len(ANSWER_IDS)

    texts: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str] = {}
    usage = None
    stream = await client.chat.completions.create(model="tiny", messages=msgs, stream=True, max_tokens=64, n=2,
                                                  stream_options={"include_usage": True})
    async for ch in stream:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        if not ch.choices:
            usage = ch.usage
    assert texts == {0: ANSWER, 1: ANSWER} and set(finish) == {0, 1}
    assert usage.completion_tokens == 2 * len(ANSWER_IDS) and usage.prompt_tokens == len(TOK.encode_chat(msgs))
    await client.close()


async def test_a_choice_that_cannot_start_fails_the_request_and_aborts_the_others(frontend, cluster):
    async with httpx.AsyncClient(base_url=frontend.http_url, timeout=10) as h:
        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": ["fine", "overload me"], "max_tokens": 64})
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
        r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 64, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2  # still serving


async def test_stop_string_aborts_on_worker(frontend, cluster):
    client = openai.AsyncOpenAI(base_url=frontend.http_url + "/v1", api_key="none", max_retries=0)
    out = await client.completions.create(model="tiny", prompt="x", max_tokens=64, stop=["日本", "zzz"])
    assert out.choices[0].text == "Hi é" and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(TOK.encode("Hi é日本"))
    assert await until(lambda: out.id in cluster.aborted, 5.0)
    await client.close()


async def test_client_disconnect_aborts_on_worker(frontend, cluster):
    async with httpx.AsyncClient(base_url=frontend.http_url, timeout=5) as h:
        async with h.stream("POST", "/v1/completions", json={"prompt": "slow please", "max_tokens": 64,
                                                             "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    break
    first = cluster.added[0].request_id
    assert await until(lambda: first in cluster.aborted, 5.0)
    assert await until(lambda: not frontend.router.streams, 5.0)

    # non-streaming too
    async with httpx.AsyncClient(base_url=frontend.http_url, timeout=1.5) as h:
        with pytest.raises(httpx.ReadTimeout):
            await h.post("/v1/completions", json={"prompt": "slow please", "max_tokens": 64})
    assert await until(lambda: len(cluster.added) == 2 and cluster.added[1].request_id in cluster.aborted, 5.0)
    assert set(cluster.aborted) == {first, cluster.added[1].request_id}


# ---- SDK ---------------------------------------------------------------------------------------

async def test_sdk_same_as_http(frontend, cluster):
    async with AsyncClient(frontend.sdk_endpoint, timeout=10) as c:
        res = await c.generate("Say hi", max_tokens=64)
        assert res.text == ANSWER and res.token_ids == ANSWER_IDS and res.finish_reason == "stop"
        assert res.usage.prompt_tokens == len(TOK.encode("Say hi")) and res.request_id == cluster.added[-1].request_id
        chunks = [ch async for ch in c.stream(messages=[{"role": "user", "content": "hello"}], max_tokens=64)]
        assert "".join(ch.text for ch in chunks) == ANSWER and chunks[-1].usage.completion_tokens == len(ANSWER_IDS)
        ids = [t for ch in chunks for t in ch.token_ids]
        assert ids == ANSWER_IDS and [ch.first_index for ch in chunks][0] == 0
        res = await c.generate(prompt_token_ids=[1, 2, 3], max_tokens=4, stop="zz")
        assert res.finish_reason == "length" and res.token_ids == ANSWER_IDS[:4]
        res = await c.generate("x", max_tokens=64, stop=["😀"])
        assert res.text == "Hi é日本" and res.finish_reason == "stop"
        with pytest.raises(InvalidRequest):
            await c.generate(prompt_token_ids=[1, 99999])
        with pytest.raises(Overloaded):
            await c.generate("overload")
        # leaving a stream early cancels the request on the worker
        async with contextlib.aclosing(c.stream("slow", max_tokens=64)) as chunks:
            async for ch in chunks:
                rid = ch.request_id
                break
        assert await until(lambda: rid in cluster.aborted, 5.0)

    def sync_part() -> tuple[str, str]:
        with Client(frontend.sdk_endpoint, timeout=10) as sc:
            whole = sc.generate("hi", max_tokens=64).text
            streamed = "".join(ch.text for ch in sc.stream("hi", max_tokens=64))
            return whole, streamed

    assert await asyncio.to_thread(sync_part) == (ANSWER, ANSWER)


async def test_sdk_timeout(frontend, cluster):
    from sdk import GenerateTimeout

    async with AsyncClient(frontend.sdk_endpoint) as c:
        with pytest.raises(GenerateTimeout):
            await c.generate("slow", max_tokens=64, timeout=0.5)
    assert await until(lambda: len(cluster.aborted) == 1, 5.0)


# ---- metrics, health, fallback ---------------------------------------------------------------

def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing")


async def test_metrics_move(frontend):
    async with httpx.AsyncClient(base_url=frontend.http_url, timeout=5) as h:
        before = (await h.get("/metrics")).text
        assert metric(before, "kvferry_time_to_first_token_seconds_count") == 0
        for _ in range(2):
            assert (await h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 64})).status_code == 200
        text = (await h.get("/metrics")).text
    for name in ("kvferry_time_to_first_token_seconds_count", "kvferry_e2e_request_latency_seconds_count",
                 "kvferry_dispatch_latency_seconds_count"):
        assert metric(text, name) == 2, name
    assert metric(text, "kvferry_inter_token_latency_seconds_count") > 2
    assert metric(text, 'kvferry_requests_total{outcome="stop"}') == 2
    assert metric(text, "kvferry_generated_tokens_total") == 2 * len(ANSWER_IDS)
    assert metric(text, "kvferry_requests_in_flight") == 0
    assert metric(text, 'vllm:time_to_first_token_seconds_count{model_name="tiny"}') == 2
    assert metric(text, 'vllm:generation_tokens_total{model_name="tiny"}') == 2 * len(ANSWER_IDS)
    assert metric(text, 'vllm:prompt_tokens_total{model_name="tiny"}') == 2 * len(TOK.encode("hi"))


async def test_scheduler_down_falls_back_to_last_known_worker(frontend, cluster):
    async with httpx.AsyncClient(base_url=frontend.http_url, timeout=5) as h:
        assert (await h.get("/health")).status_code == 200  # known from the first status reply
        r = await h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 64})
        assert r.status_code == 200 and cluster.dispatches == 1
        await cluster.stop_scheduler()
        r = await h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 64})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ANSWER
        assert cluster.dispatches == 1 and len(cluster.added) == 2
        assert frontend.router.scheduler_ok is False
        health = await h.get("/health")
        assert health.status_code == 200 and health.json()["scheduler"] == "unreachable"


async def test_health_503_without_workers():
    cfg = KvferryConfig()
    cfg.cluster = dataclasses.replace(cfg.cluster, http_port=0, overrides={
        "scheduler": ep(), "frontend.0.sdk": ep(), "frontend.0.tokens": ep()})
    cfg.frontend = dataclasses.replace(cfg.frontend, dispatch_timeout_s=0.2)
    fe = Frontend(cfg, tokenizer=TOK, model_name="tiny")
    await fe.start()
    try:
        async with httpx.AsyncClient(base_url=fe.http_url, timeout=5) as h:
            assert (await h.get("/health")).status_code == 503
            r = await h.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    finally:
        await fe.stop()


# ---- migration: owner changes ------------------------------------------------------------------

def test_request_stream_orders_buffers_and_drops_duplicates():
    from services.frontend.streams import RequestStream

    s = RequestStream("r", "w0", "tcp://x:1")
    s.worker_id = "w1"  # moved (RequestMoved): a late "abort" finish from w0 must not end the stream

    def b(i, ids, fin=None, w="w0"):
        return TokenBatch(request_id="r", first_index=i, token_ids=ids, finish_reason=fin, worker_id=w)

    for batch in [b(2, [12, 13], w="w1"), b(0, [10, 11]), b(0, [10]), b(1, [11, 12]), b(5, [], "stop", "w1"),
                  b(4, [], "abort", "w0"), b(4, [14], w="w1")]:
        s.accept(batch)
    events = [s.queue.get_nowait() for _ in range(s.queue.qsize())]
    assert [t for e in events for t in e.token_ids] == [10, 11, 12, 13, 14]
    assert events[-1].finish_reason == "stop" and s.finished and s.duplicates == 3


def test_request_stream_hands_an_owner_failure_to_on_lost_and_ignores_dead_workers():
    """A final "error"/"abort" batch from the owner goes to on_lost (the router resumes the request
    there); once resumed elsewhere, the old owner's batches are ignored and the stream goes on."""
    from services.frontend.streams import RequestStream

    lost: list[str] = []
    s = RequestStream("r", "w0", "tcp://x:1", prompt_ids=[1, 2], on_lost=lambda st, why: lost.append(why) or True)

    def b(i, ids, fin=None, w="w0", err=None):
        return TokenBatch(request_id="r", first_index=i, token_ids=ids, finish_reason=fin, worker_id=w, error=err)

    s.accept(b(0, [10, 11]))
    s.accept(b(2, [12], "error", err="worker w0 stopped"))
    assert lost == ["worker w0 stopped"] and not s.finished and s.output == [10, 11, 12]
    s.dead.add("w0")
    s.restart_at("w1", "tcp://x:2")
    s.accept(b(3, [99, 98], "length"))  # late, from the dead owner: ignored
    s.accept(b(3, [13], w="w1"))
    s.accept(b(4, [14], "length", w="w1"))
    events = [s.queue.get_nowait() for _ in range(s.queue.qsize())]
    assert [t for e in events for t in e.token_ids] == [10, 11, 12, 13, 14]
    assert events[-1].finish_reason == "length" and s.finished


async def test_abort_goes_to_new_owner_after_move(frontend, cluster):
    from protocol import RequestMoved

    new_owner = ep()
    got: list[str] = []

    async def on_new(rec):
        if isinstance(rec.msg, AbortRequest):
            got.append(rec.msg.request_id)
            return Ack(reply_to=rec.msg.msg_id)
        return None

    sock = MessageSocket.bind(cluster.ctx, zmq.ROUTER, new_owner, WorkerControlInbound)
    task = asyncio.create_task(serve(sock, on_new))
    push = MessageSocket.connect(cluster.ctx, zmq.PUSH, frontend.router.reply_address)
    try:
        async with AsyncClient(frontend.sdk_endpoint, timeout=10) as c:
            async for ch in c.stream("slow", max_tokens=64):  # closed by c.close(): cancels it
                rid = ch.request_id
                await push.send(RequestMoved(request_id=rid, worker_id="worker-1", control_endpoint=new_owner,
                                             next_index=3))
                assert await until(lambda: frontend.router.streams[rid].worker_id == "worker-1", 5.0)
                # the new owner continues the stream where the old one stopped (plus a duplicate)
                await push.send(TokenBatch(request_id=rid, first_index=2, token_ids=ANSWER_IDS[2:5], worker_id="worker-1"))
                break
        assert await until(lambda: got == [rid], 5.0)
        assert rid not in cluster.aborted  # the old owner is not asked
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
        push.close()


async def test_sdk_send_that_cannot_leave_is_a_generate_timeout(frontend, monkeypatch):
    """A send that blocks past the deadline (no frontend connected, or a refused Curve handshake
    that dropped the pipe) is the caller's GenerateTimeout, not the socket layer's error."""
    from protocol.errors import RequestTimeout
    from sdk import GenerateTimeout

    async with AsyncClient(frontend.sdk_endpoint) as c:
        sock = c._ensure()
        real_send = sock.send

        async def blocked(msg, **kw):
            if type(msg).__name__ == "GenerateRequest":
                raise RequestTimeout("sdk-client: could not send GenerateRequest within 0.5 s")
            return await real_send(msg, **kw)

        monkeypatch.setattr(sock, "send", blocked)
        with pytest.raises(GenerateTimeout):
            await c.generate("hi", max_tokens=4, timeout=0.5)
        monkeypatch.setattr(sock, "send", real_send)
        assert (await c.generate("hi", max_tokens=64)).text == ANSWER
