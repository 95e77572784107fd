"""A model's config and tokenizer as JSON, so the weights cache can skip parsing a GGUF's header
(its 49k-entry vocabulary and merge list take seconds to read through the gguf package)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from engine.config import ModelConfig
from engine.tokenizer import Tokenizer


def describe(config: ModelConfig, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """JSON-able form of `config` and `tokenizer` (inverse: rebuild)."""
    tok = None
    if tokenizer is not None:
        tok = {"backend": tokenizer.backend.to_str(), "eos_token_ids": list(tokenizer.eos_token_ids),
               "bos_token_id": tokenizer.bos_token_id, "add_bos": tokenizer.add_bos,
               "chat_template": tokenizer.chat_template}
    return {"config": dataclasses.asdict(config), "tokenizer": tok}


def rebuild(meta: dict[str, Any]) -> tuple[ModelConfig, Tokenizer | None]:
    """The config and tokenizer `describe` wrote; ValueError when `meta` is not such a document."""
    try:
        cfg = dict(meta["config"])
        cfg["eos_token_ids"] = tuple(cfg["eos_token_ids"])
        config = ModelConfig(**cfg)
        t = meta["tokenizer"]
        tokenizer = None
        if t is not None:
            tokenizer = Tokenizer(HFTokenizer.from_str(t["backend"]), tuple(t["eos_token_ids"]),
                                  bos_token_id=t["bos_token_id"], add_bos=t["add_bos"],
                                  chat_template=t["chat_template"])
    except Exception as exc:  # KeyError, TypeError, ConfigError, tokenizers' bare Exception
        raise ValueError(f"not a model description ({exc!r})") from exc
    return config, tokenizer
