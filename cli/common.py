"""Helpers shared by the commands: argument types and engine construction."""

from __future__ import annotations

import argparse

MODEL_HELP = "tiny (random weights, byte tokenizer), smollm2 (SmolLM2-135M-Instruct GGUF), or a HF folder / .gguf path"


def int_list(text: str) -> list[int]:
    """argparse type for `1,2,3`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser, default_model: str | None = None) -> None:
    if default_model is None:
        p.add_argument("--model", required=True, help=MODEL_HELP)
    else:
        p.add_argument("--model", default=default_model, help=f"{MODEL_HELP} (default: {default_model})")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="weights, activations and KV cache dtype (default: bfloat16)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def build_engine(model: str, dtype: str, device: str, **config):
    """An LLMEngine over real weights; EngineError subclasses propagate to main (exit 2)."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    return LLMEngine.from_model(model, EngineConfig(dtype=dtype, device=device, **config))
