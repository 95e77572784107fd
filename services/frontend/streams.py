"""One request's token stream as the frontend receives it from whichever worker owns it.

Token batches carry `first_index` (the output index of their first token). `RequestStream.accept`
appends only at the index it expects: it drops tokens it already has (duplicates, e.g. resent
around a migration), buffers batches that arrive ahead of a gap, and releases them once the gap
closes. The consumer reads `StreamEvent`s (new tokens in order, then one final event) from an
asyncio queue.

For resumption after a worker failure (services.frontend.router) the stream also keeps what the
request was started with (prompt, sampling, priority) and every token delivered so far: a resumed
request is prompt + delivered tokens, continuing at `next_index`. Batches from workers in `dead`
(the request was taken away from them) are ignored, and a final "error"/"abort" batch from the
current owner goes to `on_lost` (which may resume the request instead of ending the stream).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.payloads import SamplingParams
from services.frontend.prompt_hashes import PromptHashes
from protocol.payloads import TokenLogprobs
from protocol.to_frontend import TokenBatch

MAX_BUFFERED_BATCHES = 4096


@dataclass(slots=True)
class StreamEvent:
    """New tokens in order; `finish_reason` set on the last event ("stop", "length", "abort",
    "error"; `error` says why for "error")."""

    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token, when the request asked for them
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once, with the first tokens


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
    # ---- resumption (worker failures) ----
    prompt_ids: list[int] = field(default_factory=list)
    sampling: SamplingParams | None = None
    priority: int = 0
    cache_salt: str = ""
    block_hashes: PromptHashes = field(default_factory=PromptHashes)  # of the prompt it was last started with
    deadline: float = float("inf")  # monotonic: the request's own deadline (bounds resumptions too)
    output: list[int] = field(default_factory=list)  # every token delivered, in order
    dead: set[str] = field(default_factory=set)  # workers it was taken away from: their batches are ignored
    resumes: int = 0
    resuming: bool = False
    prompt_logprobs_seen: bool = False
    progressed: float = field(default_factory=time.monotonic)  # the last in-order token (or start)
    assigned_at: float = field(default_factory=time.monotonic)  # when the current owner got the request
    # A final "error"/"abort" batch from the current owner: return True to keep the stream open (resumed).
    on_lost: Callable[["RequestStream", str], bool] | None = None

    def accept(self, batch: TokenBatch) -> None:
        """Take one batch from the wire; queue whatever becomes deliverable in order."""
        if self.finished or batch.worker_id in self.dead:
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
                b = self.ahead.pop(i, None)  # on_lost may have cleared the buffer meanwhile
                if b is not None and b.worker_id not in self.dead:
                    self._apply(b)

    def _event(self, batch: TokenBatch, new: list[int], finish_reason: str | None = None,
               error: str | None = None) -> StreamEvent:
        ev = StreamEvent(new, finish_reason, error)
        if batch.logprobs is not None:
            ev.logprobs = batch.logprobs[len(batch.token_ids) - len(new):]
        if batch.prompt_logprobs is not None and batch.first_index == 0 and not self.prompt_logprobs_seen and new:
            self.prompt_logprobs_seen = True
            ev.prompt_logprobs = batch.prompt_logprobs
        return ev

    def _apply(self, batch: TokenBatch) -> None:
        if self.finished:
            return
        skip = self.next_index - batch.first_index
        new = list(batch.token_ids[skip:]) if skip < len(batch.token_ids) else []
        if skip > 0:
            self.duplicates += min(skip, len(batch.token_ids))
        self.next_index += len(new)
        if new:
            self.output.extend(new)
            self.progressed = time.monotonic()
        if batch.finish_reason in ("abort", "error") and batch.worker_id != self.worker_id:
            # A former owner letting go after a migration: its tokens count, its finish does not.
            batch = TokenBatch(request_id=batch.request_id, first_index=batch.first_index,
                               token_ids=batch.token_ids, worker_id=batch.worker_id, logprobs=batch.logprobs,
                               prompt_logprobs=batch.prompt_logprobs)
        if batch.finish_reason is not None:
            end = batch.first_index + len(batch.token_ids)
            if end < self.next_index:
                # A finish for a shorter stream than we have (e.g. the old owner aborted after a
                # migration): the new owner's stream decides; ignore it.
                if new:
                    self.queue.put_nowait(self._event(batch, new))
                return
            if (batch.finish_reason in ("error", "abort") and self.on_lost is not None
                    and self.on_lost(self, batch.error or f"request {batch.finish_reason}ed on {batch.worker_id}")):
                if new:  # the owner failed it (stopping, lost frontend, step error): it goes on elsewhere
                    self.queue.put_nowait(self._event(batch, new))
                return
            self.finished = True
            self.ahead.clear()
            self.queue.put_nowait(self._event(batch, new, batch.finish_reason, batch.error))
        elif new:
            self.queue.put_nowait(self._event(batch, new))

    # ---- ownership (the router's and the resumer's calls; nothing else sets these fields) ----

    def moved_to(self, worker_id: str, worker_address: str) -> None:
        """A migration committed: `worker_id` owns the request now (its stream goes on seamlessly)."""
        self.worker_id, self.worker_address = worker_id, worker_address
        self.assigned_at = time.monotonic()

    def taken_from(self, worker_id: str) -> None:
        """The request was taken away from `worker_id`: ignore its batches from now on."""
        self.dead.add(worker_id)

    def begin_resume(self) -> None:
        """The owner is lost: its batches no longer count, nor what it sent past a gap."""
        self.taken_from(self.worker_id)
        self.ahead.clear()
        self.resuming = True

    def count_resume(self, max_resumes: int) -> bool:
        """Count one more resumption; False (not counted) once `max_resumes` were made."""
        if self.resumes >= max_resumes:
            return False
        self.resumes += 1
        return True

    def end_resume(self) -> None:
        self.resuming = False

    def restart_at(self, worker_id: str, worker_address: str) -> None:
        """The request goes on at `worker_id` from `next_index`: forget batches buffered past a gap
        (they came from the old owner)."""
        self.worker_id, self.worker_address = worker_id, worker_address
        self.ahead.clear()
        self.progressed = self.assigned_at = time.monotonic()

    def end(self, finish_reason: str) -> None:
        """End the stream normally with no new tokens (e.g. a lost request that had delivered all
        its max_tokens already)."""
        if not self.finished:
            self.finished = True
            self.queue.put_nowait(StreamEvent([], finish_reason))

    def fail(self, reason: str, message: str) -> None:
        """End the stream locally (worker lost, deadline, ...)."""
        if not self.finished:
            self.finished = True
            self.queue.put_nowait(StreamEvent([], reason, message))
