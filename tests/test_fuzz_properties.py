"""Property tests of every decoder a peer can reach (design §6): each registered message type's
decoder, the OpenAI HTTP request models (parser and the whole app), and the SDK request checks.

Whatever arrives gives a valid message / ParsedRequest, or a typed ProtocolError / an OpenAI 4xx
error body: never another exception. Bounded for a 2-core machine (KVFERRY_FUZZ_TYPE_EXAMPLES
examples per type and property; KVFERRY_FUZZ_HTTP_EXAMPLES per HTTP property).
"""

from __future__ import annotations

import json
import os
import types
from typing import Any

import msgpack
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from protocol import PROTOCOL_VERSION, AddRequest, Message, ProtocolError, decode, encode, validate
from protocol.client import GenerateRequest
from protocol.examples import example_messages
from services.config import FrontendConfig
from services.frontend.generation import Delta, Usage
from services.frontend.http_api import ApiContext, create_app
from services.frontend.metrics import FrontendMetrics
from services.frontend.params import ApiError, ParsedRequest, RequestParser
from services.frontend.sdk_server import SdkServer
from tests.test_protocol_fuzz import mutations
from tests.test_frontend_http import TOK

PER_TYPE = settings(max_examples=int(os.environ.get("KVFERRY_FUZZ_TYPE_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
HTTP = settings(max_examples=int(os.environ.get("KVFERRY_FUZZ_HTTP_EXAMPLES", "250")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

EXAMPLES: dict[str, Message] = {type(m).__name__: m for m in example_messages()}
TAGS = sorted(protocol.MESSAGE_TYPES)
CODES = {"malformed", "unknown_type", "version_mismatch", "too_large", "invalid"}


def body_of(msg: Message) -> dict:
    return msgpack.unpackb(encode(msg), raw=False)[2]


def check(data: bytes, cls: type) -> Message | None:
    """The property for one envelope decoded by a socket that accepts only `cls`."""
    try:
        msg = decode(data, cls, max_bytes=1 << 20)
    except ProtocolError as exc:
        assert exc.code in CODES and exc.message, exc
        return None
    assert type(msg) is cls
    validate(msg)  # what one decoder accepted, every decoder accepts
    again = encode(msg)
    assert encode(decode(again, cls)) == again
    return msg


def test_every_type_is_covered():
    assert set(EXAMPLES) == set(TAGS) and len(TAGS) >= 35


# ---- every message type --------------------------------------------------------------------------

@pytest.mark.parametrize("tag", TAGS)
@PER_TYPE
@given(junk=st.binary(max_size=200), header=st.booleans())
def test_arbitrary_bytes(tag, junk, header):
    """Random bytes, alone or after a valid `[version, tag,` header (so the type's own body decoder runs)."""
    prefix = b"\x93" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb(tag) if header else b""
    check(prefix + junk, protocol.MESSAGE_TYPES[tag])


@pytest.mark.parametrize("tag", TAGS)
@PER_TYPE
@given(data=st.data())
def test_mutated_valid_encoding(tag, data):
    check(data.draw(mutations(encode(EXAMPLES[tag]))), protocol.MESSAGE_TYPES[tag])


SURROGATE_FREE_TEXT = st.text(max_size=12)
HOSTILE_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | SURROGATE_FREE_TEXT
    | st.binary(max_size=12) | st.sampled_from(["", "x" * 5000, "worker-0", "tcp://127.0.0.1:1", "float32"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(SURROGATE_FREE_TEXT, children, max_size=4),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every position inside a decoded msgpack body (map keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += paths(v, prefix + (i,))
    return out


def replaced(body: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    body = dict(body) if isinstance(body, dict) else list(body)
    body[path[0]] = replaced(body[path[0]], path[1:], value) if len(path) > 1 else value
    return body


@pytest.mark.parametrize("tag", TAGS)
@PER_TYPE
@given(data=st.data())
def test_hostile_field_values(tag, data):
    """A valid body with one field (at any depth, or one left out by default) set to any value."""
    cls = protocol.MESSAGE_TYPES[tag]
    body = body_of(EXAMPLES[tag])
    for name in cls.__struct_fields__:
        body.setdefault(name, None)  # fields at their default are not on the wire: hit them too
    candidates = paths(body)
    body = {k: v for k, v in body.items() if v is not None or k in body_of(EXAMPLES[tag])}
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(candidates))
        if not _settable(body, path):
            continue  # an earlier replacement changed what lies on this path
        body = replaced(body, path, data.draw(HOSTILE_VALUES))
    check(msgpack.packb([PROTOCOL_VERSION, tag, body], use_bin_type=True), cls)


def _settable(body: Any, path: tuple) -> bool:
    for k in path[:-1]:
        if isinstance(body, dict) and k in body:
            body = body[k]
        elif isinstance(body, list) and isinstance(k, int) and k < len(body):
            body = body[k]
        else:
            return False
    last = path[-1]
    return isinstance(body, dict) or (isinstance(body, list) and isinstance(last, int) and last < len(body))


WRONG = [None, True, -1, (1 << 64) - 1, -(1 << 63), 1.5, float("nan"), float("inf"), "", "x" * 5000, "\x00",
         b"\x00\xff", [], [None], [[1]], {}, {"a": 1}, [1] * 2000]


@pytest.mark.parametrize("tag", TAGS)
def test_every_field_checks_its_type(tag):
    """Deterministic: each field of each type, set to each of WRONG, decodes to a message or a
    ValidationError; and every field refuses at least one of them (no field is unchecked)."""
    cls = protocol.MESSAGE_TYPES[tag]
    base = body_of(EXAMPLES[tag])
    for name in cls.__struct_fields__:
        refused = 0
        for value in WRONG:
            if check(msgpack.packb([PROTOCOL_VERSION, tag, {**base, name: value}], use_bin_type=True), cls) is None:
                refused += 1
        assert refused, f"{tag}.{name} accepts every value of every type"


# ---- the HTTP request models ---------------------------------------------------------------------

CFG = FrontendConfig(max_prompt_tokens=512, max_tokens_limit=256, max_body_bytes=64 << 10)
PARSER = RequestParser(CFG, TOK, "tiny", ("tiny-alias",), max_context=1024)
TEXT = st.text(max_size=40) | st.sampled_from(["\ud800", "a\udfffb", "<|im_end|>", "\x00", "é日本😀"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=20,
)
EDGE_VALUES = [float("nan"), float("inf"), float("-inf"), -0.0, 0, 1, -1, 2, 2.0000001, 1e308, 1 << 31, (1 << 31) - 1,
               -(1 << 31), -(1 << 31) - 1, 1 << 63, (1 << 63) - 1, 1 << 64, 255, 256, 257, 258, 259, 1024, 1025, "",
               "\ud800", [], [0], [-1], [259], [True], [1.0], [""], {}, True, False, None, {"include_usage": "yes"},
               [{"role": "user"}], [{"role": "user", "content": None}]]
EDGES = st.sampled_from(EDGE_VALUES)
KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
        "priority", "ignore_eos", "stop", "stream", "stream_options", "n", "best_of", "logprobs", "top_logprobs",
        "echo", "suffix", "presence_penalty", "frequency_penalty", "user", "tools", "tool_choice", "response_format",
        "logit_bias", "min_p", "min_tokens", "repetition_penalty", "stop_token_ids", "add_generation_prompt",
        "include_stop_str_in_output", "prompt_logprobs", "guided_json", "guided_regex", "guided_choice",
        "structured_outputs"]
VALID_COMPLETION = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.5,
                    "top_p": 0.9, "seed": 1, "stop": ["\n"], "stream": True,
                    "stream_options": {"include_usage": True}}
VALID_CHAT = {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
              "max_completion_tokens": 8, "priority": -1, "ignore_eos": True}


@st.composite
def bodies(draw, valid: dict) -> Any:
    kind = draw(st.sampled_from(["any", "known_keys", "mutated", "mutated", "deep_message", "edge"]))
    if kind == "any":
        return draw(JSON)
    if kind == "edge":  # one known key at an edge value: the ranges' own borders, NaN, huge
        return {**valid, draw(st.sampled_from(KEYS)): draw(EDGES)}
    if kind == "known_keys":
        return draw(st.dictionaries(st.sampled_from(KEYS), JSON, max_size=8))
    body = dict(valid)
    if kind == "deep_message":
        msgs = [dict(m) for m in VALID_CHAT["messages"]]
        i = draw(st.integers(0, len(msgs) - 1))
        msgs[i][draw(st.sampled_from(["role", "content", "name", "type"]))] = draw(JSON)
        body["messages"] = msgs
        return body
    for key in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4)):
        if draw(st.booleans()):
            body[key] = draw(JSON)
        else:
            body.pop(key, None)
    return body


def check_parse(body: Any, chat: bool) -> None:
    try:
        parsed = PARSER.chat(body) if chat else PARSER.completion(body)
    except ApiError as exc:
        assert 400 <= exc.status < 500, exc.status
        json.dumps(exc.body(), ensure_ascii=False).encode("utf-8")  # what the error response sends
        return
    assert isinstance(parsed, ParsedRequest)
    assert 1 <= len(parsed.prompt_ids) <= CFG.max_prompt_tokens
    assert parsed.sampling.max_tokens <= CFG.max_tokens_limit
    assert len(parsed.prompt_ids) + parsed.sampling.max_tokens <= 1024
    # Whatever the API accepts, a worker's decoder accepts: no request dies later on the wire.
    validate(AddRequest(request_id="cmpl-x", prompt_token_ids=parsed.prompt_ids, sampling=parsed.sampling,
                        priority=parsed.priority, frontend_id="fe", reply_address="tcp://127.0.0.1:1"))
    # ... and the engine: its own checks of the sampling fields pass (no request fails on the worker)
    from engine.request import SamplingParams as EngineSampling

    for _, sp in parsed.choices():
        EngineSampling.from_dict(sp.to_dict()).validate()
        assert all(0 <= t < TOK.vocab_size for t in sp.logit_bias)
    for s in parsed.stop:
        s.encode("utf-8")


@pytest.mark.parametrize("chat", [False, True])
def test_every_field_at_every_edge(chat):
    """Deterministic: every known key of a valid body set to every edge value (NaN and the
    infinities, range borders, wrong types)."""
    for key in KEYS:
        for value in EDGE_VALUES:
            check_parse({**(VALID_CHAT if chat else VALID_COMPLETION), key: value}, chat)


@HTTP
@given(bodies(VALID_COMPLETION))
def test_completion_bodies(body):
    check_parse(body, chat=False)


@HTTP
@given(bodies(VALID_CHAT))
def test_chat_bodies(body):
    check_parse(body, chat=True)


@pytest.mark.parametrize("body", [{"prompt": "x", "temperature": float("nan")}, {"prompt": "x", "top_p": float("nan")},
                                  {"prompt": "\ud800"}, {"messages": [{"role": "user", "content": "a\udfffb"}]},
                                  {"messages": [{"role": "\ud800", "content": "x"}]}, {"prompt": "x", "stop": "\ud800"},
                                  {"model": "\ud800", "prompt": "x"}])
def test_regressions_are_a_400(body):
    """JSON may carry NaN (every range check passed it; the worker then refused the request) and lone
    surrogates (the tokenizer raised TypeError on them: an HTTP 500)."""
    with pytest.raises(ApiError) as err:
        (PARSER.chat if "messages" in body else PARSER.completion)(body)
    assert err.value.status == 400


# ---- the whole HTTP app --------------------------------------------------------------------------

class _Generator:
    """Answers every valid request at once (no cluster): the app's own code paths run in full."""

    active = 0
    reserved_bytes = 0
    router = None

    async def run(self, params):  # noqa: ANN001, ANN201
        yield Delta("ok", [1], 0, "length", Usage(len(params.prompt_ids), 1))


def _app(api_key: str = "") -> TestClient:
    cfg = FrontendConfig(max_prompt_tokens=512, max_tokens_limit=256, max_body_bytes=16 << 10, api_key=api_key)
    parser = RequestParser(cfg, TOK, "tiny", (), max_context=1024)
    router = types.SimpleNamespace(healthy=True, known={}, scheduler_ok=True, abort=lambda *a: None, streams={})
    gen = _Generator()
    gen.router = router
    ctx = ApiContext(cfg, "tiny", parser, gen, router, FrontendMetrics())  # type: ignore[arg-type]
    return TestClient(create_app(ctx), raise_server_exceptions=True)


CLIENT = _app()
CLIENT_WITH_KEY = _app(api_key="sekret")
ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health"),
          ("GET", "/metrics"), ("GET", "/v1/completions"), ("PUT", "/v1/chat/completions"), ("POST", "/v1/models"),
          ("DELETE", "/health"), ("POST", "/v1/../v1/completions"), ("GET", "/nope")]


@st.composite
def raw_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "deep", "big"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(bodies(draw(st.sampled_from([VALID_COMPLETION, VALID_CHAT]))))).encode()
    if kind == "mutated":
        return draw(mutations(json.dumps(draw(st.sampled_from([VALID_COMPLETION, VALID_CHAT]))).encode()))
    if kind == "deep":
        return b"[" * draw(st.integers(1, 15_000)) + b"1" + b"]" * draw(st.integers(0, 3))
    return b'{"prompt": "' + b"x" * draw(st.integers(16_000, 40_000)) + b'"}'


HEADERS = st.dictionaries(st.sampled_from(["content-type", "authorization", "content-encoding", "x-junk"]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30), max_size=3)


@HTTP
@given(route=st.sampled_from(ROUTES), body=raw_bodies(), headers=HEADERS, with_key=st.booleans())
def test_http_app_answers_every_body_without_a_5xx(route, body, headers, with_key):
    """Every route, any body and headers: a 2xx, or a 4xx with an OpenAI error body. An unhandled
    exception would propagate out of the TestClient and fail the test."""
    client = CLIENT_WITH_KEY if with_key else CLIENT
    method, path = route
    r = client.request(method, path, content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if with_key and path.startswith("/v1/") and r.status_code < 400:
        assert headers.get("authorization") == "Bearer sekret"


def test_deeply_nested_json_is_a_400():
    r = CLIENT.post("/v1/completions", content=b"[" * 10_000)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


# ---- the SDK request checks ----------------------------------------------------------------------

SDK = types.SimpleNamespace(cfg=CFG, parser=PARSER)


@HTTP
@given(data=st.data())
def test_sdk_requests(data):
    """A hostile GenerateRequest that decodes is then refused with an ApiError (→ ErrorReply) or
    accepted within the limits: SdkServer._params never raises anything else."""
    base = body_of(EXAMPLES["GenerateRequest"])
    body = dict(base)
    for key in data.draw(st.lists(st.sampled_from(["prompt", "prompt_token_ids", "messages", "sampling", "stop",
                                                   "priority", "api_key", "stream"]), max_size=3)):
        body[key] = data.draw(HOSTILE_VALUES | st.lists(st.integers(0, 300), max_size=600)
                              | st.just([{"role": "user", "content": "hi"}, {"role": "x" * 300, "content": ""}]))
    if data.draw(st.booleans()):  # a prompt instead of messages
        body.pop("messages", None)
        body["prompt"] = data.draw(st.text(max_size=700))
    msg = check(msgpack.packb([PROTOCOL_VERSION, "GenerateRequest", body], use_bin_type=True), GenerateRequest)
    if msg is None:
        return
    try:
        params, n = SdkServer._params(SDK, msg)  # type: ignore[arg-type]
    except ApiError as exc:
        assert 400 <= exc.status < 500
        return
    assert 1 <= n <= CFG.max_prompt_tokens and params.sampling.max_tokens <= CFG.max_tokens_limit
