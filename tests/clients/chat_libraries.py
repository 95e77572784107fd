"""LangChain's ChatOpenAI and litellm against a kvferry frontend: invoke and stream, greedy.

Run by tests/test_e2e_clients.py with the clients venv's python (`make test-clients` installs
both there, see the Makefile): `python chat_libraries.py BASE_URL MODEL [LIBRARY...]` (default:
both). Prints one JSON object: {"langchain": {...}, "litellm": {...}}, each with the invoked text,
the streamed text, the number of streamed chunks, the finish reason and the usage; an exception is
reported as {"error": "...", "traceback": "..."} for that library (the test asserts).
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


def main() -> None:
    base_url, model, *libraries = sys.argv[1:]
    out = {}
    for name, fn in (("langchain", run_langchain), ("litellm", run_litellm)):
        if libraries and name not in libraries:
            continue
        try:
            out[name] = fn(base_url, model)
        except Exception as exc:  # noqa: BLE001 - reported, the test asserts
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
