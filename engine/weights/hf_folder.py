"""Llama models from a Hugging Face style folder: config.json, *.safetensors, tokenizer.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from engine.config import ModelConfig
from engine.errors import ConfigError, WeightsError
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # the tensors need torch, the config and tokenizer (the frontend's) do not
    import torch

_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}  # safetensors -> torch names


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read JSON ({exc})") from exc


def _normalise_rope(cfg: dict) -> dict:
    """transformers >= 5 writes `rope_parameters` (theta and scaling in one dict) instead of the
    older top-level `rope_theta` and `rope_scaling`; map it onto the older keys."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return cfg
    cfg = dict(cfg)
    if "rope_theta" in params:
        cfg.setdefault("rope_theta", params["rope_theta"])
    if cfg.get("rope_scaling") is None and params.get("rope_type", params.get("type", "default")) != "default":
        cfg["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return cfg


class HFFolderModel:
    """A local model folder in Hugging Face's layout."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise WeightsError(f"{self.path}: no config.json (not a model folder)")
        self.raw_config = _read_json(cfg_path)
        try:
            self.config = ModelConfig.from_hf_dict(_normalise_rope(self.raw_config))
        except ConfigError as exc:
            raise WeightsError(f"{cfg_path}: {exc}") from exc
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise WeightsError(f"{self.path}: no *.safetensors weights")
        gen_cfg = self.path / "generation_config.json"
        if gen_cfg.is_file():
            eos = _read_json(gen_cfg).get("eos_token_id")
            if eos is not None:
                ids = tuple(eos) if isinstance(eos, list) else (eos,)
                self.config = ModelConfig(**{**self.config.__dict__, "eos_token_ids": tuple(int(e) for e in ids)})

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        yield name, st.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise WeightsError(f"{f}: corrupt or unreadable safetensors file ({exc})") from exc

    def stored_dtypes(self) -> set[str]:
        """The safetensors dtype names of the stored tensors ("F32", "BF16", ...), headers only."""
        found: set[str] = set()
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    found.update(st.get_slice(name).get_dtype() for name in st.keys())
            except (SafetensorError, OSError) as exc:
                raise WeightsError(f"{f}: corrupt or unreadable safetensors file ({exc})") from exc
        return found

    def converts_to(self, dtype: torch.dtype) -> bool:
        """True when loading in `dtype` casts some tensor (a cast worth caching)."""
        stored = {_TORCH_DTYPES.get(d) for d in self.stored_dtypes()}
        return stored != {str(dtype).removeprefix("torch.")}

    def tokenizer(self) -> Tokenizer | None:
        tok_path = self.path / "tokenizer.json"
        if not tok_path.is_file():
            return None
        try:
            backend = HFTokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise WeightsError(f"{tok_path}: cannot load tokenizer ({exc})") from exc
        tok_cfg_path = self.path / "tokenizer_config.json"
        tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
        template = tok_cfg.get("chat_template")
        jinja = self.path / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return Tokenizer(backend, self.config.eos_token_ids, bos_token_id=self.config.bos_token_id,
                         add_bos=bool(tok_cfg.get("add_bos_token", False)), chat_template=template)
