"""The engine of one instance: request scheduler + block manager + executor (model or sim).

Besides serving (`add_request`, `step`, `abort_request`), it exposes what live migration needs:
export a request's state, read its KV blocks, reserve and write blocks for an incoming request,
commit it into the running batch without any prefill, and detach or release a request.
The engine is single-threaded: its owner serialises calls (the worker runs it on one thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from protocol.kv_hash import namespace_hash, prompt_hashes, root_from_namespace
from engine.block_manager import BlockManager, KvEventBatch, blocks_for
from engine.config import EngineConfig, ModelConfig
from engine.grammar import Grammars
from engine.errors import InvalidRequestError, MigrationError, OutOfBlocksError
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.request import FinishReason, Request, RequestOutput, RequestStatus, SamplingParams, make_generator
from engine.scheduler import Scheduler
from engine.sim.executor import SimExecutor
from engine.sim.latency import LatencyModel
from engine.tokenizer import Tokenizer
from engine.validation import check_new_request
from engine.weights.loader import build_model, resolve
from protocol.payloads import MigratableState

# Byte order of a KV block in kvferry's engine (layers, K/V, positions, kv heads, head dim); a
# MigrateReserve without a layout comes from a worker of this kind.
TORCH_KV_LAYOUT = "kvferry:L2BSHD"


@dataclass
class RequestLoad:
    request_id: str
    status: str
    priority: int
    num_tokens: int
    num_blocks: int


@dataclass(frozen=True)
class MigrationView:
    """What a migration source needs to know about a request between two steps."""

    status: str
    num_tokens: int
    num_computed_tokens: int
    num_preemptions: int
    priority: int
    block_table: tuple[int, ...]


@dataclass
class EngineStats:
    """A load snapshot of the instance, the input of the scheduling policy."""

    num_blocks: int
    num_free_blocks: int
    block_size: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    head_of_line_blocks: int  # blocks the first waiting request needs (0 when none waits)
    requests: list[RequestLoad] = field(default_factory=list)
    # Prefix cache: blocks registered under a content hash (owned or not; unowned ones count as
    # free), and admitted requests' prompt tokens and how many of them were found cached.
    num_cached_blocks: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    # Prompt tokens still to prefill: waiting requests' uncomputed tokens, and the rest of running
    # requests' unfinished (chunked, or recomputing) prefills. Cached blocks a waiting request
    # will reuse are not subtracted (they are looked up at admission).
    queued_prefill_tokens: int = 0


class LLMEngine:
    """One engine instance. Build with `LLMEngine.from_model(...)` or `LLMEngine.sim(...)`."""

    def __init__(self, executor: ModelRunner | SimExecutor, num_blocks: int, config: EngineConfig,
                 max_model_len: int, vocab_size: int, eos_token_ids: tuple[int, ...] = (),
                 model_config: ModelConfig | None = None, tokenizer: Tokenizer | None = None,
                 model_name: str = "") -> None:
        self.config = config
        self.executor = executor
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.device = torch.device(config.device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.watermark)
        self.scheduler = Scheduler(config, self.blocks, max_model_len, eos_token_ids)
        self.requests: dict[str, Request] = {}  # live requests: waiting, running or detached
        self.detached: set[str] = set()  # out of the batch, blocks kept (last stage of a migration)
        self.reservations: set[str] = set()
        # Prefill/decode disaggregation: a prefill instance parks each request once its first token
        # is out (detached, blocks kept) until its hand-off moves it; it never decodes here unless
        # the hand-off cannot happen (`reattach_request` puts it back in the batch).
        self.park_prefilled = False
        self.parked: set[str] = set()
        # Structured output needs the tokenizer's strings (the sim engine has made-up tokens).
        backend = getattr(tokenizer, "backend", None)
        self.grammars = (Grammars(backend.to_str(), vocab_size, tuple(eos_token_ids))
                         if backend is not None and executor.kind != "sim" else None)

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def from_model(cls, model: str, config: EngineConfig | None = None) -> "LLMEngine":
        config = config or EngineConfig()
        source = resolve(model, seed=config.seed)
        cfg = source.config
        dtype, device = config.torch_dtype, torch.device(config.device)
        net = build_model(source, dtype, device)
        max_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        per_block = KVCache.bytes_per_block(cfg, config.block_size, dtype)
        num_blocks = config.num_blocks or max(1, config.kv_cache_bytes // per_block)
        eos = cfg.eos_token_ids or (source.tokenizer.eos_token_ids if source.tokenizer else ())
        runner = ModelRunner(net, cfg, num_blocks, config.block_size, dtype, device, tuple(eos))
        return cls(runner, num_blocks, config, max_len, cfg.vocab_size, eos, cfg, source.tokenizer, source.name)

    @classmethod
    def sim(cls, latency: LatencyModel, config: EngineConfig | None = None, clock: str = "real",
            max_model_len: int = 8192) -> "LLMEngine":
        config = config or EngineConfig()
        num_blocks = config.num_blocks or max(1, latency.kv_capacity_tokens // config.block_size)
        executor = SimExecutor(latency, config.block_size, clock)
        return cls(executor, num_blocks, config, max_model_len, latency.vocab_size, (), model_name=latency.name)

    # ---- serving ----------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams | None = None,
                    priority: int = 0, cache_salt: str = "") -> Request:
        """Queue a request; raises InvalidRequestError naming what is wrong with it. Requests
        share cached KV only with requests of the same `cache_salt` (e.g. one per tenant)."""
        sampling = sampling or SamplingParams()
        check_new_request(request_id, prompt_token_ids, sampling, priority, self.requests, self.max_model_len,
                          self.vocab_size)
        if self.executor.kind == "sim" and (sampling.logprobs is not None or sampling.prompt_logprobs is not None):
            raise InvalidRequestError("logprobs need a model; the sim engine draws made-up tokens")
        prior = sampling.prior_output_tokens
        matcher = self._matcher(sampling, prompt_token_ids[len(prompt_token_ids) - prior:] if prior else [])
        if not self.scheduler.fits_pool(len(prompt_token_ids) + 1):
            raise InvalidRequestError(f"the prompt has {len(prompt_token_ids)} tokens, more than this instance's "
                                      "KV cache holds")
        req = Request(request_id, list(prompt_token_ids), len(prompt_token_ids), sampling, priority=priority,
                      generator=make_generator(sampling, self.device), cache_salt=cache_salt, matcher=matcher)
        req.hash_root = self._hash_root(cache_salt)
        self.requests[request_id] = req
        self.scheduler.add_waiting(req)
        return req

    def _matcher(self, sampling: SamplingParams, replay: list[int]) -> Any:  # noqa: ANN401 - llguidance.LLMatcher
        """The grammar's matcher having consumed `replay` (None without a grammar)."""
        if sampling.grammar is None:
            return None
        if self.grammars is None:
            raise InvalidRequestError("structured output needs a model with a tokenizer (this engine has none)")
        return self.grammars.matcher(sampling.grammar, replay)

    def _park(self, request_id: str) -> None:
        req = self.requests[request_id]
        self.scheduler.detach(req)
        req.status = RequestStatus.WAITING
        self.detached.add(request_id)
        self.parked.add(request_id)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.parked.discard(request_id)
        self.detached.discard(request_id)
        self.scheduler.finish(req, FinishReason.ABORT)
        return RequestOutput(request_id, [], req.num_output_tokens, finished=True, finish_reason=FinishReason.ABORT)

    def _hash_root(self, cache_salt: str) -> int | None:
        if not self.config.prefix_caching:
            return None
        return root_from_namespace(self.kv_namespace, cache_salt)

    @property
    def kv_namespace(self) -> int:
        """The namespace of this engine's block hashes (protocol/kv_hash.py); 0 without prefix
        caching. The seed is in it: it picks a generated model's weights (same name, other KV)."""
        if not self.config.prefix_caching:
            return 0
        return namespace_hash(f"{self.model_name}@{self.config.seed}", self.config.dtype)

    def enable_kv_events(self) -> None:
        """Record which block hashes the prefix cache stores and evicts (see take_kv_events)."""
        self.blocks.enable_events()

    def take_kv_events(self, resync: bool = False) -> KvEventBatch:
        """The cache's changes since the last call (a reset with the whole cache first, and
        whenever `resync` asks for one)."""
        return self.blocks.drain_events(reset=resync)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def is_reserved(self, key: str) -> bool:
        return key in self.reservations

    def is_detached(self, request_id: str) -> bool:
        return request_id in self.detached

    def step(self) -> list[RequestOutput]:
        """Schedule, run one batch, sample; returns the new tokens of each request."""
        sched = self.scheduler.schedule()
        outputs: list[RequestOutput] = []
        for req in sched.preempted:  # a request the cache can never hold ends here
            if req.is_finished:
                self.requests.pop(req.request_id, None)
                outputs.append(RequestOutput(req.request_id, [], req.num_output_tokens, True, req.finish_reason,
                                             error="the KV cache cannot hold this request"))
        if not sched.empty:
            sampled = self.executor.execute(sched, self.blocks.table)
            for out in self.scheduler.update(sched, sampled):
                if out.finished:
                    self.requests.pop(out.request_id, None)
                elif self.park_prefilled and out.first_index == 0 and out.new_token_ids:
                    self._park(out.request_id)
                outputs.append(out)
        if self.config.debug_checks:
            self.check_integrity()
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | None = None) -> list[Request]:
        """Run prompts to completion (offline use: CLI, tests, benchmarks)."""
        reqs: list[Request] = []
        try:
            for i, p in enumerate(prompts):
                reqs.append(self.add_request(f"gen-{id(self)}-{i}", p, sampling))
        except InvalidRequestError:
            for r in reqs:  # all or nothing: leave no half of the batch queued
                self.abort_request(r.request_id)
            raise
        while any(not r.is_finished for r in reqs):
            self.step()
        return reqs

    # ---- load and integrity -------------------------------------------------------------

    def stats(self, per_request: bool = False) -> EngineStats:
        s = self.scheduler
        head = s.waiting[0] if s.waiting else None
        st = EngineStats(
            num_blocks=self.blocks.num_blocks, num_free_blocks=self.blocks.num_free,
            block_size=self.blocks.block_size, num_running=len(s.running), num_waiting=len(s.waiting),
            num_preemptions=s.num_preemptions,
            head_of_line_blocks=blocks_for(head.num_tokens, self.blocks.block_size) if head else 0,
            num_cached_blocks=self.blocks.num_cached, prefix_query_tokens=s.prefix_query_tokens,
            prefix_hit_tokens=s.prefix_hit_tokens, queued_prefill_tokens=s.queued_prefill_tokens(),
        )
        if per_request:
            st.requests = [RequestLoad(r.request_id, r.status.value, r.priority, r.num_tokens,
                                       self.blocks.num_owned(r.request_id)) for r in self.requests.values()]
        return st

    def check_integrity(self) -> None:
        """Blocks: each free or owned once, owners known; requests hold what their state needs."""
        expected = set(self.requests) | self.reservations
        self.blocks.check_integrity(expected)
        for r in self.scheduler.waiting:
            if self.blocks.num_owned(r.request_id):
                raise AssertionError(f"waiting request {r.request_id} holds blocks")
        for r in self.scheduler.running:
            if self.blocks.num_owned(r.request_id) < blocks_for(r.num_computed_tokens, self.blocks.block_size):
                raise AssertionError(f"running request {r.request_id} holds too few blocks")
        live = {r.request_id for r in self.scheduler.running} | {r.request_id for r in self.scheduler.waiting}
        if live | self.detached != set(self.requests):
            raise AssertionError("request registry and queues disagree")

    # ---- migration ----------------------------------------------------------------------

    def _get(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None:
            raise MigrationError(f"no live request {request_id!r}")
        return req

    @property
    def kv_layout(self) -> str:
        """The byte order of a block (layers, k/v, block, slot, head, dim); migrations need equal layouts."""
        return TORCH_KV_LAYOUT

    @property
    def kv_tensor(self) -> torch.Tensor | None:
        """The KV cache [layers, 2, blocks, block_size, kv_heads, head_dim]; None for the sim executor
        (it has no KV data: migrations move bookkeeping only)."""
        kv = getattr(self.executor, "kv", None)
        return None if kv is None else kv.data

    def migration_view(self, request_id: str) -> MigrationView | None:
        """The request's progress and block table; None when it is not here (finished, detached).
        A parked request (awaiting its hand-off) is here, status "waiting"."""
        req = self.requests.get(request_id)
        if req is None or (request_id in self.detached and request_id not in self.parked):
            return None
        return MigrationView(req.status.value, req.num_tokens, req.num_computed_tokens, req.num_preemptions,
                             req.priority, tuple(self.blocks.table(request_id)))

    def export_request(self, request_id: str) -> MigratableState:
        """The request's migratable state (see Request.export_state)."""
        return self._get(request_id).export_state()

    def block_table(self, request_id: str) -> list[int]:
        return list(self.blocks.table(request_id))

    def num_complete_blocks(self, request_id: str) -> int:
        """Blocks whose KV is final: all tokens in them are computed (safe to copy while running)."""
        return self._get(request_id).num_computed_tokens // self.blocks.block_size

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self.executor.read_blocks(block_ids)

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        self.executor.write_blocks(block_ids, blocks)

    def reserve(self, key: str, num_blocks: int) -> list[int]:
        """Add `num_blocks` blocks to the reservation `key` (new or existing); all or nothing."""
        if key in self.requests:
            raise MigrationError(f"{key!r} names a live request")
        if num_blocks > self.blocks.num_free - self.blocks.watermark_blocks:
            raise OutOfBlocksError(f"cannot reserve {num_blocks} blocks: {self.blocks.num_free} free")
        self.reservations.add(key)
        return self.blocks.allocate(key, num_blocks)

    def shareable_prefix(self, request_id: str) -> tuple[list[int], str] | None:
        """A migration source's offer: the tokens of the request's full computed blocks and its
        cache salt (None when this engine does not cache prefixes, or has no such request)."""
        req = self.requests.get(request_id)
        if req is None or not self.config.prefix_caching:
            return None
        bs = self.blocks.block_size
        return list(req.token_ids[:(req.num_computed_tokens // bs) * bs]), req.cache_salt

    def share_cached(self, key: str, token_ids: list[int], cache_salt: str, max_blocks: int) -> list[int]:
        """A migration destination: start reservation `key` with the cached blocks of the longest
        leading run of `token_ids`' full blocks (at most `max_blocks`), hashed with this engine's
        own root, so that only the rest must be sent. Reference-counted like any shared prefix (so
        never evicted while reserved); released or committed with the reservation. Returns them."""
        root = self._hash_root(cache_salt)
        if root is None or max_blocks <= 0 or key in self.requests or self.blocks.num_owned(key):
            return []
        bs = self.blocks.block_size
        found = self.blocks.cached_prefix(prompt_hashes(token_ids[:max_blocks * bs], bs, root))
        # Linking cached blocks nobody holds takes them out of the free count: keep the watermark.
        if found and self.blocks.num_unowned(found) > self.blocks.num_free - self.blocks.watermark_blocks:
            return []
        if found:
            self.blocks.share(key, found)
            self.reservations.add(key)
        return found

    def release(self, key: str) -> int:
        """Free a reservation, or the blocks of a detached request; returns how many blocks."""
        if key in self.detached:
            self.detached.discard(key)
            self.parked.discard(key)
            req = self.requests.pop(key)
            freed = self.blocks.num_owned(key)
            self.scheduler.finish(req, FinishReason.ABORT)
            return freed
        if key in self.requests:  # freeing a queued or running request's blocks would corrupt it
            raise MigrationError(f"{key!r} is a live request, not a reservation; detach it first")
        self.reservations.discard(key)
        return self.blocks.free(key)

    def commit_request(self, state: MigratableState, reservation: str | None) -> Request:
        """Admit a migrated request. Its KV for `num_computed_tokens` tokens must already be in the
        reservation's blocks; it joins the running batch with no prefill (or the queue, if none)."""
        req = Request.from_state(state, self.device)
        if req.request_id in self.requests:
            raise MigrationError(f"request {req.request_id!r} is already here")
        if req.num_tokens > self.max_model_len or any(not 0 <= t < self.vocab_size for t in req.token_ids):
            raise MigrationError("request state does not fit this model")
        try:  # the grammar's state is its output so far: replay it
            req.matcher = self._matcher(req.sampling, req.token_ids[req.num_prompt_tokens -
                                                                  req.sampling.prior_output_tokens:])
        except InvalidRequestError as exc:
            raise MigrationError(f"cannot rebuild the grammar of {req.request_id!r}: {exc}") from exc
        need = blocks_for(req.num_computed_tokens, self.blocks.block_size)
        have = self.blocks.num_owned(reservation) if reservation else 0
        if have < need:
            raise MigrationError(f"reservation holds {have} blocks, the request's KV needs {need}")
        root = self._hash_root(req.cache_salt)
        if reservation is not None:
            self._check_linked(req, self.blocks.table(reservation), root)
            self.blocks.rename(reservation, req.request_id)
            self.reservations.discard(reservation)
        self.requests[req.request_id] = req
        req.hash_root = root
        if req.num_computed_tokens == 0:
            self.blocks.free(req.request_id)
            self.scheduler.add_waiting(req)
        else:
            self.scheduler.register_computed(req)  # the moved KV is reusable here too
            self.scheduler.add_running(req)
        return req

    def _check_linked(self, req: Request, table: list[int], root: int | None) -> None:
        """The cached blocks `share_cached` linked into a reservation must be the leading blocks of
        the committed state's own computed tokens: the offer they were linked for and the state
        come from one source, but a mismatch would continue the request on another prompt's KV."""
        bs = self.blocks.block_size
        linked = [self.blocks.hash_of(b) for b in table]
        k = next((i for i, h in enumerate(linked) if h is None), len(linked))
        if k == 0:
            return
        if any(h is not None for h in linked[k:]) or root is None or k > req.num_computed_tokens // bs:
            raise MigrationError("the reservation's cached blocks are not a prefix of the request's computed blocks")
        if linked[:k] != prompt_hashes(req.token_ids[:k * bs], bs, root):
            raise MigrationError("the reservation's cached blocks hold other tokens than the request's")

    def detach_request(self, request_id: str) -> MigratableState:
        """Take a request out of the batch, keeping its blocks; returns its state."""
        req = self._get(request_id)
        if request_id in self.parked:  # out of the batch already: its hand-off takes it from here
            self.parked.discard(request_id)
            return req.export_state()
        if req.needs_prompt_logprobs and req.num_computed_tokens:
            # The prompt logprobs so far live only here; it can move once its prefill is done.
            raise MigrationError(f"{request_id!r} is computing its prompt logprobs")
        self.scheduler.detach(req)
        req.status = RequestStatus.WAITING
        self.detached.add(request_id)
        return req.export_state()

    def reattach_request(self, request_id: str) -> None:
        """Undo `detach_request` (a migration aborted): the request continues here."""
        if request_id not in self.detached:
            raise MigrationError(f"{request_id!r} is not detached")
        self.detached.discard(request_id)
        self.parked.discard(request_id)
        req = self.requests[request_id]
        if req.num_computed_tokens == 0:
            self.blocks.free(request_id)
            self.scheduler.add_waiting(req)
        else:
            self.scheduler.add_running(req)

    def remove_request(self, request_id: str, keep_blocks: bool = False) -> MigratableState:
        """Take a request out of this engine; with keep_blocks it stays detached for block reads."""
        state = self.detach_request(request_id)
        if not keep_blocks:
            self.release(request_id)
        return state
