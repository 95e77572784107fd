"""LangChain's ChatOpenAI and litellm against a kvferry frontend: invoke and stream, greedy; tool
calls and structured output.

Run by tests/test_e2e_clients.py with the clients venv's python (`make test-clients` installs
both there, see the Makefile): `python chat_libraries.py BASE_URL MODEL [LIBRARY...]` (default:
all). Prints one JSON object, one entry per library run:
- "langchain", "litellm": the invoked text, the streamed text, the number of streamed chunks, the
  finish reason and the usage;
- "langchain-tools": `bind_tools` with a forced call ("any", which langchain-openai sends as
  "required", and the tool's name): the invoked AIMessage's tool_calls, the streamed chunks' sum's
  tool_calls, and `with_structured_output(..., method="json_schema")` with a Pydantic model and a
  JSON schema (the parsed objects);
- "litellm-tools": `completion` with `tools` and a named `tool_choice`: the tool calls as returned.
An exception is reported as {"error": "...", "traceback": "..."} for that entry (the test asserts).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

# litellm fetches its model price map from GitHub at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12


def run_langchain(base_url: str, model: str) -> dict:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=f"{base_url}/v1", api_key="x", temperature=0, max_tokens=MAX_TOKENS,
                     timeout=120, max_retries=0)
    msg = llm.invoke([("user", MESSAGES[0]["content"])])
    chunks = list(llm.stream([("user", MESSAGES[0]["content"])]))
    usage = getattr(msg, "usage_metadata", None) or {}
    return {"invoke": msg.content, "stream": "".join(c.content for c in chunks), "chunks": len(chunks),
            "usage": dict(usage), "finish_reason": msg.response_metadata.get("finish_reason")}


def run_litellm(base_url: str, model: str) -> dict:
    import litellm

    kw = {"model": f"openai/{model}", "api_base": f"{base_url}/v1", "api_key": "x", "messages": MESSAGES,
          "temperature": 0, "max_tokens": MAX_TOKENS, "timeout": 120, "num_retries": 0}
    resp = litellm.completion(**kw)
    text = resp.choices[0].message.content
    parts, n = [], 0
    for chunk in litellm.completion(stream=True, **kw):
        n += 1
        if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    usage = resp.usage.model_dump() if getattr(resp, "usage", None) else {}
    return {"invoke": text, "stream": "".join(parts), "chunks": n, "usage": usage,
            "finish_reason": resp.choices[0].finish_reason}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ASK_WEATHER = "What is the weather like in Paris today?"
CAPITAL_SCHEMA = {"title": "capital", "description": "A country's capital city", "type": "object",
                  "properties": {"city": {"type": "string", "maxLength": 30},
                                 "country": {"type": "string", "maxLength": 30}},
                  "required": ["city", "country"], "additionalProperties": False}
TOOL_TOKENS = 80


def _calls(msg) -> list[dict]:
    return [{"name": c["name"], "args": c["args"], "id": c.get("id"), "type": c.get("type")} for c in msg.tool_calls]


def run_langchain_tools(base_url: str, model: str) -> dict:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Capital(BaseModel):
        """A country's capital city."""

        city: str = Field(max_length=30)
        country: str = Field(max_length=30)

    llm = ChatOpenAI(model=model, base_url=f"{base_url}/v1", api_key="x", temperature=0, max_tokens=TOOL_TOKENS,
                     timeout=120, max_retries=0)
    out: dict = {}
    for choice in ("any", "get_weather"):
        bound = llm.bind_tools([WEATHER], tool_choice=choice)
        msg = bound.invoke([("user", ASK_WEATHER)])
        chunks = list(bound.stream([("user", ASK_WEATHER)]))
        total = chunks[0]
        for c in chunks[1:]:
            total = total + c
        out[choice] = {"invoke": _calls(msg), "finish_reason": msg.response_metadata.get("finish_reason"),
                       "content": msg.content, "stream": _calls(total), "chunks": len(chunks),
                       "stream_finish_reason": total.response_metadata.get("finish_reason")}
    ask = [("user", "What is the capital of France? Answer in JSON.")]
    obj = llm.with_structured_output(Capital, method="json_schema").invoke(ask)
    out["pydantic"] = {"type": type(obj).__name__, "value": obj.model_dump()}
    obj = llm.with_structured_output(CAPITAL_SCHEMA, method="json_schema").invoke(ask)
    out["json_schema"] = {"type": type(obj).__name__, "value": obj}
    return out


def run_litellm_tools(base_url: str, model: str) -> dict:
    import litellm

    resp = litellm.completion(model=f"openai/{model}", api_base=f"{base_url}/v1", api_key="x",
                              messages=[{"role": "user", "content": ASK_WEATHER}], tools=[WEATHER],
                              tool_choice={"type": "function", "function": {"name": "get_weather"}},
                              temperature=0, max_tokens=TOOL_TOKENS, timeout=120, num_retries=0)
    msg = resp.choices[0].message
    return {"tool_calls": [{"id": c.id, "type": c.type, "name": c.function.name, "arguments": c.function.arguments}
                           for c in msg.tool_calls or []],
            "content": msg.content, "finish_reason": resp.choices[0].finish_reason}


def main() -> None:
    base_url, model, *libraries = sys.argv[1:]
    out = {}
    for name, fn in (("langchain", run_langchain), ("litellm", run_litellm), ("langchain-tools", run_langchain_tools),
                     ("litellm-tools", run_litellm_tools)):
        if libraries and name not in libraries:
            continue
        try:
            out[name] = fn(base_url, model)
        except Exception as exc:  # noqa: BLE001 - reported, the test asserts
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
