"""`VllmEngine`: vLLM's v1 engine core, in process, behind kvferry's engine interface.

The worker drives it exactly like `engine.engine.LLMEngine`: `add_request`, `step`,
`abort_request`, `stats` for load reports, and the migration calls (`migration_view`,
`kv_tensor`, `reserve`, `detach_request`, `commit_request`, `release`, ...). With
VLLM_ENABLE_V1_MULTIPROCESSING=0 vLLM's engine core runs in this process and each `step` is one
scheduler step plus one forward pass; the worker runs it on its engine thread.

Migration through the KV connector (connector.py):
- source: pre-copy reads complete blocks straight from the cache; `detach_request` aborts the
  request in vLLM with its blocks held by the connector, `release` frees them after the commit;
- destination: `reserve` takes blocks from vLLM's block pool for the incoming KV;
  `commit_request` adds the request with its tokens so far and a load plan over those blocks, so
  vLLM's scheduler counts them as external hits and the connector copies them into the request's
  own blocks before its first forward pass (which computes only the newest token, like a decode
  step); the reservation is freed after that copy. `reattach_request` (an aborted migration) loads from the held blocks.

Limits: vLLM's own tokenizer is not loaded (prompts are token ids; EOS comes from the model's
config); sampling supports kvferry's parameters (temperature, top_p, top_k, seed, stop ids).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.block_manager import KvEventBatch, blocks_for
from engine.engine import EngineStats, MigrationView, RequestLoad
from engine.errors import ConfigError, InvalidRequestError, MigrationError, OutOfBlocksError
from engine.request import (FinishReason, RequestOutput, RequestStatus, SamplingParams, check_version, export_state,
                            sampling_of)
from engine.validation import check_new_request
from engine.vllm_backend.kv_events import VllmKvEvents
from protocol.kv_hash import namespace_hash
from protocol.payloads import Grammar, MigratableState, TokenLogprobs

GiB = 1 << 30
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


def _structured(g: Grammar | None) -> Any:  # noqa: ANN401 - vllm StructuredOutputsParams
    if g is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if g.kind == "json_schema":
        return StructuredOutputsParams(json=g.spec)
    if g.kind == "regex":
        return StructuredOutputsParams(regex=g.spec)
    return StructuredOutputsParams(grammar=g.spec)


def _entry(d: Any, token: int, k: int) -> TokenLogprobs:
    """vLLM's logprobs of one position ({token id: Logprob(logprob, rank, ...)}: the chosen token
    and the top k) as a TokenLogprobs."""
    chosen = d[token]
    top = sorted((lp.rank, int(t), float(lp.logprob)) for t, lp in d.items() if lp.rank is not None and lp.rank <= k)
    return TokenLogprobs(float(chosen.logprob), int(chosen.rank or 1), [t for _, t, _ in top][:k],
                         [v for _, _, v in top][:k])


@dataclass
class VllmEngineConfig:
    """How to start vLLM's engine (the worker's settings that apply to it)."""

    model: str  # an HF folder, or a name our loader exports to one (tiny, smollm2, a .gguf)
    dtype: str = "bfloat16"
    block_size: int = 32  # a multiple of 32 on CPU; one block is the most a migration recomputes
    num_blocks: int = 0  # 0: from kv_cache_bytes
    kv_cache_bytes: int = GiB
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 0  # 0: min(the model's, 8192)
    seed: int = 0
    threads: int = 0
    prefix_caching: bool = True  # vLLM's automatic prefix caching (requests share full blocks by hash)


@dataclass
class VllmRequest:
    """kvferry's record of a request inside vLLM (vLLM knows it by `internal_id`)."""

    request_id: str
    internal_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    priority: int
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0  # before this vLLM request (a migrated one keeps its count)
    preemptions_seen: int = 0  # of this vLLM request, counted into the engine's total
    load_key: str | None = None  # a load plan not yet executed
    loaded_tokens: int = 0  # tokens whose KV the connector loaded instead of computing
    held_tokens: int = 0  # detached: tokens whose KV its held blocks keep
    migrated_computed: int = 0  # a continuation: tokens whose KV was computed before it came here
    recomputed_tokens: int | None = None  # ... of which computed again here (not loaded)
    generator_state: bytes | None = None  # to restore in the first step of a continuation
    cache_salt: str = ""  # shares cached KV only with requests of the same salt
    counted: bool = False  # its prefix-cache lookup is in the engine's totals

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def resolve_model_folder(model: str, seed: int = 0) -> Path:
    """An HF folder vLLM can load: the folder itself, or our loader's model exported to one."""
    p = Path(model).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        return p
    from engine.weights.hf_export import hf_folder_for  # GGUF / tiny → cached HF folder

    return hf_folder_for(model, seed=seed)


def _eos_ids(folder: Path) -> tuple[int, ...]:
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        f = folder / name
        if f.exists():
            v = json.loads(f.read_text()).get("eos_token_id")
            ids += [v] if isinstance(v, int) else [i for i in (v or []) if isinstance(i, int)]
    return tuple(dict.fromkeys(ids))


class VllmEngine:
    """One vLLM engine instance with kvferry's engine interface (see the module docstring)."""

    def __init__(self, config: VllmEngineConfig) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core steps in this thread
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # workers share the machine's cores
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the worker's / CLI's
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if config.block_size % 32:
            raise ConfigError(f"vLLM's CPU backend needs a block size that is a multiple of 32, got {config.block_size}")
        folder = resolve_model_folder(config.model, config.seed)
        hf = json.loads((folder / "config.json").read_text())
        max_len = config.max_model_len or min(int(hf.get("max_position_embeddings", 8192)), 8192)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(config.kv_cache_bytes / GiB)))
        # OpenMP thread counts are per OS thread, and vLLM's CPU attention checks that a step runs
        # with the count its metadata was built with (in this thread, at init): `step` sets the
        # same count in the thread that steps. vLLM replaces torch.set_num_threads during init.
        self._set_threads = torch.set_num_threads
        self._threads = config.threads if config.threads > 0 else torch.get_num_threads()
        self._set_threads(self._threads)
        self._threads_in: set[int] = {threading.get_ident()}

        try:
            from vllm.config import KVEventsConfig, KVTransferConfig
            from vllm.engine.arg_utils import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine as VllmLLMEngine
        except ImportError as exc:
            raise ConfigError(f"vLLM is not installed here ({exc}): `make install-vllm` installs its CPU build") from exc

        from engine.vllm_backend.connector import state_for

        self.engine_id = f"kvferry-{uuid.uuid4().hex[:12]}"
        self.connector = state_for(self.engine_id)
        kv_cfg = KVTransferConfig(kv_connector="KVFerryConnector", kv_role="kv_both", engine_id=self.engine_id,
                                  kv_connector_module_path="engine.vllm_backend.connector")
        from vllm.config import StructuredOutputsConfig

        # The tokenizer only for structured output (llguidance, as the torch engine); ids in and out.
        args = EngineArgs(model=str(folder), dtype=config.dtype, enforce_eager=True,
                          skip_tokenizer_init=not (folder / "tokenizer.json").exists(),
                          structured_outputs_config=StructuredOutputsConfig(backend="guidance"),
                          block_size=config.block_size, max_model_len=max_len, max_num_seqs=config.max_num_seqs,
                          max_num_batched_tokens=config.max_num_batched_tokens,  # chunked prefill beyond
                          enable_prefix_caching=config.prefix_caching, seed=config.seed, disable_log_stats=True,
                          scheduling_policy="priority", kv_transfer_config=kv_cfg,
                          disable_hybrid_kv_cache_manager=True,
                          # vLLM records its prefix cache's stores and evictions; the "null" publisher
                          # is replaced below by VllmKvEvents, which re-hashes them for the scheduler.
                          kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null")
                          if config.prefix_caching else None,
                          num_gpu_blocks_override=(config.num_blocks + 1) if config.num_blocks else None)
        self.config = config
        self.model_name = config.model
        self.max_model_len = max_len
        self.vocab_size = int(hf["vocab_size"])
        self.eos_token_ids = _eos_ids(folder)
        self._llm = VllmLLMEngine.from_engine_args(args)
        core = self._llm.engine_core.engine_core
        self._scheduler = core.scheduler  # vLLM's own: the worker asks num_waiting() etc.
        self._pool = self._scheduler.kv_cache_manager.block_pool
        self._kv_events = VllmKvEvents(self.kv_namespace, config.block_size, max_pending=4 * self._pool.num_gpu_blocks)
        if config.prefix_caching:
            self._scheduler.kv_event_publisher = self._kv_events
        runner = core.model_executor.driver_worker.worker.model_runner
        self.block_size = config.block_size
        if self.connector.kv is None:
            raise ConfigError("vLLM did not register its KV cache with the kvferry connector "
                              "(one vLLM engine per process: its KV-transfer group is process-global)")
        self.requests: dict[str, VllmRequest] = {}  # live: waiting, running or detached
        self.detached: set[str] = set()
        self.reservations: dict[str, list[Any]] = {}  # key → vLLM KVCacheBlocks taken from the pool
        self._by_internal: dict[str, VllmRequest] = {}
        self._held: dict[str, list[int]] = {}  # detached request id → its held block ids
        self._held_requests: dict[str, str] = {}  # load key → vLLM id of the detached request it reads
        self.num_preemptions = 0  # preemptions seen since start (vLLM recomputes a preempted request)
        # Continuations (migrated in, or reattached) that started: KV tokens loaded vs computed again.
        self.migrated_in = self.loaded_tokens_total = self.recomputed_tokens_total = self.max_recomputed_tokens = 0
        # New requests' prompt tokens, and how many vLLM found in its prefix cache (continuations
        # are not counted: their KV comes from the migration, see kv_load_counters).
        self.prefix_query_tokens = self.prefix_hit_tokens = 0
        # Continuations: tokens of their KV vLLM found cached here (not loaded from the migration).
        self.local_hit_tokens_total = 0
        self.connector.runner_requests = getattr(runner, "requests", {})  # per-request sampler state

    # ---- KV events (engine.interface.KvEventSource): the scheduler's prefix index ----------------

    @property
    def kv_namespace(self) -> int:
        """The namespace of the block hashes this worker reports (0: prefix caching off). The same
        formula as the torch engine's: a request's hashes do not depend on which engine kind
        serves it, only on the model, its seed and the dtype."""
        if not self.config.prefix_caching:
            return 0
        return namespace_hash(f"{self.model_name}@{self.config.seed}", self.config.dtype)

    def enable_kv_events(self) -> None:
        self._kv_events.enable()

    def take_kv_events(self, resync: bool = False) -> KvEventBatch:
        return self._kv_events.take(resync)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """kvferry's tokenizer of the model (vLLM's own is not loaded: prompts are token ids)."""
        from engine.weights.loader import resolve

        return resolve(self.config.model).tokenizer

    # ---- serving ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams | None = None,
                    priority: int = 0, cache_salt: str = "") -> VllmRequest:
        sampling = sampling or SamplingParams()
        ids = list(prompt_token_ids)
        check_new_request(request_id, ids, sampling, priority, self.requests, self.max_model_len, self.vocab_size)
        if blocks_for(len(ids) + 1, self.block_size) > self.num_blocks:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens, more than this instance's KV cache holds")
        if sampling.prior_output_tokens and self._counts_output_only(sampling):
            raise InvalidRequestError("vLLM workers cannot continue a request with presence or frequency penalties "
                                      "or a grammar (vLLM counts only its own output)")
        rec = VllmRequest(request_id, "", ids, len(ids), sampling, priority, cache_salt=cache_salt)
        self._submit(rec)
        return rec

    def _vllm_sampling(self, rec: VllmRequest, load_key: str | None) -> Any:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        s = rec.sampling
        left = min(s.max_tokens - rec.num_output_tokens, self.max_model_len - rec.num_tokens)
        stop = list(s.stop_token_ids) + ([] if s.ignore_eos else list(self.eos_token_ids))
        extra = {"kv_transfer_params": {"kvferry_load": load_key}} if load_key else None
        done = rec.num_output_tokens + s.prior_output_tokens  # output generated before this vLLM request
        return VSP(max_tokens=max(1, left), temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0,
                   seed=s.seed, stop_token_ids=stop or None, ignore_eos=True, detokenize=False,
                   output_kind=RequestOutputKind.DELTA, extra_args=extra,
                   presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                   repetition_penalty=s.repetition_penalty, min_p=s.min_p,
                   logit_bias=dict(s.logit_bias) or None, min_tokens=max(0, s.min_tokens - done),
                   logprobs=s.logprobs,
                   prompt_logprobs=s.prompt_logprobs if rec.num_output_tokens == 0 else None,
                   structured_outputs=_structured(s.grammar))

    @staticmethod
    def _counts_output_only(s: SamplingParams) -> bool:
        """vLLM's presence and frequency penalties count the output of its own request, and its
        grammar starts at that request's first output token: one that continues a request
        (migrated, reattached, resumed) would forget the earlier output."""
        return bool(s.presence_penalty or s.frequency_penalty or s.grammar is not None)

    def _submit(self, rec: VllmRequest, load_key: str | None = None) -> None:
        """Hand `rec` (its tokens so far) to vLLM, loading `load_key`'s KV if given."""
        params = self._vllm_sampling(rec, load_key)
        prompt: dict[str, Any] = {"prompt_token_ids": list(rec.token_ids)}
        if rec.cache_salt and self.config.prefix_caching:
            prompt["cache_salt"] = rec.cache_salt  # vLLM mixes it into the first block's hash
        try:
            rec.internal_id = self._llm.add_request(rec.request_id, prompt, params, priority=rec.priority)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"vLLM refused the request: {exc}") from exc
        rec.load_key = load_key
        rec.status = RequestStatus.WAITING
        rec.preemptions_seen = 0  # a new vLLM request counts from 0
        if rec.generator_state is not None and rec.sampling.seed is not None:
            # vLLM keeps a generator only for seeded requests; the continuation samples on from
            # the source's state (set by the connector before its first forward pass).
            self.connector.generator_states[rec.internal_id] = rec.generator_state
        self.requests[rec.request_id] = rec
        self._by_internal[rec.internal_id] = rec

    def abort_request(self, request_id: str) -> RequestOutput | None:
        rec = self.requests.get(request_id)
        if rec is None:
            return None
        if request_id in self.detached:
            self.release(request_id)
        else:
            self._llm.abort_request([request_id])
            self._forget(rec)
        return RequestOutput(request_id, [], rec.num_output_tokens, finished=True, finish_reason=FinishReason.ABORT)

    def _forget(self, rec: VllmRequest) -> None:
        self.requests.pop(rec.request_id, None)
        self._by_internal.pop(rec.internal_id, None)
        self.connector.generator_states.pop(rec.internal_id, None)
        self.connector.local_hits.pop(rec.internal_id, None)
        if rec.load_key is not None:  # its load never ran: free what it would have loaded from
            self._settle_load(rec.load_key)
            rec.load_key = None

    def step(self) -> list[RequestOutput]:
        if threading.get_ident() not in self._threads_in:
            self._set_threads(self._threads)
            self._threads_in.add(threading.get_ident())
        outs = self._llm.step()
        results: list[RequestOutput] = []
        for o in outs:
            rec = self.requests.get(o.request_id)
            if rec is None or rec.request_id in self.detached:
                continue
            c = o.outputs[0]
            if not rec.counted:  # its first output: vLLM's prefix-cache lookup is done
                rec.counted = True
                if not rec.migrated_computed:
                    self.prefix_query_tokens += rec.num_tokens
                    self.prefix_hit_tokens += int(getattr(o, "num_cached_tokens", 0) or 0)
            new = [int(t) for t in c.token_ids]
            first = rec.num_output_tokens
            rec.token_ids += new
            reason = _FINISH.get(str(c.finish_reason)) if o.finished else None
            if o.finished and reason is None:
                reason = FinishReason.ERROR
            out = RequestOutput(rec.request_id, new, first, finished=o.finished, finish_reason=reason)
            k = rec.sampling.logprobs
            if k is not None and new:
                out.logprobs = [_entry(d, t, k) for d, t in zip(c.logprobs or (), new)]
                if len(out.logprobs) != len(new):
                    out.logprobs = None
                    out.error = "vLLM returned no logprobs"
            pk = rec.sampling.prompt_logprobs
            if pk is not None and first == 0 and new:
                plps = getattr(o, "prompt_logprobs", None) or [None]
                out.prompt_logprobs = [None if d is None or i == 0 else _entry(d, rec.token_ids[i], pk)
                                       for i, d in enumerate(plps)]
            results.append(out)
            if o.finished:
                self._forget(rec)
        self._after_step()
        return results

    def _after_step(self) -> None:
        st = self.connector
        while st.done:
            c = st.done.pop()
            rec = self._by_internal.get(c.request_id)
            if rec is not None:
                rec.loaded_tokens = c.num_tokens
                rec.load_key = None
                self.local_hit_tokens_total += c.local_tokens
            self._settle_load(c.key)
        for rec in self.requests.values():
            if rec.request_id in self.detached:
                continue
            v = self._scheduler.requests.get(rec.internal_id)
            if v is None:
                continue
            seen = int(getattr(v, "num_preemptions", 0))
            if seen > rec.preemptions_seen:  # vLLM preempted it (recompute) since the last step
                self.num_preemptions += seen - rec.preemptions_seen
                rec.preemptions_seen = seen
            running = v.status.name == "RUNNING"
            if running and rec.recomputed_tokens is None and rec.migrated_computed:
                rec.recomputed_tokens = rec.migrated_computed - rec.loaded_tokens
                self.migrated_in += 1
                self.loaded_tokens_total += rec.loaded_tokens
                self.recomputed_tokens_total += rec.recomputed_tokens
                self.max_recomputed_tokens = max(self.max_recomputed_tokens, rec.recomputed_tokens)
            rec.status = RequestStatus.RUNNING if running else RequestStatus.WAITING

    def num_waiting(self) -> int:
        return len(self._scheduler.waiting)

    def is_reserved(self, key: str) -> bool:
        return key in self.reservations

    def is_detached(self, request_id: str) -> bool:
        return request_id in self.detached

    def has_unfinished_requests(self) -> bool:
        return self._scheduler.has_unfinished_requests() or bool(self._scheduler.finished_req_ids)

    # ---- load -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._pool.num_gpu_blocks - 1  # block 0 is vLLM's null block

    def stats(self, per_request: bool = False) -> EngineStats:
        s = self._scheduler
        head = next(iter(s.waiting), None)
        st = EngineStats(num_blocks=self.num_blocks, num_free_blocks=self._pool.get_num_free_blocks(),
                         block_size=self.block_size, num_running=len(s.running), num_waiting=len(s.waiting),
                         num_preemptions=self.num_preemptions,
                         head_of_line_blocks=blocks_for(head.num_tokens, self.block_size) if head is not None else 0,
                         num_cached_blocks=len(self._pool.cached_block_hash_to_block),
                         prefix_query_tokens=self.prefix_query_tokens, prefix_hit_tokens=self.prefix_hit_tokens)
        if per_request:
            st.requests = [RequestLoad(r.request_id, r.status.value, r.priority, r.num_tokens,
                                       len(self._block_table(r))) for r in self.requests.values()]
        return st

    def check_integrity(self) -> None:
        """Every live request is known to vLLM, and each block is free (cached or not) or held by
        as many users as its reference count says: requests (running, waiting or detached; with
        prefix caching several share a cached block), reservations, and detached requests being
        reattached. Held and free blocks add up to the pool."""
        for rec in self.requests.values():
            if rec.internal_id not in self._scheduler.requests:
                raise AssertionError(f"request {rec.request_id} is not in vLLM's scheduler")
        users: dict[int, int] = {}
        held = [b for r in self.requests.values() for b in self._block_table(r)]
        held += [b.block_id for blocks in self.reservations.values() for b in blocks]
        held += [b for key in self._held_requests for b in self.connector.plans[key].block_ids]
        for b in held:
            users[b] = users.get(b, 0) + 1
        wrong = {b: (n, self._pool.blocks[b].ref_cnt) for b, n in users.items() if self._pool.blocks[b].ref_cnt != n}
        if wrong:
            raise AssertionError(f"blocks whose users differ from their reference count (users, ref_cnt): {wrong}")
        if len(users) + self._pool.get_num_free_blocks() != self.num_blocks:
            raise AssertionError(f"{len(users)} blocks held + {self._pool.get_num_free_blocks()} free != {self.num_blocks}")

    # ---- migration: source ----------------------------------------------------------------------

    @property
    def kv_tensor(self) -> torch.Tensor:
        """[layers, 1, blocks, kv_heads, block_size, 2 * head_dim] over vLLM's cache (kv_view.py)."""
        assert self.connector.kv is not None
        return self.connector.kv

    @property
    def kv_layout(self) -> str:
        from engine.vllm_backend.kv_view import layout_name

        return layout_name(self.kv_tensor)

    def _block_table(self, rec: VllmRequest) -> list[int]:
        if rec.request_id in self._held:
            return self._held[rec.request_id]
        if rec.internal_id not in self._scheduler.requests:
            return []
        return list(self._scheduler.kv_cache_manager.get_block_ids(rec.internal_id)[0])

    def _live(self, request_id: str) -> tuple[VllmRequest, Any]:
        rec = self.requests.get(request_id)
        v = None if rec is None or request_id in self.detached else self._scheduler.requests.get(rec.internal_id)
        if rec is None or v is None:
            raise MigrationError(f"no live request {request_id!r}")
        return rec, v

    def migration_view(self, request_id: str) -> MigrationView | None:
        try:
            rec, v = self._live(request_id)
        except MigrationError:
            return None
        # A continuation whose load has not run yet has nothing computed of its own.
        computed = 0 if rec.load_key is not None else int(v.num_computed_tokens)
        return MigrationView(rec.status.value, rec.num_tokens, computed,
                             rec.num_preemptions + int(getattr(v, "num_preemptions", 0)), rec.priority,
                             tuple(self._block_table(rec)) if computed else ())

    def block_table(self, request_id: str) -> list[int]:
        rec = self.requests.get(request_id)
        if rec is None:
            raise MigrationError(f"no live request {request_id!r}")
        return self._block_table(rec)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        idx = torch.tensor(block_ids, dtype=torch.long)
        return self.kv_tensor.index_select(2, idx)

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long)
        self.kv_tensor.index_copy_(2, idx, blocks.to(self.kv_tensor.dtype))

    def _state(self, rec: VllmRequest, computed: int) -> MigratableState:
        return export_state(rec.request_id, rec.token_ids, rec.num_prompt_tokens, computed, rec.sampling,
                            rec.priority, rec.num_preemptions, rec.arrival_time, self._generator_state(rec),
                            cache_salt=rec.cache_salt)

    def _generator_state(self, rec: VllmRequest) -> bytes | None:
        cached = self.connector.runner_requests.get(rec.internal_id)
        gen = getattr(cached, "generator", None)
        return bytes(gen.get_state().numpy().tobytes()) if gen is not None else None

    def detach_request(self, request_id: str) -> MigratableState:
        """Out of vLLM's batch with its blocks held (the connector delays their free)."""
        rec, v = self._live(request_id)
        if rec.load_key is not None:
            raise MigrationError(f"{request_id!r} has not started here yet")
        if self._counts_output_only(rec.sampling):
            raise MigrationError(f"{request_id!r} has presence/frequency penalties or a grammar, which vLLM would "
                                 "reset")
        computed = int(v.num_computed_tokens)
        if computed and rec.sampling.prompt_logprobs is not None and rec.num_output_tokens == 0:
            raise MigrationError(f"{request_id!r} is computing its prompt logprobs")
        held = self._block_table(rec)
        rec.num_preemptions += int(getattr(v, "num_preemptions", 0))  # the state carries them on
        state = self._state(rec, computed)
        self.connector.holds.add(rec.internal_id)
        self._llm.abort_request([request_id])
        self._held[request_id] = held
        self.detached.add(request_id)
        rec.status = RequestStatus.WAITING
        rec.generator_state = state.generator_state
        rec.held_tokens = computed  # what its held blocks cover (for a reattach)
        return state

    def reattach_request(self, request_id: str) -> None:
        """Undo `detach_request`: the request continues here, its KV loaded from the held blocks."""
        if request_id not in self.detached:
            raise MigrationError(f"{request_id!r} is not detached")
        rec = self.requests[request_id]
        old = rec.internal_id
        key = f"held:{old}"
        self.connector.plans[key] = _plan(self._held.pop(request_id), rec.held_tokens)
        self._held_requests[key] = old
        rec.migrated_computed, rec.recomputed_tokens, rec.loaded_tokens = rec.held_tokens, None, 0
        self.detached.discard(request_id)
        self._by_internal.pop(old, None)
        self._submit(rec, key)

    # ---- migration: destination -------------------------------------------------------------------

    def reserve(self, key: str, num_blocks: int) -> list[int]:
        """Take `num_blocks` more blocks from vLLM's pool for reservation `key`. The commit
        allocates the request's own blocks while these are held, so room for both is required."""
        if key in self.requests:
            raise MigrationError(f"{key!r} names a live request")
        have = len(self.reservations.get(key, ()))
        free = self._pool.get_num_free_blocks()
        if num_blocks + (have + num_blocks + 1) > free:
            raise OutOfBlocksError(f"cannot reserve {num_blocks} blocks: {free} free, and the commit needs as many again")
        blocks = self._pool.get_new_blocks(num_blocks)
        self.reservations.setdefault(key, []).extend(blocks)
        return [b.block_id for b in blocks]

    def release(self, key: str) -> int:
        """Free a reservation, or the held blocks of a detached request; returns how many blocks."""
        if key in self.detached:
            rec = self.requests.pop(key)
            self.detached.discard(key)
            held = self._held.pop(key, [])
            self._free_held(rec.internal_id)
            self._by_internal.pop(rec.internal_id, None)
            return len(held)
        if key in self.requests:
            raise MigrationError(f"{key!r} is a live request, not a reservation; detach it first")
        blocks = self.reservations.pop(key, [])
        if self.connector.plans.pop(key, None) is not None:
            for rec in self.requests.values():  # a pending load from it would read freed blocks
                if rec.load_key == key:
                    rec.load_key = None
        if blocks:
            self._pool.free_blocks(blocks)
        return len(blocks)

    def _free_held(self, internal_id: str) -> None:
        self.connector.holds.discard(internal_id)
        req = self._scheduler.requests.get(internal_id)
        if req is not None and req.is_finished():
            self._scheduler._free_blocks(req)  # what vLLM does once a delayed free completes

    def commit_request(self, state: MigratableState, reservation: str | None) -> VllmRequest:
        """Admit a migrated request: its KV for `num_computed_tokens` tokens is in the
        reservation's blocks; vLLM loads it through the connector and computes the rest."""
        try:
            check_version(state)
            rec = VllmRequest(state.request_id, "", list(state.token_ids), state.num_prompt_tokens,
                              sampling_of(state), state.priority, time.monotonic() - state.age_s,
                              num_preemptions=state.num_preemptions, generator_state=state.generator_state,
                              cache_salt=state.cache_salt)
            computed = state.num_computed_tokens
            rec.migrated_computed = computed
        except MigrationError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise MigrationError(f"invalid request state: {exc!r}") from exc
        if rec.request_id in self.requests:
            raise MigrationError(f"request {rec.request_id!r} is already here")
        if rec.num_tokens >= self.max_model_len or any(not 0 <= t < self.vocab_size for t in rec.token_ids):
            raise MigrationError("request state does not fit this model")
        if not 0 <= computed < rec.num_tokens or rec.num_prompt_tokens > rec.num_tokens:
            raise MigrationError("request state has inconsistent token counts")
        key = None
        if reservation is not None and computed > 0:
            blocks = self.reservations.get(reservation, [])
            need = blocks_for(computed, self.block_size)
            if len(blocks) < need:
                raise MigrationError(f"reservation holds {len(blocks)} blocks, the request's KV needs {need}")
            self.connector.plans[reservation] = _plan([b.block_id for b in blocks], computed)
            key = reservation
        try:
            self._submit(rec, key)
        except InvalidRequestError as exc:
            if key is not None:
                self.connector.plans.pop(key, None)
            raise MigrationError(str(exc)) from exc
        if key is None and reservation is not None:
            self.release(reservation)
        return rec

    def _settle_load(self, key: str) -> None:
        """A load plan ran (or can no longer run): free the blocks it read from."""
        self.connector.plans.pop(key, None)
        if key in self.reservations:
            self._pool.free_blocks(self.reservations.pop(key))
        elif key in self._held_requests:
            self._free_held(self._held_requests.pop(key))

    def kv_load_counters(self) -> dict[str, int]:
        """Totals over continuations that started here (for the worker's /metrics)."""
        return {"continuations": self.migrated_in, "loaded_tokens": self.loaded_tokens_total,
                "recomputed_tokens": self.recomputed_tokens_total, "max_recomputed_tokens": self.max_recomputed_tokens,
                "local_hit_tokens": self.local_hit_tokens_total}

    def shutdown(self) -> None:
        from engine.vllm_backend.connector import drop_state

        with contextlib.suppress(Exception):
            self._llm.engine_core.shutdown()
        drop_state(self.engine_id)


def _plan(block_ids: list[int], num_tokens: int) -> Any:
    from engine.vllm_backend.connector import LoadPlan

    return LoadPlan(list(block_ids), num_tokens)
