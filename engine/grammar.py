"""Structured output through llguidance: a request's Grammar as a mask over the next token.

`Grammars` holds one tokenizer's llguidance view (built once, on the first grammar request) and
builds a matcher per request. A matcher's state is a function of the tokens it consumed, so a
migrated or resumed request gets its matcher back by replaying its output (`matcher(grammar,
replay)`): nothing about the grammar has to travel but the grammar itself.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidRequestError
from protocol.payloads import Grammar

if TYPE_CHECKING:  # only the sampler's mask needs torch: the frontend checks grammars without it
    import torch

_BITS: torch.Tensor | None = None  # bit positions 0..31, for unpacking llguidance's mask words


def grammar_text(g: Grammar) -> str:
    """llguidance's grammar text for `g` (its syntax is checked when a matcher is built)."""
    from llguidance import LLMatcher

    if g.kind == "json_schema":
        try:
            return LLMatcher.grammar_from_json_schema(g.spec)
        except ValueError as exc:
            raise InvalidRequestError(f"invalid JSON schema: {exc}") from None
    if g.kind == "regex":
        return LLMatcher.grammar_from_regex(g.spec)
    return LLMatcher.grammar_from_lark(g.spec)


def check_grammar(g: Grammar) -> None:
    """InvalidRequestError naming what is wrong with `g` (no tokenizer needed: the frontend's check)."""
    from llguidance import LLMatcher

    err = LLMatcher.validate_grammar(grammar_text(g), None)
    if err:
        raise InvalidRequestError(f"invalid {g.kind.replace('_', ' ')}: {err.strip()[:2000]}")


class Grammars:
    """Matchers for one model's tokenizer (the `tokenizers` JSON, the model's vocabulary size)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Build llguidance's tokenizer view now (it is otherwise built by the first grammar)."""
        self._lltokenizer()

    def _lltokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                from llguidance import LLTokenizer

                self._tokenizer = LLTokenizer(self._json, n_vocab=self.vocab_size, eos_token=self._eos or None)
            return self._tokenizer

    def matcher(self, g: Grammar, replay: list[int] = ()) -> Any:  # noqa: ANN401 - llguidance.LLMatcher
        """A matcher for `g` that has consumed `replay` (the request's output so far)."""
        from llguidance import LLMatcher

        m = LLMatcher(self._lltokenizer(), grammar_text(g), log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"invalid {g.kind.replace('_', ' ')}: {m.get_error()[:2000]}")
        if replay and not m.consume_tokens(list(replay)):
            raise InvalidRequestError(f"the output so far does not match the grammar: {m.get_error()[:500]}")
        return m


def allowed(matcher: Any, vocab_size: int) -> torch.Tensor:  # noqa: ANN401
    """[vocab_size] bool: the tokens the grammar allows next."""
    global _BITS
    import torch

    if _BITS is None:  # made once, on the first grammar step (per step it was an allocation)
        _BITS = torch.arange(32, dtype=torch.int32)
    words = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)
    matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
    return ((words[:, None] >> _BITS) & 1).flatten()[:vocab_size].bool()
