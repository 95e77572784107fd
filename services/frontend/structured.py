"""Structured output fields of a request → one engine Grammar (or a 400 naming the field).

OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` (llguidance's Lark) and `structured_outputs` ({json, regex,
choice, grammar, json_object}). At most one of them per request. The grammar is checked here
(llguidance, no tokenizer needed), so a bad schema or regex is the caller's 400, not a failed
request on a worker.
"""

from __future__ import annotations

import json
from typing import Any

from engine.errors import InvalidRequestError
from engine.grammar import check_grammar
from protocol.payloads import MAX_GRAMMAR_BYTES, Grammar
from services.frontend.params import bad

GRAMMAR_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                  "structured_outputs")


def choice_grammar(choices: list[str]) -> Grammar:
    """Exactly one of `choices` (Lark alternatives of string literals)."""
    return Grammar(kind="lark", spec="start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def _schema(v: Any, param: str) -> Grammar:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise bad(f"'{param}' is not valid JSON", param) from None
    if not isinstance(v, (dict, bool)):
        raise bad(f"'{param}' must be a JSON schema (an object)", param, "invalid_type")
    return Grammar(kind="json_schema", spec=json.dumps(v))


def _choices(v: Any, param: str) -> Grammar:
    if not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v):
        raise bad(f"'{param}' must be a non-empty list of non-empty strings", param, "invalid_type")
    return choice_grammar(v)


def _text(v: Any, param: str, kind: str) -> Grammar:
    if not isinstance(v, str) or not v:
        raise bad(f"'{param}' must be a non-empty string", param, "invalid_type")
    return Grammar(kind=kind, spec=v)  # type: ignore[arg-type]


def _response_format(v: Any) -> Grammar | None:
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise bad("'response_format' must be an object with a 'type'", "response_format", "invalid_type")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar(kind="json_schema", spec='{"type": "object"}')
    if kind == "json_schema":
        js = v.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise bad("'response_format.json_schema' needs a 'schema'", "response_format")
        return _schema(js["schema"], "response_format")
    raise bad(f"'response_format' type {kind[:64]!r} is not one of text, json_object, json_schema",
              "response_format")


def _structured_outputs(v: Any) -> Grammar | None:
    if not isinstance(v, dict):
        raise bad("'structured_outputs' must be an object", "structured_outputs", "invalid_type")
    asked = {k: x for k, x in v.items() if x not in (None, False)}
    kinds = [k for k in ("json", "regex", "choice", "grammar", "json_object") if k in asked]
    others = [k for k in asked if k not in ("json", "regex", "choice", "grammar", "json_object")]
    if others:
        raise bad(f"'structured_outputs.{others[0][:64]}' is not supported by this server", "structured_outputs",
                  "unsupported_parameter")
    if len(kinds) > 1:
        raise bad("'structured_outputs' takes one of json, regex, choice, grammar, json_object", "structured_outputs")
    if not kinds:
        return None
    k, x = kinds[0], asked[kinds[0]]
    if k == "json":
        return _schema(x, "structured_outputs")
    if k == "json_object":
        return Grammar(kind="json_schema", spec='{"type": "object"}')
    if k == "choice":
        return _choices(x, "structured_outputs")
    return _text(x, "structured_outputs", "regex" if k == "regex" else "lark")


def grammar_of(body: dict) -> Grammar | None:
    """The request's grammar (None: unconstrained); raises ApiError for a bad or doubled one."""
    found: list[tuple[str, Grammar]] = []
    for name in GRAMMAR_FIELDS:
        v = body.get(name)
        if v is None:
            continue
        if name == "response_format":
            g = _response_format(v)
        elif name == "guided_json":
            g = _schema(v, name)
        elif name == "guided_regex":
            g = _text(v, name, "regex")
        elif name == "guided_choice":
            g = _choices(v, name)
        elif name == "guided_grammar":
            g = _text(v, name, "lark")
        else:
            g = _structured_outputs(v)
        if g is not None:
            found.append((name, g))
    if len(found) > 1:
        raise bad(f"'{found[0][0]}' and '{found[1][0]}' both constrain the answer; send one", found[1][0])
    if not found:
        return None
    name, g = found[0]
    check(g, name)
    return g


def check(g: Grammar, param: str) -> None:
    """400 naming `param` if `g` does not compile (or is too large)."""
    try:
        size = len(g.spec.encode("utf-8"))
    except UnicodeEncodeError:  # JSON can carry lone surrogates (\ud800) that no grammar takes
        raise bad(f"'{param}' is not valid Unicode (a lone surrogate)", param) from None
    if size > MAX_GRAMMAR_BYTES:
        raise bad(f"'{param}' is larger than {MAX_GRAMMAR_BYTES} bytes", param)
    try:
        check_grammar(g)
    except InvalidRequestError as exc:
        raise bad(f"'{param}': {exc}", param) from None
