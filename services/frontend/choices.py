"""One choice of an answer in OpenAI's shapes: its text, logprobs and echoed prompt, whole or streamed.

Completions' logprobs are `{tokens, token_logprobs, top_logprobs, text_offset}` (top_logprobs a
dict per token: the top k and the chosen token, as vLLM answers); chat's are `{content: [{token,
logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`. With `echo` the prompt comes first:
its text, and with `logprobs` its tokens' entries (the first token's logprob null), which is what
lm-evaluation-harness reads for log-likelihood tasks. vLLM's `prompt_logprobs` extra is a list per
prompt token (null first) of {token id: {logprob, rank, decoded_token}}.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from protocol.payloads import TokenLogprobs
from services.frontend.generation import Delta
from services.frontend.params import ParsedRequest
from services.frontend.tools import ToolCallStream, split_calls


class TokenTexts:
    """Each token's own text (decoded alone, special tokens kept), cached."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self._text = lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t], skip_special_tokens=False))

    def __call__(self, token_id: int) -> str:
        return self._text(token_id)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class ChoiceRenderer:
    """Renders the deltas of choice `index` (of prompt `prompt_index`) for `parsed`'s request."""

    def __init__(self, texts: TokenTexts, parsed: ParsedRequest, chat: bool, index: int, prompt_index: int = 0) -> None:
        self.texts = texts
        self.parsed = parsed
        self.chat = chat
        self.index = index
        prompts = parsed.prompts or [parsed.prompt_ids]
        self.prompt_ids = prompts[prompt_index]
        # echo repeats the prompt as it was sent (a token-id prompt: its decoded text)
        self._prompt_text = parsed.prompt_texts[prompt_index] if prompt_index < len(parsed.prompt_texts) else None
        self._echo_pending = parsed.echo
        self._offset = 0  # completions' text_offset of the next token
        self._calls = ToolCallStream(parsed.tools.names) if chat and parsed.tools is not None else None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def wants(self, d: Delta) -> bool:
        """Whether a delta without text still needs a chunk: its tokens' logprobs, or the echo."""
        return self._echo_pending or (bool(d.token_ids) and self.parsed.logprobs is not None)

    # ---- pieces --------------------------------------------------------------------------------

    def _completion_logprobs(self, ids: list[int], entries: list[TokenLogprobs | None]) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for tid, e in zip(ids, entries):
            s = self.texts(tid)
            tokens.append(s)
            offsets.append(self._offset)
            self._offset += len(s)
            if e is None:
                lps.append(None)
                tops.append(None)
                continue
            lps.append(e.logprob)
            top = {self.texts(t): v for t, v in zip(e.top_ids, e.top_logprobs)}
            top[s] = e.logprob  # the chosen token's own entry wins where two tokens decode alike
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, ids: list[int], entries: list[TokenLogprobs]) -> dict[str, Any]:
        content = []
        for tid, e in zip(ids, entries):
            s = self.texts(tid)
            content.append({"token": s, "logprob": e.logprob, "bytes": list(s.encode("utf-8")),
                            "top_logprobs": [{"token": self.texts(t), "logprob": v,
                                              "bytes": list(self.texts(t).encode("utf-8"))}
                                             for t, v in zip(e.top_ids, e.top_logprobs)]})
        return {"content": content}

    def prompt_logprobs(self, entries: list[TokenLogprobs | None] | None) -> list[Any] | None:
        """vLLM's `prompt_logprobs` of the prompt (when the request asked for them)."""
        if self.parsed.prompt_logprobs is None or entries is None:
            return None
        k = self.parsed.prompt_logprobs
        out: list[Any] = []
        for tid, e in zip(self.prompt_ids, entries):
            if e is None:
                out.append(None)
                continue
            d = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": self.texts(t)}
                 for r, (t, v) in enumerate(zip(e.top_ids[:k], e.top_logprobs[:k]))}
            d.setdefault(str(tid), {"logprob": e.logprob, "rank": e.rank, "decoded_token": self.texts(tid)})
            out.append(d)
        return out

    def _parts(self, d: Delta) -> tuple[str, list[int], list[TokenLogprobs | None] | None]:
        """This delta's text, token ids and entries, with the echoed prompt first once."""
        text, ids = ("", []) if self.parsed.no_output else (d.text, d.token_ids)
        entries: list[TokenLogprobs | None] | None = None
        if self.parsed.logprobs is not None:
            entries = [] if self.parsed.no_output else list(d.logprobs or [])
            entries = [self._top(e) for e in entries]
        if self._echo_pending:
            self._echo_pending = False
            if self._prompt_text is None:
                self._prompt_text = self.texts.decode(self.prompt_ids)
            text = self._prompt_text + text
            if entries is not None:
                prompt = [self._top(e) for e in (d.prompt_logprobs or [None] * len(self.prompt_ids))]
                ids, entries = self.prompt_ids + ids, prompt + entries
        return text, ids, entries

    def _top(self, e: TokenLogprobs | None) -> TokenLogprobs | None:
        """`e` with the request's number of alternatives (the engine may have computed more)."""
        k = self.parsed.logprobs or 0
        if e is None or len(e.top_ids) <= k:
            return e
        return TokenLogprobs(e.logprob, e.rank, e.top_ids[:k], e.top_logprobs[:k])

    def _logprobs(self, ids: list[int], entries: list[TokenLogprobs | None] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        if self.chat:
            return self._chat_logprobs(ids, [e for e in entries if e is not None])
        return self._completion_logprobs(ids, entries)

    # ---- choices -------------------------------------------------------------------------------

    def whole(self, out: Delta) -> dict[str, Any]:
        """The choice of a whole (not streamed) answer."""
        text, ids, entries = self._parts(out)
        finish = "length" if self.parsed.no_output else out.finish_reason
        choice: dict[str, Any]
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.parsed.tools is not None:
                message["content"], calls = split_calls(text, self.parsed.tools.names)
                if calls:
                    message["tool_calls"] = calls
                    finish = "tool_calls"
            choice = {"index": self.index, "message": message, "logprobs": self._logprobs(ids, entries),
                      "finish_reason": finish}
        else:
            choice = {"index": self.index, "text": text, "logprobs": self._logprobs(ids, entries),
                      "finish_reason": finish}
        plp = self.prompt_logprobs(out.prompt_logprobs)
        if plp is not None:
            choice["prompt_logprobs"] = plp
        return choice

    def chunk(self, d: Delta | None, role: bool = False) -> dict[str, Any]:
        """The choice of one SSE event (`role`: chat's opening event)."""
        if d is None:
            text, ids, entries = "", [], None
        else:
            text, ids, entries = self._parts(d)
        finish = d.finish_reason if d else None
        if finish and self.parsed.no_output:
            finish = "length"
        choice: dict[str, Any]
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
            if self._calls is not None and not role:
                delta["content"], calls = self._calls.feed(text)
                if finish:
                    delta["content"] += self._calls.finish()
                    finish = "tool_calls" if self._calls.calls else finish
                if calls:
                    delta["tool_calls"] = calls
            choice = {"index": self.index, "delta": delta, "logprobs": self._logprobs(ids, entries),
                      "finish_reason": finish}
        else:
            choice = {"index": self.index, "text": text, "logprobs": self._logprobs(ids, entries),
                      "finish_reason": finish}
        plp = self.prompt_logprobs(d.prompt_logprobs) if d is not None else None
        if plp is not None:
            choice["prompt_logprobs"] = plp
        return choice
