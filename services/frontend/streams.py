"""One request's token stream as the frontend receives it from whichever worker owns it.

Token batches carry `first_index` (the output index of their first token). `RequestStream.accept`
appends only at the index it expects: it drops tokens it already has (duplicates, e.g. resent
around a migration), buffers batches that arrive ahead of a gap, and releases them once the gap
closes. The consumer reads `StreamEvent`s (new tokens in order, then one final event) from an
asyncio queue.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from protocol.to_frontend import TokenBatch

MAX_BUFFERED_BATCHES = 4096


@dataclass(slots=True)
class StreamEvent:
    """New tokens in order; `finish_reason` set on the last event ("stop", "length", "abort",
    "error"; `error` says why for "error")."""

    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class RequestStream:
    """Ordering state, current owner and output queue of one in-flight request."""

    request_id: str
    worker_id: str
    worker_address: str
    num_prompt_tokens: int = 0
    next_index: int = 0
    finished: bool = False
    queue: asyncio.Queue[StreamEvent] = field(default_factory=asyncio.Queue)
    ahead: dict[int, TokenBatch] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    duplicates: int = 0

    def accept(self, batch: TokenBatch) -> None:
        """Take one batch from the wire; queue whatever becomes deliverable in order."""
        if self.finished:
            return
        if batch.first_index > self.next_index:
            old = self.ahead.get(batch.first_index)
            if old is None or len(batch.token_ids) > len(old.token_ids) or batch.finished:
                if len(self.ahead) < MAX_BUFFERED_BATCHES:
                    self.ahead[batch.first_index] = batch
            return
        self._apply(batch)
        while self.ahead and not self.finished:
            ready = [i for i in self.ahead if i <= self.next_index]
            if not ready:
                break
            for i in sorted(ready):
                self._apply(self.ahead.pop(i))

    def _apply(self, batch: TokenBatch) -> None:
        if self.finished:
            return
        skip = self.next_index - batch.first_index
        new = list(batch.token_ids[skip:]) if skip < len(batch.token_ids) else []
        if skip > 0:
            self.duplicates += min(skip, len(batch.token_ids))
        self.next_index += len(new)
        if batch.finish_reason == "abort" and batch.worker_id != self.worker_id:
            # A former owner letting go after a migration: its tokens count, its finish does not.
            batch = TokenBatch(request_id=batch.request_id, first_index=batch.first_index,
                               token_ids=batch.token_ids, worker_id=batch.worker_id)
        if batch.finish_reason is not None:
            end = batch.first_index + len(batch.token_ids)
            if end < self.next_index:
                # A finish for a shorter stream than we have (e.g. the old owner aborted after a
                # migration): the new owner's stream decides; ignore it.
                if new:
                    self.queue.put_nowait(StreamEvent(new))
                return
            self.finished = True
            self.ahead.clear()
            self.queue.put_nowait(StreamEvent(new, batch.finish_reason, batch.error))
        elif new:
            self.queue.put_nowait(StreamEvent(new))

    def fail(self, reason: str, message: str) -> None:
        """End the stream locally (worker lost, deadline, ...)."""
        if not self.finished:
            self.finished = True
            self.queue.put_nowait(StreamEvent([], reason, message))
