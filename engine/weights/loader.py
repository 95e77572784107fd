"""One entry point for model weights: `tiny`, `smollm2`, a Hugging Face folder, or a .gguf file."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from engine.config import ModelConfig
from engine.errors import WeightsError
from engine.model.llama import LlamaForCausalLM
from engine.tokenizer import Tokenizer
from engine.weights import cache as weight_cache
from engine.weights import source_meta, tiny
from engine.weights.gguf_file import GGUFModel
from engine.weights.hf_folder import HFFolderModel
from engine.weights.tokenizer_source import cached_description, smollm2_path

log = logging.getLogger(__name__)

BUILTIN = ("tiny", "smollm2")


@dataclass
class ModelSource:
    """Where a model comes from: its config, a way to read its tensors, and its tokenizer."""

    name: str
    config: ModelConfig
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Tokenizer | None
    # The files the tensors are read from (they key the converted-weights cache; none: not cached).
    files: tuple[Path, ...] = ()
    # Whether loading in a dtype converts anything (GGUF: always, it is dequantized).
    converts: Callable[[torch.dtype], bool] = lambda dtype: True


@dataclass(frozen=True)
class WeightsLoad:
    """How `build_model` got its tensors: from the cache, converted now, or read directly."""

    source: str  # cache | convert | direct
    seconds: float  # reading/converting plus copying into the model
    cache_path: Path | None = None
    note: str = ""


def resolve(spec: str, seed: int = 0) -> ModelSource:
    """Find a model by name or path; raises WeightsError naming what is wrong."""
    if spec == "tiny":
        cfg = tiny.tiny_config()
        return ModelSource("tiny", cfg, lambda: tiny.random_tensors(cfg, seed), tiny.byte_tokenizer())
    if spec == "smollm2":
        return _gguf_source("smollm2", smollm2_path())
    path = Path(spec)
    if path.is_dir():
        folder = HFFolderModel(path)
        return ModelSource(path.name, folder.config, folder.tensors, folder.tokenizer(), tuple(folder.files),
                           folder.converts_to)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path.stem, path)
    raise WeightsError(f"unknown model {spec!r}: expected one of {', '.join(BUILTIN)}, a model folder or a .gguf file")


class _Materialize(TorchFunctionMode):
    """While building a model: parameters are created in `dtype` and not randomly initialised, since
    load_weights overwrites every one. (The meta device skips the init too, but its Python reference
    kernels import torch._dynamo, which alone takes seconds on a busy machine.) Thread-local."""

    _INIT = frozenset({nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.kaiming_uniform_,
                       nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
                       torch.Tensor.uniform_, torch.Tensor.normal_})
    _FACTORIES = frozenset({torch.empty, torch.ones, torch.zeros})

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in self._INIT:
            return args[0] if args else kwargs["tensor"]
        if func in self._FACTORIES and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": self.dtype}
        return func(*args, **kwargs)


def _gguf_source(name: str, path: Path) -> ModelSource:
    """A GGUF model. Its config and tokenizer come from the weights cache when it has them: reading
    the file's header takes seconds, and is then needed only if its tensors are not cached either."""
    files = (path,)
    described = cached_description(name, path)
    if described is not None:
        config, tokenizer = described
        return ModelSource(name, config, lambda: GGUFModel(path).tensors(), tokenizer, files)
    gguf = GGUFModel(path)
    tokenizer = gguf.tokenizer()
    weight_cache.write_meta(name, files, source_meta.describe(gguf.config, tokenizer))
    return ModelSource(name, gguf.config, gguf.tensors, tokenizer, files)


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Instantiate in place (no random init), then load every tensor (converted ones from the weights
    cache when it has them). The model's `weights_load` says how the tensors were obtained."""
    with torch.device(device), _Materialize(dtype):
        model = LlamaForCausalLM(source.config, dtype)
    model = model.to(dtype)  # anything created outside the factories above (a no-op otherwise)
    t0 = time.perf_counter()
    tensors, origin = weight_cache.load(source.name, source.files, source.tensors, dtype,
                                        converts=source.converts(dtype))
    model.load_weights(tensors)
    del tensors  # drop the mapped or converted copies: the parameters hold the values now
    model.weights_load = WeightsLoad(origin.source, time.perf_counter() - t0, origin.path, origin.note)
    model.prepack()
    return model.eval()
