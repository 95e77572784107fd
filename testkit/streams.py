"""One request's token stream as a frontend stitches it, by output index (`first_index` of each
batch). No sockets here: the bench's unit tests feed it directly.

Three readings of the same stream, by the flags:
- default (the bench): a batch beyond the next expected index (a new owner's first tokens
  overtaking the old owner's last ones) waits until the gap is filled; an index delivered twice,
  or tokens after the final batch, raise `error_type`;
- `record_repeats` (the migration tests, where a taken-back migration lets two workers stream
  the same indices): repeats and late tokens are recorded (`duplicates`), not raised;
- `in_order` (one worker, nothing moves): every batch must start at the next index and nothing
  may follow the final batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class Stream:
    """Tokens by output index, each exactly once (see the module's docstring for the flags)."""

    request_id: str
    tokens: list[int] = field(default_factory=list)  # indices 0..n-1, in order
    times: list[float] = field(default_factory=list)  # arrival time of each output index
    workers: list[str] = field(default_factory=list)  # who sent each output index
    finish_reason: str | None = None
    error: str | None = None
    senders: list[str] = field(default_factory=list)  # workers that sent tokens, in arrival order (runs)
    duplicates: list[int] = field(default_factory=list)  # indices delivered again (record_repeats)
    record_repeats: bool = False
    in_order: bool = False
    _pending: dict[int, tuple[int, str, float]] = field(default_factory=dict)  # index → (token, worker, time)

    error_type: ClassVar[type[Exception]] = AssertionError

    def __len__(self) -> int:
        return len(self.tokens)

    def received(self) -> int:
        """Distinct indices received, gaps or not."""
        return len(self.tokens) + len(self._pending)

    def hold(self, tokens: list[int]) -> None:
        """What the frontend already holds (a resumed request continues after it)."""
        self.tokens[:] = tokens
        self.times[:] = [math.nan] * len(tokens)
        self.workers[:] = [""] * len(tokens)

    def feed(self, first_index: int, token_ids: list[int], worker_id: str, t: float,
             finish_reason: str | None = None, error: str | None = None) -> None:
        rid = self.request_id
        if self.in_order:
            if self.finish_reason is not None:
                raise self.error_type(f"{rid}: batch after the final one")
            if first_index != len(self.tokens):
                raise self.error_type(f"{rid}: first_index {first_index} after {len(self.tokens)} tokens")
        if token_ids and self.finish_reason is not None and not self.record_repeats:
            raise self.error_type(f"{rid}: tokens at index {first_index} after its final batch")
        indices = range(first_index, first_index + len(token_ids))
        repeats = [i for i in indices if i < len(self.tokens) or i in self._pending]
        if repeats and not self.record_repeats:
            raise self.error_type(f"{rid}: index {first_index} delivered twice "
                                  f"(by {worker_id}; {len(self.tokens)} tokens so far)")
        if token_ids and (not self.senders or self.senders[-1] != worker_id):
            self.senders.append(worker_id)
        self.duplicates.extend(repeats)
        for i, tok in zip(indices, token_ids):
            if i < len(self.tokens):
                self.tokens[i] = tok  # a repeat: the later value stands
            else:
                self._pending[i] = (tok, worker_id, t)
        while len(self.tokens) in self._pending:
            tok, w, at = self._pending.pop(len(self.tokens))
            self.tokens.append(tok)
            self.times.append(at)
            self.workers.append(w)
        # A later final batch: the first one stands when repeats are recorded (they are counted by
        # the sink); otherwise the latest one does, as the bench has always read it.
        if finish_reason is not None and (self.finish_reason is None or not self.record_repeats):
            self.finish_reason = finish_reason
            self.error = error

    def check_complete(self) -> None:
        if self._pending:
            raise self.error_type(f"{self.request_id}: gap at index {len(self.tokens)}; indices "
                                  f"{sorted(self._pending)[:5]} arrived but not the ones before")

    def ordered(self) -> list[int]:
        """The tokens in order; raises on a gap."""
        self.check_complete()
        return list(self.tokens)

    def owner_runs(self) -> list[tuple[str, int]]:
        """(worker, first index) of each run of consecutive tokens from one worker."""
        runs: list[tuple[str, int]] = []
        for i, w in enumerate(self.workers):
            if not runs or runs[-1][0] != w:
                runs.append((w, i))
        return runs
