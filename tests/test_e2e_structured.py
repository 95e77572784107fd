"""Structured output and tool calls end to end: SmolLM2 on 2 torch workers behind the frontend, the
official openai client asking for `json_schema` answers, guided choices and tool calls (auto,
required, named; whole and streamed), and the same again with `kvferry ctl migrate` moving the
stream to the other worker halfway: the grammar's state is rebuilt there by replaying the output,
so the answer is identical."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from tests.test_e2e_cluster import wait_idle
from tests.test_e2e_failures import start_cluster
from tests.test_e2e_migration import ctl_migrate, locate_soon

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "smollm2"
WORKERS = ("worker-0", "worker-1")
def people(n: int) -> dict:
    """A JSON schema: exactly `n` people with a name and an age."""
    return {"type": "object", "properties": {
        "people": {"type": "array", "minItems": n, "maxItems": n, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                             "age": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["name", "age"], "additionalProperties": False}}},
        "required": ["people"], "additionalProperties": False}


PEOPLE = people(12)  # long enough for a migration in the middle of the stream
FEW_PEOPLE = people(4)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def smol2():
    c = start_cluster(2, {"engine": "torch", "model": MODEL, "dtype": "float32", "num_blocks": 512,
                          "max_num_seqs": 8}, frontend={"model": MODEL})
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def client(smol2):
    cl = openai.AsyncOpenAI(base_url=f"{smol2.http_url}/v1", api_key="x", timeout=300, max_retries=0)
    yield cl
    await cl.close()


async def test_json_schema_answers_validate_whole_and_streamed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "people", "schema": FEW_PEOPLE, "strict": True}}
    msgs = [{"role": "user", "content": "List four people with their ages as JSON."}]

    async def streamed() -> str:
        parts = []
        async for ch in await client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt,
                                                             max_tokens=200, temperature=0, stream=True):
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
        return "".join(parts)

    # all at once: one batch on the workers, not four runs one after the other
    out, text_streamed, obj, choice = await asyncio.gather(
        client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, max_tokens=200,
                                       temperature=0),
        streamed(),
        client.completions.create(model=MODEL, prompt="A JSON object describing a cat:", max_tokens=120,
                                  extra_body={"response_format": {"type": "json_object"}}, temperature=0),
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick one."}],
                                       extra_body={"guided_choice": ["red", "green", "blue"]}))
    jsonschema.validate(json.loads(out.choices[0].message.content), FEW_PEOPLE)
    assert out.choices[0].finish_reason == "stop"
    assert text_streamed == out.choices[0].message.content
    text = obj.choices[0].text
    if obj.choices[0].finish_reason == "stop":  # (it may run out of tokens inside a long string)
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{")
    assert choice.choices[0].message.content in ("red", "green", "blue")


async def test_tool_calls_come_back_as_tool_calls(client):
    async def streamed() -> tuple[list, str | None]:
        calls, finish = [], None
        async for ch in await client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER],
                                                             tool_choice="required", max_tokens=80, temperature=0,
                                                             stream=True):
            if ch.choices:
                calls += ch.choices[0].delta.tool_calls or []
                finish = ch.choices[0].finish_reason or finish
        return calls, finish

    choices = ("required", {"type": "function", "function": {"name": "get_weather"}})
    *outs, (streamed_calls, finish) = await asyncio.gather(
        *(client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice=choice,
                                         max_tokens=80, temperature=0) for choice in choices),
        streamed())
    for out in outs:
        msg = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1, msg
        call = msg.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert finish == "tool_calls" and len(streamed_calls) == 1 and streamed_calls[0].index == 0
    assert streamed_calls[0].function.arguments == call.function.arguments
    # The answer to the call goes back as a tool message; the model then answers in words.
    follow = ASK_WEATHER + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    out = await client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=40,
                                               temperature=0)
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls


async def test_a_migrated_json_schema_stream_equals_an_unmigrated_one(smol2, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "people", "schema": PEOPLE}}
    msgs = [{"role": "user", "content": "Twelve people and their ages, as JSON, please."}]
    kw = dict(model=MODEL, messages=msgs, response_format=fmt, max_tokens=400, temperature=0.7, seed=11)
    ids: asyncio.Queue = asyncio.Queue()

    async def stream() -> str:
        parts, sent = [], False
        async for ch in await client.chat.completions.create(**kw, stream=True):
            if not sent:
                await ids.put(ch.id)
                sent = True
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
        return "".join(parts)

    # the unmigrated reference runs beside the stream (seeded sampling does not depend on the batch)
    ref_task = asyncio.ensure_future(client.chat.completions.create(**kw))
    task = asyncio.ensure_future(stream())
    try:
        rid = await asyncio.wait_for(ids.get(), 60)
        worker_rid, src = await locate_soon(smol2, rid)
        await ctl_migrate(smol2, worker_rid, next(w for w in WORKERS if w != src))
        text = await asyncio.wait_for(task, 300)
        ref = (await asyncio.wait_for(ref_task, 300)).choices[0].message.content
    finally:
        for t in (task, ref_task):
            t.cancel()
        await asyncio.gather(task, ref_task, return_exceptions=True)
    assert text == ref
    jsonschema.validate(json.loads(text), PEOPLE)
    wait_idle(smol2)


async def test_a_bad_schema_is_a_400_and_the_cluster_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, extra_body={"guided_regex": "[a-"})
    assert err.value.body["param"] == "guided_regex"
    out = await client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=4)
    assert out.choices[0].message.content


async def test_responses_api_with_a_json_schema_format(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
              "required": ["city"], "additionalProperties": False}
    r = await client.responses.create(model=MODEL, input="Name the capital of France as JSON.",
                                      instructions="Answer in JSON.", max_output_tokens=60, temperature=0,
                                      text={"format": {"type": "json_schema", "name": "capital", "schema": schema,
                                                       "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
