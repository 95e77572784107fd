"""Builds the worker's engine from its config (torch model or sim latency profile)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import EngineConfig
from engine.engine import LLMEngine
from services.config import WorkerConfig
from services.log import get_logger

log = get_logger(__name__)

DEFAULT_SIM_PROFILE = "llama7b-a10"
# Model names that stand for a sim profile (a sim worker configured like a torch one still starts).
_SIM_ALIASES = {"smollm2": "smollm2-cpu"}


@dataclass(frozen=True)
class EngineInfo:
    """What the worker announces about its engine when it registers."""

    kind: str  # torch | sim
    model: str
    total_blocks: int
    block_size: int
    kv_bytes_per_block: int


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
                        dtype=wc.dtype, seed=wc.seed)


def build_engine(wc: WorkerConfig) -> tuple[LLMEngine, EngineInfo]:
    """The engine `wc` describes, and what to announce about it. Engine errors propagate."""
    if wc.threads > 0:
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
    elif wc.engine == "torch":
        from engine.kv_cache import KVCache

        engine = LLMEngine.from_model(wc.model, engine_config(wc))
        assert engine.model_config is not None
        kv_bytes = KVCache.bytes_per_block(engine.model_config, wc.block_size, engine.config.torch_dtype)
    else:
        raise ValueError(f"unknown engine {wc.engine!r} (torch or sim)")
    stats = engine.stats()
    return engine, EngineInfo(kind=wc.engine, model=wc.model, total_blocks=stats.num_blocks,
                              block_size=stats.block_size, kv_bytes_per_block=kv_bytes)
