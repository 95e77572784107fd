"""Tool calling, Hermes-style: tools into the prompt, `<tool_call>{json}</tool_call>` out of the answer.

A model whose chat template has a tools section gets the tools and earlier calls through it
(`tools` in the template's context, `tool_calls` on its messages; the answer is still parsed for
`<tool_call>` blocks, the convention of such templates). Otherwise (SmolLM2's GGUF template has none) the tool schemas go into the
system message in the Hermes convention, and the model answers a call as
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, parsed back into OpenAI's
`message.tool_calls` (streamed as `delta.tool_calls`, each call whole in one chunk) with
finish_reason "tool_calls". `tool_choice` "required" or a named function is enforced by a
grammar (the call's JSON schema embedded in Lark with %json); "none" leaves the tools out.
Earlier turns' `tool_calls` and `tool` messages are written back in the same convention.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from protocol.payloads import Grammar
from services.frontend.params import bad

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
MAX_TOOLS = 128

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>"
)


@dataclass
class ToolSet:
    """A request's tools and tool_choice ("auto", "required", or a function's name)."""

    functions: list[dict[str, Any]]  # OpenAI's function objects: name, description, parameters
    choice: str = "auto"

    @property
    def names(self) -> set[str]:
        return {f["name"] for f in self.functions}

    def system_prompt(self) -> str:
        return HERMES_SYSTEM.format(tools="\n".join(json.dumps({"type": "function", "function": f})
                                                    for f in self.functions))

    def grammar(self) -> Grammar | None:
        """A grammar for "required" / a named function: exactly one call, its arguments per its schema."""
        if self.choice == "auto":
            return None
        fns = [f for f in self.functions if self.choice == "required" or f["name"] == self.choice]
        schemas = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                     "arguments": f.get("parameters") or {"type": "object"}},
                    "required": ["name", "arguments"], "additionalProperties": False} for f in fns]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        return Grammar(kind="lark", spec=f'start: "{OPEN}\\n" call "\\n{CLOSE}"\ncall: %json {json.dumps(schema)}')


def tool_set(body: dict) -> ToolSet | None:
    """The request's ToolSet, or None when it has no tools or tool_choice is "none"; 400s for bad ones."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad(f"'tools' must be a list of at most {MAX_TOOLS} tools", "tools", "invalid_type")
    fns = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}",
                                                                                         f["name"]):
            raise bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}} "
                      "with a name of letters, digits, _ . - (at most 64)", f"tools[{i}]", "invalid_type")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}]", "invalid_type")
        fn = {"name": f["name"]}
        if isinstance(f.get("description"), str):
            fn["description"] = f["description"]
        fn["parameters"] = params or {"type": "object", "properties": {}}
        fns.append(fn)
    if len({f["name"] for f in fns}) != len(fns):
        raise bad("tool names must be unique", "tools")
    if choice in (None, "auto"):
        return ToolSet(fns)
    if choice == "none":
        return None
    if choice == "required":
        return ToolSet(fns, "required")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise bad("'tool_choice' must be none, auto, required or {'type': 'function', 'function': {'name': ...}}",
                  "tool_choice", "invalid_type")
    if name not in {f["name"] for f in fns}:
        raise bad(f"'tool_choice' names {name[:64]!r}, which is not in 'tools'", "tool_choice")
    return ToolSet(fns, name)


def render_messages(messages: list[dict[str, Any]], tools: ToolSet | None,
                    native: bool = False) -> list[dict[str, Any]]:
    """Chat messages with tool calls and tool results as text, and the tools' system prompt first.
    `native`: the chat template renders tools and calls itself; the messages keep their tool_calls
    ({"type": "function", "function": {"name", "arguments"}}) and nothing is added."""
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m["content"]
        if native:
            msg: dict[str, Any] = {"role": m["role"], "content": content}
            if m.get("tool_calls"):
                msg["tool_calls"] = [{"type": "function", "function": c} for c in m["tool_calls"]]
            out.append(msg)
            continue
        if m.get("tool_calls"):
            calls = "\n".join(f"{OPEN}\n{json.dumps(c)}\n{CLOSE}" for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        if m["role"] == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": m["role"], "content": content})
    if tools is not None and not native:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": tools.system_prompt() + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": tools.system_prompt()})
    return out


def parse_call(text: str, names: set[str]) -> dict[str, Any] | None:
    """One `<tool_call>` body as an OpenAI tool call (None if it is not a call of a known tool)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def split_calls(text: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """(the content outside the calls, or None if empty; the calls) of a whole answer."""
    calls, kept, last = [], [], 0
    for m in _CALL.finditer(text):
        call = parse_call(m.group(1), names)
        if call is None:
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append(call)
    if not calls:
        return text, []
    kept.append(text[last:])
    content = "".join(kept).strip()
    return content or None, calls


class ToolCallStream:
    """Splits a streamed answer into content deltas and whole tool calls (`feed`, then `finish`)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.buf = ""
        self.in_call = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to send now, complete calls to send now)."""
        self.buf += text
        content, calls = "", []
        while True:
            if not self.in_call:
                at = self.buf.find(OPEN)
                if at < 0:
                    # hold back what could be the start of "<tool_call>"
                    keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                                 if OPEN.startswith(self.buf[-k:])), 0)
                    content += self.buf[:len(self.buf) - keep]
                    self.buf = self.buf[len(self.buf) - keep:]
                    return content, calls
                content += self.buf[:at]
                self.buf = self.buf[at:]
                self.in_call = True
            end = self.buf.find(CLOSE)
            if end < 0:
                return content, calls
            body = self.buf[len(OPEN):end]
            call = parse_call(body.strip(), self.names)
            if call is None:  # not a call after all: it is content
                content += self.buf[:end + len(CLOSE)]
            else:
                call["index"] = self.calls
                self.calls += 1
                calls.append(call)
            self.buf = self.buf[end + len(CLOSE):]
            self.in_call = False

    def finish(self) -> str:
        """What is left (an unclosed call is content)."""
        rest, self.buf = self.buf, ""
        return rest
