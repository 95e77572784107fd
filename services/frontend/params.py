"""OpenAI request bodies → validated generation parameters, or an `ApiError` (OpenAI error body).

Checks JSON shape, field types and ranges the way OpenAI documents them. A field of OpenAI's or
vLLM's request that asks for something this server does not do is refused with a 400 naming it
(code `unsupported_parameter`), never accepted and ignored: a caller must be able to tell that its
tools, grammar or sampling control did not apply (`UNSUPPORTED`). Fields that ask for nothing
(the default value, `tool_choice: "none"`, `response_format: {"type": "text"}`) and fields without
an effect on the answer (`user`, `metadata`, `store`, `parallel_tool_calls` without tools) are
accepted; other unknown fields are ignored. Extensions: `priority` (int, lower is served first),
`ignore_eos` (bool), `top_k` (int), `cache_salt` (str), and vLLM's `stop_token_ids`,
`repetition_penalty`, `min_p`, `min_tokens`, `include_stop_str_in_output`, `prompt_logprobs`.
"""

from __future__ import annotations

import hmac
import json
import math

import msgspec
from dataclasses import dataclass, field
from typing import Any

from protocol.fields import INT64_MAX, MAX_NAME_LEN, MAX_STOP_TOKENS, MAX_TOKEN_ID
from protocol.payloads import MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams
from services.config import FrontendConfig

MAX_STOP = 16
INT32 = 1 << 31
MAX_CHOICES = 64  # n x prompts of one request: each choice is an engine request of its own


class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_key_matches(given: str | None, expected: str) -> bool:
    """Whether `given` is the configured API key (constant time: no timing hint of how much matched)."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                     expected.encode("utf-8", "surrogatepass"))


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code or "invalid_value")


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


# field -> whether a value asks for nothing (absent, null or the default), and what it would ask for
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "functions": (_empty, "the legacy 'functions' (send 'tools')"),
    "function_call": (lambda v: v in (None, "none"), "the legacy 'function_call' (send 'tool_choice')"),
    "structural_tag": (lambda v: v is None, "structured output (structural_tag)"),
    "bad_words": (_empty, "bad_words"),
    "allowed_token_ids": (lambda v: v is None, "allowed_token_ids"),
    "use_beam_search": (lambda v: v in (None, False), "beam search"),
    "length_penalty": (lambda v: v is None or v == 1, "length_penalty (beam search)"),
    "truncate_prompt_tokens": (lambda v: v is None, "truncate_prompt_tokens"),
    "skip_special_tokens": (lambda v: v in (None, True), "skip_special_tokens=false"),
    "spaces_between_special_tokens": (lambda v: v in (None, True), "spaces_between_special_tokens=false"),
    "return_tokens_as_token_ids": (lambda v: v in (None, False), "return_tokens_as_token_ids"),
    "chat_template": (lambda v: v is None, "a request's own chat_template"),
    "chat_template_kwargs": (_empty, "chat_template_kwargs"),
    "documents": (_empty, "documents"),
    "mm_processor_kwargs": (_empty, "multimodal inputs"),
    "audio": (lambda v: v is None, "audio output"),
    "modalities": (lambda v: v is None or v == ["text"], "modalities other than text"),
    "prediction": (lambda v: v is None, "predicted outputs"),
}


def refuse_unsupported(body: dict) -> None:
    """The 400 for the first field of `body` that asks for something unsupported (UNSUPPORTED)."""
    for name, (asks_nothing, what) in UNSUPPORTED.items():
        if name in body and not asks_nothing(body[name]):
            raise bad(f"'{name}' is not supported by this server ({what})", name, "unsupported_parameter")


@dataclass
class ParsedRequest:
    """What the API layer needs besides the prompt. A completion with a list of prompts has them all
    in `prompts` (`prompt_ids` is the first); each prompt gets `n` choices, indexed prompt by
    prompt (prompt i, sample j: index i * n + j), each its own engine request."""

    prompt_ids: list[int]
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    priority: int = 0
    stream: bool = False
    include_usage: bool = False
    cache_salt: str = ""
    n: int = 1
    prompts: list[list[int]] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives to report per token (None: no logprobs in the answer)
    echo: bool = False  # completions: the prompt (its text, and its logprobs with `logprobs`) first
    prompt_texts: list[str | None] = field(default_factory=list)  # per prompt: the text it came as
    no_output: bool = False  # max_tokens 0 with echo: the prompt only (one token is generated and dropped)
    include_stop_str: bool = False
    best_of: int = 1  # samples per prompt, of which the n most likely are answered
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs extra
    tools: Any = None  # chat: services.frontend.tools.ToolSet (the answer's tool calls are parsed out)
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage so far in every chunk

    @property
    def samples_per_prompt(self) -> int:
        return max(self.n, self.best_of)

    def choices(self) -> list[tuple[list[int], SamplingParams]]:
        """(prompt, sampling) per sample, in index order (samples_per_prompt per prompt). With a
        seed, sample j of a prompt uses seed + j: the samples differ, and a request with the same
        seed repeats them all."""
        out = []
        for ids in self.prompts or [self.prompt_ids]:
            for j in range(self.samples_per_prompt):
                sp = self.sampling
                if j and sp.seed is not None:
                    sp = msgspec.structs.replace(sp, seed=(sp.seed + j) % (INT64_MAX + 1))
                out.append((ids, sp))
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _text(s: str, param: str) -> str:
    """`s` if it is valid Unicode: JSON can carry lone surrogates (\\ud800) that no tokenizer takes."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"'{param}' is not valid Unicode (a lone surrogate)", param, "invalid_value") from None
    return s


def _opt(body: dict, name: str, kind: str, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if kind == "int" and not _is_int(v):
        raise bad(f"'{name}' must be an integer", name, "invalid_type")
    if kind == "num" and not _is_num(v):
        raise bad(f"'{name}' must be a number", name, "invalid_type")
    if kind == "num" and not math.isfinite(v):  # Python's JSON reads NaN/Infinity; NaN passes every range check
        raise bad(f"'{name}' must be a finite number", name)
    if kind == "bool" and not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean", name, "invalid_type")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(f"'{name}' must be {'>' if lo_open else '>='} {lo:g}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"'{name}' must be <= {hi:g}, got {v}", name)
    return v


class RequestParser:
    """Validates completion and chat bodies against the config and the model's tokenizer."""

    def __init__(self, cfg: FrontendConfig, tokenizer, served_model_name: str, model_aliases: tuple[str, ...] = (),
                 max_context: int | None = None) -> None:  # noqa: ANN001
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model_names = {served_model_name, *model_aliases}
        self.max_context = max_context

    # ---- shared ----------------------------------------------------------------------------------

    def check_model(self, body: Any) -> None:
        """A JSON object whose `model`, if given, is served here (404 otherwise, as OpenAI and vLLM)."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object", None, "invalid_type")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("'model' must be a string", "model", "invalid_type")
        if model is not None:
            _text(model, "model")  # echoed in the error below: must encode as UTF-8
        if model is not None and model not in self.model_names:
            raise self.unknown_model(model)

    def unknown_model(self, model: str) -> ApiError:
        return ApiError(404, f"the model '{model[:256]}' does not exist; this server serves "
                             f"'{sorted(self.model_names)[0]}'", "model", "model_not_found")

    # ---- /tokenize and /detokenize (vLLM's shapes) -----------------------------------------------

    def tokenize(self, body: Any) -> dict[str, Any]:
        """vLLM's POST /tokenize: a `prompt` (text or token ids) or chat `messages` → `tokens`,
        `count`, `max_model_len` and, with `return_token_strs`, each token's string."""
        self.check_model(body)
        refuse_unsupported(body)
        add_special = _opt(body, "add_special_tokens", "bool")
        if add_special is False and getattr(self.tokenizer, "add_bos", False):
            raise bad("'add_special_tokens': false is not supported by this server (its tokenizer adds a BOS)",
                      "add_special_tokens", "unsupported_parameter")
        strs = _opt(body, "return_token_strs", "bool") or False
        if "messages" in body and "prompt" in body:
            raise bad("send either 'prompt' or 'messages', not both", "messages")
        ids = self._chat_ids(body) if "messages" in body else self._prompt_ids(body)
        if len(ids) > self.cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than the limit of {self.cfg.max_prompt_tokens}",
                           "messages" if "messages" in body else "prompt", "context_length_exceeded")
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.max_context, "tokens": ids, "token_strs": None}
        if strs:
            out["token_strs"] = [self.token_str(t) for t in ids]
        return out

    def detokenize(self, body: Any) -> dict[str, Any]:
        """vLLM's POST /detokenize: `tokens` → the `prompt` text."""
        self.check_model(body)
        tokens = body.get("tokens")
        if tokens is None:
            raise bad("'tokens' is required", "tokens", "missing_required_parameter")
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            raise bad("'tokens' must be a list of token ids", "tokens", "invalid_type")
        if len(tokens) > self.cfg.max_prompt_tokens:
            raise bad(f"at most {self.cfg.max_prompt_tokens} tokens", "tokens")
        vocab = self.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in tokens):
            raise bad(f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": self.tokenizer.decode(list(tokens))}

    def token_str(self, token_id: int) -> str:
        """A token's own string (the vocabulary's, e.g. 'Ġthe'), or its decoded text."""
        to_token = getattr(self.tokenizer, "id_to_token", None)
        s = to_token(token_id) if to_token is not None else None
        return s if s is not None else self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _common(self, body: Any, prompt_ids_of, chat: bool, tools: Any = None) -> ParsedRequest:  # noqa: ANN001
        self.check_model(body)
        n = _opt(body, "n", "int", 1, MAX_CHOICES)
        n = 1 if n is None else n
        best_of = _opt(body, "best_of", "int", 1, MAX_CHOICES)
        best_of = n if best_of is None else best_of
        if best_of < n:
            raise bad(f"'best_of' ({best_of}) must be >= n ({n})", "best_of")
        if body.get("suffix") not in (None, ""):
            raise bad("'suffix' is not supported by this server (fill-in-the-middle)", "suffix",
                      "unsupported_parameter")
        if chat and body.get("echo") not in (None, False):
            raise bad("'echo' is not supported by this server for chat", "echo", "unsupported_parameter")
        refuse_unsupported(body)
        if chat:
            want = _opt(body, "logprobs", "bool")
            top = _opt(body, "top_logprobs", "int", 0, MAX_LOGPROBS)
            if top is not None and not want:
                raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            logprobs = (top or 0) if want else None
            echo = False
        else:
            logprobs = _opt(body, "logprobs", "int", 0, MAX_LOGPROBS)
            echo = _opt(body, "echo", "bool") or False
        prompt_logprobs = _opt(body, "prompt_logprobs", "int", 0, MAX_LOGPROBS)
        stream = _opt(body, "stream", "bool") or False
        if best_of > n and stream:
            raise bad("'best_of' > n cannot be streamed (the best samples are known only at the end)", "best_of")
        include_usage = continuous_usage = False
        so = body.get("stream_options")
        if so is not None:
            if not isinstance(so, dict):
                raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
            iu = so.get("include_usage")
            if iu is not None and not isinstance(iu, bool):
                raise bad("'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")
            include_usage = bool(iu)
            cu = so.get("continuous_usage_stats")
            if cu is not None and not isinstance(cu, bool):
                raise bad("'stream_options.continuous_usage_stats' must be a boolean", "stream_options",
                          "invalid_type")
            continuous_usage = bool(cu)
        limit = self.cfg.max_tokens_limit
        max_tokens = _opt(body, "max_tokens", "int", 0 if echo else 1, limit)
        no_output = max_tokens == 0  # echo only: the prompt's text (and logprobs), no completion
        max_tokens = 1 if no_output else max_tokens
        if chat:
            mct = _opt(body, "max_completion_tokens", "int", 1, limit)
            max_tokens = mct if mct is not None else max_tokens
        temperature = _opt(body, "temperature", "num", 0, 2)
        top_p = _opt(body, "top_p", "num", 0, 1, lo_open=True)
        top_k = _opt(body, "top_k", "int", -1, MAX_TOKEN_ID)
        seed = _opt(body, "seed", "int", 0, INT64_MAX)
        priority = _opt(body, "priority", "int", -INT32, INT32 - 1) or 0
        cache_salt = body.get("cache_salt")  # vLLM's: the prefix cache is shared only within one salt
        if cache_salt is not None and (not isinstance(cache_salt, str) or not 0 < len(cache_salt) <= MAX_NAME_LEN):
            raise bad(f"'cache_salt' must be a non-empty string of at most {MAX_NAME_LEN} characters", "cache_salt")
        ignore_eos = _opt(body, "ignore_eos", "bool") or False
        presence = _opt(body, "presence_penalty", "num", -2, 2) or 0.0
        frequency = _opt(body, "frequency_penalty", "num", -2, 2) or 0.0
        repetition = _opt(body, "repetition_penalty", "num", 0, 100, lo_open=True)
        min_p = _opt(body, "min_p", "num", 0, 1) or 0.0
        min_tokens = _opt(body, "min_tokens", "int", 0, limit) or 0
        include_stop = _opt(body, "include_stop_str_in_output", "bool") or False
        logit_bias = self._logit_bias(body.get("logit_bias"))
        stop = body.get("stop")
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
        if len(stops) > MAX_STOP:
            raise bad(f"at most {MAX_STOP} stop strings", "stop")
        stops = [_text(s, "stop") for s in stops if s]
        if any(len(s) > 1024 for s in stops):
            raise bad("stop strings are limited to 1024 characters", "stop")

        stop_ids = body.get("stop_token_ids")  # vLLM's: token ids that end the answer (kept in it)
        if stop_ids is None:
            stop_ids = []
        if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
            raise bad("'stop_token_ids' must be a list of token ids", "stop_token_ids", "invalid_type")
        if len(stop_ids) > MAX_STOP_TOKENS:
            raise bad(f"at most {MAX_STOP_TOKENS} stop_token_ids", "stop_token_ids")
        if any(t < 0 or t >= self.tokenizer.vocab_size for t in stop_ids):
            raise bad(f"stop_token_ids must be in [0, {self.tokenizer.vocab_size})", "stop_token_ids")

        prompts = prompt_ids_of(body)
        if len(prompts) * n > MAX_CHOICES:
            raise bad(f"{len(prompts)} prompts x n={n} make {len(prompts) * n} choices; at most {MAX_CHOICES}",
                      "n" if n > 1 else "prompt")
        param = "messages" if chat else "prompt"
        for prompt_ids in prompts:
            if len(prompt_ids) > self.cfg.max_prompt_tokens:
                raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, more than the limit of "
                                    f"{self.cfg.max_prompt_tokens}", param, "context_length_exceeded")
            if self.max_context is not None and len(prompt_ids) >= self.max_context:
                raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                                    f"{self.max_context}", param, "context_length_exceeded")
        longest = max(len(p) for p in prompts)
        if max_tokens is None:
            max_tokens = 16 if not chat else limit
            if self.max_context is not None:
                max_tokens = max(1, min(max_tokens, self.max_context - longest))
        elif self.max_context is not None and longest + max_tokens > self.max_context:
            raise ApiError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceed the "
                                f"model's context of {self.max_context}", "max_tokens", "context_length_exceeded")
        if min_tokens > max_tokens:
            raise bad(f"'min_tokens' ({min_tokens}) must be <= max_tokens ({max_tokens})", "min_tokens")
        if len(prompts) * best_of > MAX_CHOICES:
            raise bad(f"{len(prompts)} prompts x best_of={best_of} make {len(prompts) * best_of} samples; at most "
                      f"{MAX_CHOICES}", "best_of")
        # The engine computes the prompt's logprobs for echo + logprobs, and each sample's for best_of.
        engine_prompt_lps = max((v for v in (prompt_logprobs, logprobs if echo else None) if v is not None),
                                default=None)
        engine_lps = logprobs if logprobs is not None else (0 if best_of > n else None)
        from services.frontend.structured import grammar_of

        grammar = grammar_of(body)
        if tools is not None and tools.grammar() is not None:
            if grammar is not None:
                raise bad("a forced tool call ('tool_choice') and a response format cannot both constrain the answer",
                          "tool_choice")
            grammar = tools.grammar()
        sampling = SamplingParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else float(temperature),
                                  top_p=1.0 if top_p is None else float(top_p),
                                  top_k=0 if top_k in (None, -1) else top_k, seed=seed, ignore_eos=ignore_eos,
                                  stop_token_ids=list(dict.fromkeys(stop_ids)), presence_penalty=float(presence),
                                  frequency_penalty=float(frequency),
                                  repetition_penalty=1.0 if repetition is None else float(repetition),
                                  min_p=float(min_p), logit_bias=logit_bias, min_tokens=min_tokens,
                                  logprobs=engine_lps, prompt_logprobs=engine_prompt_lps, grammar=grammar)
        texts = body.get("prompt") if not chat else None
        texts = texts if isinstance(texts, list) and texts and isinstance(texts[0], (str, list)) else [texts]
        return ParsedRequest(prompts[0], sampling, stops, priority, stream, include_usage, cache_salt or "", n,
                             prompts if len(prompts) > 1 else [], logprobs=logprobs, echo=echo,
                             prompt_texts=[t if isinstance(t, str) else None for t in texts], no_output=no_output,
                             include_stop_str=include_stop, best_of=best_of, prompt_logprobs=prompt_logprobs,
                             tools=tools, continuous_usage=continuous_usage)

    def _logit_bias(self, v: Any) -> dict[int, float]:
        """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (JSON keys are strings)."""
        if _empty(v):
            return {}
        if not isinstance(v, dict):
            raise bad("'logit_bias' must be an object of token id -> bias", "logit_bias", "invalid_type")
        if len(v) > MAX_LOGIT_BIAS:
            raise bad(f"at most {MAX_LOGIT_BIAS} logit_bias entries", "logit_bias")
        out: dict[int, float] = {}
        vocab = self.tokenizer.vocab_size
        for key, bias in v.items():
            try:
                tok = int(key)
            except (TypeError, ValueError):
                raise bad(f"logit_bias key {str(key)[:32]!r} is not a token id", "logit_bias") from None
            if not 0 <= tok < vocab:
                raise bad(f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
            if not _is_num(bias) or not math.isfinite(bias) or not -100 <= bias <= 100:
                raise bad("logit_bias values must be numbers in [-100, 100]", "logit_bias")
            out[tok] = float(bias)
        return out

    # ---- completions -----------------------------------------------------------------------------

    def completion(self, body: Any) -> ParsedRequest:
        if isinstance(body, dict):
            for name in ("tools", "tool_choice"):
                if body.get(name) not in (None, [], "none"):
                    raise bad(f"'{name}' is for chat completions", name, "unsupported_parameter")
        return self._common(body, self._prompts, chat=False)

    def _prompts(self, body: dict) -> list[list[int]]:
        """A completion's prompts: one (text or token ids), or a batch (a list of texts or of
        token-id lists)."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > MAX_CHOICES:
                raise bad(f"at most {MAX_CHOICES} prompts in a batch", "prompt")
            return [self._one_prompt(p) for p in prompt]
        return [self._prompt_ids(body)]

    def _prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        return self._one_prompt(prompt)

    def _one_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(_text(prompt, "prompt"))
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            vocab = self.tokenizer.vocab_size
            if any(t < 0 or t >= vocab for t in prompt):
                raise bad(f"token ids must be in [0, {vocab})", "prompt")
            ids = list(prompt)
        elif prompt is None:
            raise bad("'prompt' is required", "prompt", "missing_required_parameter")
        else:
            raise bad("'prompt' must be a string, a list of token ids, or a list with one of them", "prompt",
                      "invalid_type")
        if not ids:
            raise bad("the prompt is empty", "prompt")
        return ids

    # ---- chat ------------------------------------------------------------------------------------

    def chat(self, body: Any) -> ParsedRequest:
        from services.frontend.tools import tool_set

        self.check_model(body)
        tools = tool_set(body)
        return self._common(body, lambda b: [self._chat_ids(b, tools)], chat=True, tools=tools)

    def _chat_ids(self, body: dict, tools: Any = None) -> list[int]:
        messages = body.get("messages")
        if messages is None:
            raise bad("'messages' is required", "messages", "missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list", "messages", "invalid_type")
        norm = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]", "invalid_type")
            if not _empty(m.get("function_call")):
                raise bad(f"messages[{i}]: the legacy 'function_call' is not supported by this server (send "
                          "'tool_calls')", f"messages[{i}].function_call", "unsupported_parameter")
            calls = self._message_calls(m.get("tool_calls"), i)
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                parts = []
                for part in content:
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                    parts.append(part["text"])
                content = "".join(parts)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise bad(f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
            msg: dict[str, Any] = {"role": _text(m["role"], f"messages[{i}].role"),
                                   "content": _text(content, f"messages[{i}].content")}
            if calls:
                msg["tool_calls"] = calls
            norm.append(msg)
        from services.frontend.tools import render_messages

        add = _opt(body, "add_generation_prompt", "bool")
        cont = _opt(body, "continue_final_message", "bool") or False
        if cont and add:
            raise bad("'continue_final_message' and 'add_generation_prompt' cannot both be true",
                      "continue_final_message")
        if cont and norm[-1]["role"] != "assistant":
            raise bad("'continue_final_message' needs an assistant message last", "continue_final_message")
        opts = {"add_generation_prompt": add is not False, "continue_final_message": cont}
        native = getattr(self.tokenizer, "template_has_tools", False)
        if not native:
            return self.encode_chat(render_messages(norm, tools), **opts)
        schemas = [{"type": "function", "function": f} for f in tools.functions] if tools is not None else None
        return self.encode_chat(render_messages(norm, tools, native=True), schemas, **opts)

    @staticmethod
    def _message_calls(calls: Any, i: int) -> list[dict[str, Any]]:
        """An assistant message's earlier tool calls as {"name", "arguments"} (arguments parsed)."""
        if _empty(calls):
            return []
        param = f"messages[{i}].tool_calls"
        if not isinstance(calls, list):
            raise bad(f"'{param}' must be a list", param, "invalid_type")
        out = []
        for c in calls:
            f = c.get("function") if isinstance(c, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                raise bad(f"'{param}' entries must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}",
                          param, "invalid_type")
            args = f.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                raise bad(f"'{param}': arguments must be JSON", param) from None
            out.append({"name": f["name"], "arguments": args})
        return out

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False) -> list[int]:
        from engine.errors import InvalidRequestError

        try:
            if tools is None and add_generation_prompt and not continue_final_message:
                return self.tokenizer.encode_chat(messages)
            return self.tokenizer.encode_chat(messages, tools, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=continue_final_message)
        except InvalidRequestError as exc:
            raise bad(str(exc), "messages") from None
