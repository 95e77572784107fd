"""kvferry's engine: a paged-KV Llama decoder with continuous batching and migratable requests."""

from engine.config import EngineConfig, ModelConfig
from engine.engine import EngineStats, LLMEngine
from engine.request import FinishReason, RequestOutput, SamplingParams

__all__ = ["EngineConfig", "EngineStats", "FinishReason", "LLMEngine", "ModelConfig", "RequestOutput", "SamplingParams"]
