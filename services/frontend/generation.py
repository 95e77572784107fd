"""One generation, from validated parameters to text deltas: the core both APIs share.

`Generator.run(params)` is an async iterator of `Delta`s: text (stable, stop strings cut out),
the token ids it came from, and on the last one the finish reason ("stop" or "length") and usage.
It starts the request through the Router, applies the deadline to every wait, stops the request
on the worker when a stop string matches, and aborts it when the consumer goes away (the
iterator is closed or its task cancelled). Metrics are recorded here.

Overload: each generation in flight reserves TOKEN_ID_BYTES per prompt token and per max token
(the ids the frontend holds for it: its prompt, the output it keeps for resumption, the events
queued for a slow client); a request that would take the reservations past
`frontend.max_queued_bytes` is refused with RouteError(overloaded) → HTTP 429 / SDK Overloaded,
so the frontend's memory stays bounded whatever the clients send or fail to read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protocol.common import ErrorCode
from protocol.payloads import SamplingParams, TokenLogprobs
from services.frontend.detokenizer import IncrementalDetokenizer, StopMatcher
from services.frontend.metrics import FrontendMetrics
from services.frontend.errors import RouteError
from services.frontend.router import Router
from services.frontend.streams import StreamEvent
from services.log import get_logger

log = get_logger("kvferry.frontend.generation")

TOKEN_ID_BYTES = 8  # reserved per prompt token and per max token of a generation in flight


@dataclass
class GenerateParams:
    """A validated generation request (from the OpenAI API or the SDK)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    priority: int = 0
    timeout_s: float = 600.0
    cache_salt: str = ""  # prefix-cache namespace (design §4)
    include_stop_str: bool = False  # keep the matched stop string at the end of the text (vLLM's)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(slots=True)
class Delta:
    """Part of the output. `first_index` is the output index of token_ids[0]."""

    text: str
    token_ids: list[int]
    first_index: int
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token of token_ids, when asked for
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first delta, when asked for


class GenerationError(Exception):
    """The request failed after it started (worker error, lost worker, deadline)."""

    def __init__(self, code: str, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


async def _next_event(queue: asyncio.Queue[StreamEvent], timeout_s: float) -> StreamEvent:
    """The next event, merged with every event already queued behind it: when the frontend falls
    behind, one SSE event / SDK chunk then carries many tokens instead of paying per token."""
    if queue.empty():
        # asyncio.timeout: one timer handle, where wait_for would wrap the get in a new Task per token
        async with asyncio.timeout(timeout_s):
            ev = await queue.get()
    else:
        ev = queue.get_nowait()
    if ev.finish_reason is not None or queue.empty():
        return ev
    events = [ev]
    while not queue.empty() and events[-1].finish_reason is None:
        events.append(queue.get_nowait())
    merged = StreamEvent([t for e in events for t in e.token_ids], events[-1].finish_reason, events[-1].error)
    merged.logprobs, merged.prompt_logprobs = _joined_logprobs(events)
    return merged


def _joined_logprobs(parts: list) -> tuple[list[TokenLogprobs] | None, list[TokenLogprobs | None] | None]:  # noqa: ANN001
    """The logprobs of consecutive events or deltas joined, aligned with their tokens (all, or none
    when a part with tokens lacks them), and the first prompt logprobs among them."""
    lps = None
    if all(p.logprobs is not None for p in parts if p.token_ids) and any(p.logprobs for p in parts):
        lps = [lp for p in parts for lp in (p.logprobs or ())]
    return lps, next((p.prompt_logprobs for p in parts if p.prompt_logprobs is not None), None)


class Generator:
    """Runs generations over a Router with one tokenizer."""

    def __init__(self, router: Router, tokenizer, metrics: FrontendMetrics) -> None:  # noqa: ANN001
        self.router = router
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.active = 0  # generations in flight
        self.reserved_bytes = 0  # their reservations (see the module docstring)

    async def run(self, p: GenerateParams) -> AsyncIterator[Delta]:
        """Start the request (raises RouteError before the first delta when it cannot start)."""
        cost = TOKEN_ID_BYTES * (len(p.prompt_ids) + p.sampling.max_tokens)
        limit = self.router.fcfg.max_queued_bytes
        if self.active and self.reserved_bytes + cost > limit:  # alone, any valid request may run
            self.metrics.requests.labels(outcome="rejected").inc()
            raise RouteError(ErrorCode.OVERLOADED, f"the requests in flight hold {self.reserved_bytes} bytes; this "
                                                   f"one needs {cost} more (limit {limit}); retry later")
        start = time.monotonic()
        deadline = start + p.timeout_s
        self.metrics.in_flight.inc()
        self.active += 1
        self.reserved_bytes += cost
        self.metrics.queued_bytes.set(self.reserved_bytes)
        outcome = "cancelled"
        try:
            try:
                stream = await self.router.submit(p.request_id, p.prompt_ids, p.sampling, p.priority, p.timeout_s,
                                                  cache_salt=p.cache_salt)
            except RouteError as exc:
                outcome = "rejected" if exc.status < 500 else "unavailable"
                raise
            self.metrics.prompt_tokens.inc(len(p.prompt_ids))
            detok = IncrementalDetokenizer(self.tokenizer, p.prompt_ids)
            stops = StopMatcher(p.stop, include=p.include_stop_str)
            want_logprobs = p.sampling.logprobs is not None
            prompt_lps: list[TokenLogprobs | None] | None = None
            n_out = 0
            last_token_t: float | None = None
            try:
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    ev = await _next_event(stream.queue, remaining)
                    now = time.monotonic()
                    if ev.token_ids:
                        if last_token_t is None:
                            self.metrics.ttft.observe(now - start)
                        else:  # tokens merged into one event share the gap (one sample per token)
                            gap = (now - last_token_t) / len(ev.token_ids)
                            for _ in ev.token_ids:
                                self.metrics.itl.observe(gap)
                        last_token_t = now
                        self.metrics.generated_tokens.inc(len(ev.token_ids))
                    if ev.finish_reason == "abort" and p.request_id not in self.router.streams:
                        raise GenerationError("cancelled", ev.error or "cancelled", 499)
                    if ev.finish_reason in ("abort", "error"):
                        raise GenerationError("worker_" + ev.finish_reason, ev.error or f"request {ev.finish_reason}ed")
                    if want_logprobs and ev.token_ids and ev.logprobs is None:
                        raise GenerationError("worker_error", "the worker sent tokens without the logprobs asked for")
                    if ev.prompt_logprobs is not None:
                        prompt_lps = ev.prompt_logprobs
                    # Per token only when stop strings need the exact token that completes them.
                    groups = [[t] for t in ev.token_ids] if stops.stops else [ev.token_ids]
                    text, ids, first, stopped = "", [], n_out, False
                    for g in groups:
                        if not g:
                            continue
                        # vLLM's min_tokens: stop strings count only once that many tokens were generated
                        piece, stopped = stops.feed(detok.push(g), match=n_out + len(g) >= p.sampling.min_tokens)
                        text += piece
                        ids.extend(g)
                        n_out += len(g)
                        if stopped:
                            break
                    lps = ev.logprobs[: len(ids)] if want_logprobs and ev.logprobs is not None else None
                    if stopped:
                        self.router.abort(p.request_id, "stop string")
                        outcome = "stop"
                        yield Delta(text, ids, first, "stop", Usage(len(p.prompt_ids), n_out), lps, prompt_lps)
                        return
                    if ev.finish_reason is not None:
                        tail, stopped = stops.feed(detok.flush())
                        text += tail if stopped else tail + stops.flush()
                        self.router.finish(p.request_id)
                        reason = "length" if ev.finish_reason == "length" and not stopped else "stop"
                        outcome = reason
                        yield Delta(text, ids, first, reason, Usage(len(p.prompt_ids), n_out), lps, prompt_lps)
                        return
                    if text or ids:
                        yield Delta(text, ids, first, logprobs=lps, prompt_logprobs=prompt_lps)
                        prompt_lps = None
            except TimeoutError:
                outcome = "timeout"
                self.router.abort(p.request_id, "deadline passed")
                raise GenerationError("timeout", f"no result within {p.timeout_s:g} s", 504) from None
            except GenerationError as exc:
                outcome = "cancelled" if exc.code == "cancelled" else "error"
                self.router.finish(p.request_id)
                raise
            except BaseException:
                # Consumer gone (closed iterator, cancelled task, client disconnect): free the worker.
                if p.request_id in self.router.streams:
                    self.router.abort(p.request_id, "client went away")
                raise
        finally:
            self.metrics.in_flight.dec()
            self.active -= 1
            self.reserved_bytes -= cost
            self.metrics.queued_bytes.set(self.reserved_bytes)
            self.metrics.requests.labels(outcome=outcome).inc()
            if outcome in ("stop", "length"):
                self.metrics.e2e.observe(time.monotonic() - start)
            log.info("request.finished", request_id=p.request_id, outcome=outcome)

    async def collect(self, p: GenerateParams) -> Delta:
        """The whole output as one Delta."""
        return await join_deltas(self.run(p))


async def join_deltas(deltas: AsyncIterator[Delta], first: Delta | None = None) -> Delta:
    """The rest of a generation (after `first`, if given) joined into one Delta."""
    parts = [first] if first is not None else []
    if first is None or first.finish_reason is None:
        async for d in deltas:
            parts.append(d)
    assert parts and parts[-1].finish_reason is not None
    lps, prompt_lps = _joined_logprobs(parts)
    return Delta("".join(d.text for d in parts), [t for d in parts for t in d.token_ids], 0,
                 parts[-1].finish_reason, parts[-1].usage, lps, prompt_lps)
