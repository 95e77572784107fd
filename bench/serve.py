"""`kvferry bench serve`: replay a trace against a live cluster, in real time.

Each request is sent at its arrival time (from the trace: generated or --trace-file) over the
OpenAI HTTP API (--url; the openai client, streaming completions with the prompt as token ids,
max_tokens = the output length, the `ignore_eos` and `priority` extensions) or the SDK (--sdk;
sdk.AsyncClient streams). Prints a progress bar on stderr, then the metrics with `vllm bench
serve`'s definitions (TTFT, TPOT, ITL per streamed chunk, E2E; mean, median, P90, P99; goodput
under --goodput SLOs; per priority class). The cluster's policy is read from the scheduler's status
(--scheduler, else the cluster config: --config / --base-port / KVFERRY_*), not given here.
Traces with KV reuse (`--trace multi-turn` / `system-prompt`, or a JSONL file with segments) send
prompts that share their segments' prefixes, so the cluster's prefix caches and cache-aware
dispatch are exercised (`request_prompt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from bench.trace import TraceOptions, build_trace, trace_label

PROMPT_IDS = range(3, 256)  # token ids valid for every tokenizer (the byte-level `tiny` one included)


@dataclass
class Options(TraceOptions):
    """`kvferry bench serve`'s settings (the flags, same names; their defaults are the CLI's)."""

    url: str | None  # the frontend's HTTP base URL, or
    sdk: str | None  # its SDK endpoint
    model: str | None
    timeout: float
    scheduler: str | None
    base_port: int | None
    config: str | None
    json: str | None


def prompt_ids(n: int, salt: int) -> list[int]:
    k = len(PROMPT_IDS)
    return [PROMPT_IDS[(salt * 31 + i * 7) % k] for i in range(n)]


def request_prompt(r: Any, index: int) -> list[int]:
    """The token ids sent for trace request `r` (the `index`-th): its segments' tokens when the trace
    has reuse (requests that share leading segments share that prefix, so the cluster's prefix
    caches hit), else a prompt of its own. Answer segments are made up from their ids: a replay on
    a fixed schedule cannot know what the model answered, so a conversation's hits stop at the
    previous turn's prompt."""
    from workload.reuse import prompt_tokens

    if not r.segments:
        return prompt_ids(r.input_len, index)
    return [PROMPT_IDS[t] for t in prompt_tokens(r.segments, len(PROMPT_IDS))]


def cluster_policy(opts: Options) -> str | None:
    """The scheduler's policy (StatusReply.policy), or None with a warning when it cannot be asked."""
    from protocol import StatusRequest
    from services.scheduler.client import AskFailed, ask  # the same lookup and exchange as `kvferry ctl status`

    target = SimpleNamespace(scheduler=opts.scheduler, base_port=opts.base_port, config=opts.config, timeout=5.0)
    try:
        return ask(target, StatusRequest(include_requests=False)).policy or None
    except AskFailed as exc:
        print(f"warning: cannot read the cluster's policy: {exc}", file=sys.stderr)
        return None


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.width = total, width
        self.done = self.failed = self.sent = 0
        self._drawn = 0.0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        fill = int(self.width * self.done / max(1, self.total))
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} done, "
                         f"{self.sent - self.done} in flight, {self.failed} failed")
        sys.stderr.flush()

    def close(self) -> None:
        self.update(force=True)
        sys.stderr.write("\n")


async def _http_one(client: Any, model: str, rec: Any, prompt: list[int], t0: float, timeout: float) -> None:
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=rec.output_len, stream=True,
        temperature=0.0, stream_options={"include_usage": True}, timeout=timeout,
        extra_body={"ignore_eos": True, "priority": rec.priority})
    usage = None
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            if chunk.choices:
                _token(rec, time.perf_counter() - t0, 1)
            if chunk.usage is not None:
                usage = chunk.usage
    if usage is not None:
        rec.output_tokens = usage.completion_tokens


async def _sdk_one(client: Any, rec: Any, prompt: list[int], t0: float, timeout: float) -> None:
    chunks = client.stream(prompt_token_ids=prompt,
                           max_tokens=rec.output_len, ignore_eos=True, priority=rec.priority, timeout=timeout)
    async with contextlib.aclosing(chunks):
        async for c in chunks:
            if c.token_ids:
                _token(rec, time.perf_counter() - t0, len(c.token_ids))
            if c.usage is not None:
                rec.output_tokens = c.usage.completion_tokens


def _token(rec: Any, t: float, n: int) -> None:
    """A streamed chunk arrived at `t` with `n` tokens (vllm: one ITL per chunk)."""
    if rec.first_token_s is None:
        rec.first_token_s = t
    else:
        rec.itl.append(t - rec.last_token_s)
    rec.last_token_s = t
    rec.output_tokens += n


async def replay(trace: Sequence[Any], opts: Options, progress: Progress) -> tuple[list[Any], float]:
    """Send every request at its arrival time; (records, duration from the first send to the last end)."""
    from workload.metrics import RequestRecord

    if opts.url:
        import openai

        client: Any = openai.AsyncOpenAI(base_url=opts.url.rstrip("/") + "/v1", api_key="kvferry", max_retries=0)
        model = opts.model or (await client.models.list()).data[0].id
        one = lambda rec, prompt: _http_one(client, model, rec, prompt, t0, opts.timeout)  # noqa: E731
    else:
        from sdk import AsyncClient

        client = AsyncClient(opts.sdk, timeout=opts.timeout)
        one = lambda rec, prompt: _sdk_one(client, rec, prompt, t0, opts.timeout)  # noqa: E731

    async def send(rec: RequestRecord, prompt: list[int]) -> None:
        progress.sent += 1
        rec.arrival_s = time.perf_counter() - t0  # the actual send time, as vllm measures
        try:
            await one(rec, prompt)
        except Exception as exc:  # noqa: BLE001 - any failure is a failed request with its message
            rec.error = f"{type(exc).__name__}: {exc}"
            progress.failed += 1
        rec.finish_s = rec.last_token_s if rec.error is None and rec.last_token_s is not None else None
        if rec.error is None and rec.finish_s is None:
            rec.error = "no token received"
            progress.failed += 1
        progress.done += 1
        progress.update()

    records = [RequestRecord(str(i), r.arrival_s, r.input_len, r.output_len, r.priority) for i, r in enumerate(trace)]
    tasks = []
    start = trace[0].arrival_s if trace else 0.0
    t0 = time.perf_counter()
    try:
        for i, (r, rec) in enumerate(zip(trace, records)):
            prompt = request_prompt(r, i)  # built before the wait, so it does not delay the send
            delay = (r.arrival_s - start) - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(rec, prompt)))
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return records, time.perf_counter() - t0


def run(opts: Options) -> int:
    from workload.metrics import SLO, paper_row, summarize
    from workload.report import format_summary
    from workload.traces import TraceError

    try:
        slo = SLO.parse(opts.goodput)
        trace = build_trace(opts)
    except (TraceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    policy = cluster_policy(opts)
    progress = Progress(len(trace))
    try:
        records, duration = asyncio.run(replay(trace, opts, progress))
    finally:
        progress.close()
    s = summarize(records, duration, slo)
    target = opts.url or opts.sdk
    print(format_summary(s, f"served by {target} (policy {policy or 'unknown'}): {trace_label(opts)}"))
    errors = [r.error for r in records if r.error]
    if errors:
        print(f"{len(errors)} failed; first error: {errors[0]}")
    if opts.json:
        out = {"kind": "serve", "target": target, "via": "http" if opts.url else "sdk", "policy": policy,
               "trace": opts.trace_file or opts.trace, "rate": opts.rate, "cv": opts.cv, "requests": len(trace),
               "seed": opts.seed, "high_priority_fraction": opts.high_priority_fraction, **paper_row(s),
               "summary": s}
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if s["completed"] else 1
