"""kvferry's vLLM KV connector: loads a migrated request's KV instead of recomputing it, and
holds a migrating request's blocks after it leaves the batch.

vLLM builds two instances of a connector: one on the scheduler side, one on the worker side.
kvferry runs vLLM's engine core in the worker process, so both live in one process and share a
`ConnectorState` found by the engine id of the vLLM config (one per `VllmEngine`).

Destination: `VllmEngine` registers a `LoadPlan` (blocks of this cache that already hold the
request's KV: a migration's reservation, or a detached request's own blocks) and adds the
request with all its tokens and `kv_transfer_params={"kvferry_load": key}`.
`get_num_new_matched_tokens` then reports every token with KV in the plan as an external hit,
its partial last block included; only the newest token (never computed anywhere: vLLM needs one
to sample from) is left to compute, as in a decode step. With vLLM's prefix caching on, the
tokens its own cache holds (full blocks of the same tokens and cache salt) are local hits, and
only the plan's blocks after them are copied. `update_state_after_alloc` maps the
plan's blocks onto the ones vLLM allocated, and `start_load_kv` copies them before the forward
pass, one slice copy per run of consecutive block ids.

Source: a request in `ConnectorState.holds` keeps its blocks when it finishes
(`request_finished` returns True) until `VllmEngine.release` frees them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from engine.block_manager import blocks_for
from engine.vllm_backend.kv_view import unified_kv_view

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

LOAD_KEY = "kvferry_load"


@dataclass
class LoadPlan:
    """KV of a request's first `num_tokens` tokens, in `block_ids` of this engine's cache."""

    block_ids: list[int]
    num_tokens: int


@dataclass(frozen=True)
class BlockCopy:
    key: str
    request_id: str  # vLLM's (internal) request id
    src: list[int]
    dst: list[int]
    num_tokens: int  # KV in the request's blocks after the copy
    local_tokens: int = 0  # ... of which vLLM's prefix cache held already (not copied)


@dataclass
class KVFerryMetadata(KVConnectorMetadata):
    copies: list[BlockCopy] = field(default_factory=list)


@dataclass
class ConnectorState:
    """What the two halves of the connector and the engine share (one per engine)."""

    block_size: int = 0
    plans: dict[str, LoadPlan] = field(default_factory=dict)
    holds: set[str] = field(default_factory=set)  # vLLM request ids whose blocks outlive them
    kv: torch.Tensor | None = None  # unified_kv_view of the cache, set by the worker half
    layer_caches: dict[str, torch.Tensor] = field(default_factory=dict)
    done: list[BlockCopy] = field(default_factory=list)  # loads executed, for the engine to settle
    local_hits: dict[str, int] = field(default_factory=dict)
    generator_states: dict[str, bytes] = field(default_factory=dict)  # vLLM request id → state to restore
    runner_requests: dict[str, Any] = field(default_factory=dict)  # the model runner's per-request state
    _pending: list[BlockCopy] = field(default_factory=list)


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the stretches where both id lists count up by one."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


_STATES: dict[str, ConnectorState] = {}
_LOCK = threading.Lock()


def state_for(engine_id: str) -> ConnectorState:
    with _LOCK:
        return _STATES.setdefault(engine_id, ConnectorState())


def drop_state(engine_id: str) -> None:
    with _LOCK:
        _STATES.pop(engine_id, None)


class KVFerryConnector(KVConnectorBase_V1):
    """Block loads and block holds for live migration (see the module docstring)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.state = state_for(str(vllm_config.kv_transfer_config.engine_id))
        self.state.block_size = vllm_config.cache_config.block_size

    # ---- scheduler side ------------------------------------------------------------------------

    def _plan(self, request: "Request") -> tuple[str, LoadPlan] | None:
        params = request.kv_transfer_params or {}
        key = params.get(LOAD_KEY)
        plan = self.state.plans.get(key) if isinstance(key, str) else None
        return None if plan is None else (key, plan)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        found = self._plan(request)
        if found is None:
            return 0, False
        # Never the last token: vLLM computes at least one to sample from.
        available = min(found[1].num_tokens, request.num_tokens - 1)
        self.state.local_hits[request.request_id] = num_computed_tokens
        return max(0, available - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        local = self.state.local_hits.pop(request.request_id, 0)
        found = self._plan(request)
        if found is None:
            return
        key, plan = found
        if num_external_tokens <= 0:  # vLLM's prefix cache held all of it: nothing to copy, but
            # the plan is settled all the same (its blocks freed, the request counted as started)
            self.state._pending.append(BlockCopy(key, request.request_id, [], [], local, local))
            return
        bs = self.state.block_size
        first = local // bs
        n = blocks_for(local + num_external_tokens, bs) - first  # the last block may be partial
        dst = list(blocks.get_block_ids()[0][first:first + n])
        src = plan.block_ids[first:first + n]
        if len(dst) != n or len(src) != n:
            raise RuntimeError(f"kvferry load of {n} blocks for {request.request_id}: "
                               f"{len(src)} source and {len(dst)} destination blocks")
        self.state._pending.append(BlockCopy(key, request.request_id, src, dst, local + num_external_tokens, local))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVFerryMetadata(copies=self.state._pending)
        self.state._pending = []
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return request.request_id in self.state.holds, None

    # ---- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.state.layer_caches = dict(kv_caches)
        self.state.kv = unified_kv_view(list(kv_caches.values()))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVFerryMetadata)
        kv = self.state.kv
        for c in meta.copies:
            if kv is None:
                raise RuntimeError("kvferry connector: no KV cache registered")
            for s0, d0, n in block_runs(c.src, c.dst):  # one pass, no temporary: blocks come in runs
                kv[:, :, d0:d0 + n].copy_(kv[:, :, s0:s0 + n])
            self.state.done.append(c)
        for rid, raw in list(self.state.generator_states.items()):
            cached = self.state.runner_requests.get(rid)
            gen = getattr(cached, "generator", None)
            if gen is not None:  # created by this step's input preparation, not yet sampled from
                gen.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
                del self.state.generator_states[rid]

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None
