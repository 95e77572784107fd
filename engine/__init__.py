"""kvferry's engine: a paged-KV Llama decoder with continuous batching and migratable requests.

Exports resolve lazily so that light users (`engine.errors` in the CLI) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.config",
    "EngineStats": "engine.engine",
    "LLMEngine": "engine.engine",
    "FinishReason": "engine.request",
    "RequestOutput": "engine.request",
    "SamplingParams": "engine.request",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
