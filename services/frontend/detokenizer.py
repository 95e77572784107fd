"""Incremental detokenization and stop strings.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas. It decodes a sliding
window (a few tokens already emitted, then the new ones) and emits the part of the window's text
that goes beyond the already-emitted prefix, so tokenizers whose spacing depends on the previous
token decode correctly, and the cost per token stays constant. Text ending in U+FFFD (a multi-byte
character whose bytes are split across tokens) is held back until a later token completes it.

`StopMatcher` checks stop strings on the text stream, holding back just enough characters that a
stop string spanning several deltas is still found; the stop string itself is never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text deltas of a token stream. `push(ids)` returns the newly stable text; `flush()` the rest
    (including an incomplete character as U+FFFD) at the end of the stream.

    `prompt_ids` (optional) seeds the window with the prompt's last tokens, so the first output
    token's leading space decodes as it would after the prompt.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        ctx = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        if ctx and self._decode(ctx).endswith(REPLACEMENT):
            ctx = []  # a prompt ending mid-character would shift the window's text
        self.ids: list[int] = ctx
        self.prefix_offset = 0  # window start
        self.read_offset = len(ctx)  # first token whose text is not emitted yet
        self.num_output_tokens = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now stable (maybe "")."""
        if not new_ids:
            return ""
        self.ids.extend(new_ids)
        self.num_output_tokens += len(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if not final and full.endswith(REPLACEMENT):
            return ""  # wait for the rest of the character
        if len(full) <= len(prefix) and not final:
            return ""  # e.g. a special token that decodes to nothing
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        if self.prefix_offset > 4 * PROMPT_CONTEXT_TOKENS:  # keep the list bounded
            drop = self.prefix_offset
            del self.ids[:drop]
            self.prefix_offset -= drop
            self.read_offset -= drop
        return delta


class StopMatcher:
    """Finds the first stop string in a text stream. `feed(text)` returns (text safe to emit,
    stopped); after a stop, the emitted text ends right before the stop string. `flush()` returns
    what is held back when the stream ends without a stop."""

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include = include  # vLLM's include_stop_str_in_output: the text ends with the stop string
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, text: str, match: bool = True) -> tuple[str, bool]:
        """`match` False: take the text without looking for stops yet (min_tokens not reached)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [(i, -len(s)) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0] if match else []
        if hits:
            self.stopped = True
            self.pending = ""
            at, neg_len = min(hits)  # the earliest stop; of those starting there, the longest
            return buf[:at - neg_len if self.include else at], True
        cut = max(0, len(buf) - self.hold)
        self.pending = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
