"""OpenAI's Responses API, its text subset: a request becomes a chat request, the answer a Response.

`input` (a string, or a list of messages whose content is a string or input_text parts),
`instructions` (the system message), `max_output_tokens`, `temperature`, `top_p`, `stream`,
`text.format` (text, json_object, json_schema: structured output) and the sampling extensions the
chat endpoint takes. Fields of the API this server does not do (built-in and function tools,
reasoning, stored conversations via `previous_response_id` / `conversation`, background mode) are
refused with a 400 naming them. Streaming sends the Responses event sequence: response.created,
response.in_progress, output_item.added, content_part.added, output_text.delta..., the matching
.done events and response.completed (or response.incomplete when max_output_tokens cut it).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from services.frontend.generation import Usage
from services.frontend.params import ApiError, bad

# field -> whether a value asks for nothing
REFUSED: dict[str, Any] = {
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "previous_response_id": lambda v: v is None,
    "conversation": lambda v: v is None,
    "reasoning": lambda v: v in (None, {}),
    "background": lambda v: v in (None, False),
    "include": lambda v: v in (None, []),
    "prompt": lambda v: v is None,
    "max_tool_calls": lambda v: v is None,
    "top_logprobs": lambda v: v in (None, 0),
}
PARAM_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
               "response_format": "text"}


def _content(c: Any, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text") \
                    or not isinstance(p.get("text"), str):
                raise bad(f"{where}: only input_text parts are supported", "input")
            parts.append(p["text"])
        return "".join(parts)
    raise bad(f"{where}: content must be a string or a list of input_text parts", "input", "invalid_type")


def to_chat_body(body: Any) -> dict[str, Any]:
    """The chat completions body that asks for what the Responses body asks for."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_type")
    for name, asks_nothing in REFUSED.items():
        if name in body and not asks_nothing(body[name]):
            raise bad(f"'{name}' is not supported by this server's /v1/responses (text only)", name,
                      "unsupported_parameter")
    inp = body.get("input")
    if inp is None:
        raise bad("'input' is required", "input", "missing_required_parameter")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad("'instructions' must be a string", "instructions", "invalid_type")
        messages.append({"role": "system", "content": instructions})
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    elif isinstance(inp, list) and inp:
        for i, item in enumerate(inp):
            if not isinstance(item, dict) or item.get("type", "message") != "message" \
                    or item.get("role") not in ("user", "assistant", "system", "developer"):
                raise bad(f"input[{i}] must be a message with role user, assistant, system or developer", "input",
                          "invalid_type")
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _content(item.get("content"), f"input[{i}]")})
    else:
        raise bad("'input' must be a string or a non-empty list of messages", "input", "invalid_type")
    chat: dict[str, Any] = {k: v for k, v in body.items() if k not in (
        "input", "instructions", "max_output_tokens", "text", "store", "metadata", "truncation", "user",
        "parallel_tool_calls", "service_tier", "stream_options", *REFUSED)}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if body.get("text") is not None and not isinstance(body.get("text"), dict):
        raise bad("'text' must be an object", "text", "invalid_type")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise bad("'text.format' must be an object", "text", "invalid_type")
        if fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "schema"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
        elif fmt.get("type") in ("json_object", "text"):
            chat["response_format"] = {"type": fmt["type"]}
        else:
            raise bad("'text.format.type' must be text, json_object or json_schema", "text")
    return chat


def renamed(err: ApiError) -> ApiError:
    """A chat parser's error, with the Responses API's names for the fields."""
    if err.param in PARAM_NAMES:
        err.message = err.message.replace(f"'{err.param}'", f"'{PARAM_NAMES[err.param]}'")
        err.param = PARAM_NAMES[err.param]
    return err


class ResponseBuilder:
    """The Response object and stream events of one answer."""

    def __init__(self, model: str, body: dict[str, Any]) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.body = body
        self.seq = 0

    def response(self, status: str, text: str | None = None, usage: Usage | None = None,
                 incomplete: str | None = None) -> dict[str, Any]:
        b = self.body
        out: list[dict[str, Any]] = []
        if text is not None:
            out.append(self.item(text, "completed" if status == "completed" else "incomplete"))
        fmt = (b.get("text") or {}).get("format") if isinstance(b.get("text"), dict) else None
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": out, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
            "temperature": b.get("temperature", 1.0), "top_p": b.get("top_p", 1.0), "parallel_tool_calls": False,
            "tool_choice": "none", "tools": [], "text": {"format": fmt or {"type": "text"}},
            "metadata": b.get("metadata") or {}, "store": False, "truncation": "disabled",
            "usage": None if usage is None else {
                "input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens},
        }

    def item(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant",
                "content": [self.part(text)]}

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": []}

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def opening(self) -> list[dict[str, Any]]:
        item = {"type": "message", "id": self.item_id, "status": "in_progress", "role": "assistant", "content": []}
        started = self.response("in_progress")
        return [self.event("response.created", response=started), self.event("response.in_progress", response=started),
                self.event("response.output_item.added", output_index=0, item=item),
                self.event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                           part=self.part(""))]

    def delta(self, text: str) -> dict[str, Any]:
        return self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0,
                          delta=text, logprobs=[])

    def closing(self, text: str, finish: str | None, usage: Usage | None) -> list[dict[str, Any]]:
        status, why = ("incomplete", "max_output_tokens") if finish == "length" else ("completed", None)
        return [self.event("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                           text=text, logprobs=[]),
                self.event("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                           part=self.part(text)),
                self.event("response.output_item.done", output_index=0, item=self.item(text, status)),
                self.event(f"response.{status}", response=self.response(status, text, usage, why))]
