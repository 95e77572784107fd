"""Builds the worker's engine from its config (torch model, vLLM, or sim latency profile)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.block_manager import blocks_for
from engine.config import EngineConfig
from engine.engine import TORCH_KV_LAYOUT, LLMEngine  # TORCH_KV_LAYOUT: also the migration code's
from engine.interface import Engine
from services.config import WorkerConfig
from services.log import get_logger

log = get_logger(__name__)

DEFAULT_SIM_PROFILE = "llama7b-a10"
# Model names that stand for a sim profile (a sim worker configured like a torch one still starts).
_SIM_ALIASES = {"smollm2": "smollm2-cpu"}


@dataclass(frozen=True)
class EngineInfo:
    """What the worker announces about its engine when it registers."""

    kind: str  # torch | vllm | sim
    model: str
    total_blocks: int
    block_size: int
    kv_bytes_per_block: int
    kv_layout: str = TORCH_KV_LAYOUT  # byte order of a block; migrations need equal layouts at both ends


def sim_profile_name(model: str) -> str:
    """The latency profile a sim worker uses for `model` (unknown names: the default profile)."""
    from engine.sim.latency import PROFILES

    if model in PROFILES:
        return model
    return _SIM_ALIASES.get(model, DEFAULT_SIM_PROFILE)


def engine_config(wc: WorkerConfig) -> EngineConfig:
    return EngineConfig(block_size=wc.block_size, num_blocks=wc.num_blocks or None,
                        kv_cache_bytes=wc.kv_cache_bytes, max_num_seqs=wc.max_num_seqs,
                        max_num_batched_tokens=wc.max_num_batched_tokens, device=wc.device,
                        dtype=wc.dtype, seed=wc.seed, prefix_caching=wc.prefix_caching)


def _build_torch(wc: WorkerConfig) -> LLMEngine:
    """The torch engine, with one progress line per slow step of a start (kernel, weights, total)."""
    t0 = time.perf_counter()
    who = {"worker_id": wc.resolved_id, "model": wc.model}
    if wc.device.startswith("cpu"):
        from engine.model import paged_decode_cpu

        # Loaded here rather than inside from_model so that its line comes before the weights wait.
        ready = paged_decode_cpu.available()
        log.info("worker.load", step="kernel", ready=ready, seconds=round(time.perf_counter() - t0, 2),
                 **({} if ready else {"fallback": "sdpa"}), **who)
    engine = LLMEngine.from_model(wc.model, engine_config(wc))
    weights = getattr(getattr(engine.executor, "model", None), "weights_load", None)
    if weights is not None:
        extra = {"cache": str(weights.cache_path)} if weights.cache_path else {}
        if weights.note:
            extra["note"] = weights.note
        log.info("worker.load", step="weights", source=weights.source, dtype=wc.dtype,
                 seconds=round(weights.seconds, 2), **extra, **who)
    if engine.grammars is not None:
        # Built now, not on the first structured-output request: llguidance builds its view of the
        # vocabulary holding the GIL (0.3 s for SmolLM2's 49k tokens alone, seconds on a loaded
        # machine), which would silence this worker's heartbeats and Pongs while it serves.
        t1 = time.perf_counter()
        engine.grammars.prepare()
        log.info("worker.load", step="grammar", seconds=round(time.perf_counter() - t1, 2), **who)
    log.info("worker.load", step="engine", seconds=round(time.perf_counter() - t0, 2), **who)
    return engine


def build_engine(wc: WorkerConfig) -> tuple[Engine, EngineInfo]:
    """The engine `wc` describes, and what to announce about it. Engine errors propagate."""
    if wc.threads > 0 and wc.engine != "vllm":
        import torch

        torch.set_num_threads(wc.threads)
    if wc.engine == "sim":
        from engine.sim.latency import PROFILES

        name = sim_profile_name(wc.model)
        if name != wc.model:
            log.info("worker.sim_profile", model=wc.model, profile=name)
        latency = PROFILES[name]
        engine = LLMEngine.sim(latency, engine_config(wc), clock="real")
        kv_bytes = latency.kv_bytes_per_token * wc.block_size
        layout = TORCH_KV_LAYOUT  # no KV data moves: only the bookkeeping, like the torch engine's
    elif wc.engine == "torch":
        from engine.kv_cache import KVCache

        engine = _build_torch(wc)
        assert engine.model_config is not None
        kv_bytes = KVCache.bytes_per_block(engine.model_config, wc.block_size, engine.config.torch_dtype)
        layout = TORCH_KV_LAYOUT
    elif wc.engine == "vllm":
        from engine.vllm_backend.engine import VllmEngine, VllmEngineConfig
        from kv_transfer.base import block_bytes

        block_size = wc.block_size
        if block_size % 32:  # vLLM's CPU attention needs multiples of 32 (the torch default is 16)
            block_size = blocks_for(block_size, 32) * 32
            log.warning("worker.vllm_block_size", configured=wc.block_size, used=block_size)
        engine = VllmEngine(VllmEngineConfig(  # type: ignore[assignment]
            model=wc.model, dtype=wc.dtype, block_size=block_size, num_blocks=wc.num_blocks,
            kv_cache_bytes=wc.kv_cache_bytes, max_num_seqs=wc.max_num_seqs,
            max_num_batched_tokens=wc.max_num_batched_tokens, seed=wc.seed, threads=wc.threads,
            prefix_caching=wc.prefix_caching))
        kv_bytes, layout = block_bytes(engine.kv_tensor), engine.kv_layout
    else:
        raise ValueError(f"unknown engine {wc.engine!r} (torch, vllm or sim)")
    stats = engine.stats()
    return engine, EngineInfo(kind=wc.engine, model=wc.model, total_blocks=stats.num_blocks,
                              block_size=stats.block_size, kv_bytes_per_block=kv_bytes,
                              kv_layout=layout)
