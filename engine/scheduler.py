"""Iteration-level request scheduler: who runs in the next step, and with how many tokens.

Every step feeds each scheduled request `num_new_tokens` tokens starting at its
`num_computed_tokens`: one for a decode, a chunk of the prompt for a prefill (long prompts are
prefilled in chunks under the token budget), or the prompt plus the output so far for a request
resumed after preemption (recompute). A request samples when its chunk reaches its last token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from protocol.kv_hash import extend_hashes
from engine.block_manager import BlockManager, blocks_for
from engine.config import EngineConfig
from engine.request import FinishReason, Request, RequestOutput, RequestStatus
from protocol.payloads import TokenLogprobs


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelOutput:
    """What an executor returns for one step: the token each sampling request drew, its logprobs
    (requests that asked), and the prompt logprobs the step's prefill chunks computed (requests
    that asked: entries for the next prompt tokens, in order)."""

    tokens: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


class Scheduler:
    """Waiting queue (ordered by priority, then arrival) and running batch over a block manager."""

    def __init__(self, config: EngineConfig, blocks: BlockManager, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Prefix cache: prompt tokens of admitted requests, and how many of them were found cached.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- queue changes -----------------------------------------------------------------

    def add_waiting(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        bisect.insort(self.waiting, req, key=Request.sort_key)

    def add_running(self, req: Request) -> None:
        """Insert a request whose KV is already in its blocks (a committed migration)."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def detach(self, req: Request) -> None:
        """Take a request out of the queues without touching its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        self.detach(req)
        self.blocks.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _preempt(self, req: Request) -> None:
        """Preemption by recompute: drop the KV, requeue; the prefill redoes prompt + output."""
        self.running.remove(req)
        self.blocks.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_registered_blocks = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.add_waiting(req)

    def queued_prefill_tokens(self) -> int:
        """Tokens still to prefill: every waiting request's uncomputed ones, and those of running
        requests amid a (chunked or recomputing) prefill; a decode's one pending token is not."""
        queued = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        return queued + sum(n for r in self.running if (n := r.num_tokens - r.num_computed_tokens) > 1)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits_pool(self, num_tokens: int) -> bool:
        usable = self.blocks.num_blocks - self.blocks.watermark_blocks
        return blocks_for(num_tokens, self.blocks.block_size) <= usable

    # ---- one step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._preempt_for_priority(out)
        by_priority = len(out.preempted)
        self.running.sort(key=Request.sort_key)
        queue = list(self.running)
        kept: list[Request] = []
        while queue:
            req = queue.pop(0)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                kept.append(req)  # budget spent by earlier chunks; runs next step
                continue
            while not self.blocks.can_grow(req.request_id, req.num_computed_tokens + n):
                if queue:
                    victim = queue.pop()  # lowest priority, latest arrival
                    self._preempt(victim)
                    out.preempted.append(victim)
                    continue
                if not kept:
                    # Alone in the batch and still out of blocks: the pool cannot hold it.
                    self.finish(req, FinishReason.LENGTH)
                    out.preempted.append(req)
                else:
                    self._preempt(req)
                    out.preempted.append(req)
                req = None
                break
            if req is None:
                break
            self.blocks.grow(req.request_id, req.num_computed_tokens + n)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
            kept.append(req)
        kept.extend(queue)
        self.running = [r for r in kept if r.status is RequestStatus.RUNNING]

        if len(out.preempted) > by_priority:
            return out  # memory ran out for running requests: admit nothing new this step
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = self._cached_prefix(req)
            # Admit only when the whole prompt fits, not just its first chunk: a chunked prefill
            # admitted without room for the rest gets preempted and restarted over and over.
            # Cached blocks it reuses need no room, unless no one holds them (then they count as free).
            need = blocks_for(req.num_tokens, self.blocks.block_size) - len(hit)
            if need > self.blocks.num_free - self.blocks.num_unowned(hit) - self.blocks.watermark_blocks:
                break  # head of line blocked: later requests wait behind it (FCFS within a priority)
            self.waiting.pop(0)
            if req.hash_root is not None:
                self.prefix_query_tokens += req.num_tokens
                self.prefix_hit_tokens += len(hit) * self.blocks.block_size
            if hit:  # prefill from the first uncached block
                self.blocks.share(req.request_id, hit)
                req.num_registered_blocks = len(hit)
                req.num_computed_tokens = len(hit) * self.blocks.block_size
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            self.blocks.grow(req.request_id, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def _cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks a waiting request can start from: the longest run of its full blocks
        in the cache, short of its last token (a prefill must compute at least one to sample)."""
        if req.hash_root is None or req.num_computed_tokens or req.needs_prompt_logprobs:
            return []  # (prompt logprobs need every prompt token's logits: nothing may be skipped)
        full = (req.num_tokens - 1) // self.blocks.block_size
        extend_hashes(req.block_hashes, req.token_ids, self.blocks.block_size, full, req.hash_root)
        return self.blocks.cached_prefix(req.block_hashes[:full])

    def register_computed(self, req: Request) -> None:
        """Offer `req`'s newly completed blocks (all their tokens computed) to the prefix cache."""
        if req.hash_root is None:
            return
        full = req.num_computed_tokens // self.blocks.block_size
        if full <= req.num_registered_blocks:
            return
        extend_hashes(req.block_hashes, req.token_ids, self.blocks.block_size, full, req.hash_root)
        table = self.blocks.table(req.request_id)
        for i in range(req.num_registered_blocks, full):
            self.blocks.register(table[i], req.block_hashes[i])
        req.num_registered_blocks = full

    def _preempt_for_priority(self, out: SchedulerOutput) -> None:
        """A waiting request of higher priority than some running ones takes their blocks."""
        if not self.waiting or not self.running:
            return
        head = self.waiting[0]
        need = blocks_for(head.num_tokens, self.blocks.block_size) + self.blocks.watermark_blocks
        if self.blocks.num_free >= need and len(self.running) < self.config.max_num_seqs:
            return  # room enough: no need to look for victims (this runs every step something waits)
        victims = sorted((r for r in self.running if r.priority > head.priority), key=Request.sort_key)
        while victims and (self.blocks.num_free < need or len(self.running) >= self.config.max_num_seqs):
            victim = victims.pop()
            self._preempt(victim)
            out.preempted.append(victim)

    # ---- after the model ran ----------------------------------------------------------

    def update(self, sched: SchedulerOutput, result: ModelOutput) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for s in sched.scheduled:
            req = s.request
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted or detached while the step ran
            samples = s.samples
            req.num_computed_tokens += s.num_new_tokens
            self.register_computed(req)
            new_prompt_lps = result.prompt_logprobs.get(req.request_id)
            if new_prompt_lps:
                if not req.prompt_logprobs:
                    req.prompt_logprobs.append(None)  # the first prompt token has no context
                req.prompt_logprobs.extend(new_prompt_lps)
            if not samples:
                continue
            tok = result.tokens[req.request_id]
            first = req.num_output_tokens == 0
            req.token_ids.append(tok)
            reason = self._stop_reason(req, tok)
            if req.matcher is not None and reason is None:
                # The mask let only allowed tokens through; a finished grammar ends the answer.
                if not req.matcher.consume_token(tok):
                    reason = FinishReason.ERROR
                elif req.matcher.is_stopped():
                    reason = FinishReason.STOP
            if reason is not None:
                self.finish(req, reason)
            lp = result.logprobs.get(req.request_id)
            out = RequestOutput(req.request_id, [tok], req.num_output_tokens - 1, finished=reason is not None,
                                finish_reason=reason, logprobs=[lp] if lp is not None else None,
                                error="the sampled token does not match the grammar" if reason is FinishReason.ERROR
                                else None)
            if first and req.sampling.prompt_logprobs is not None:
                out.prompt_logprobs = req.prompt_logprobs or [None]
            outputs.append(out)
        return outputs

    def _stop_reason(self, req: Request, tok: int) -> FinishReason | None:
        sp = req.sampling
        if (tok in self.eos_token_ids and not sp.ignore_eos) or tok in sp.stop_token_ids:
            return FinishReason.STOP
        if req.num_output_tokens >= sp.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
