"""Fill the weights cache ahead of time: `python -m engine.weights.warm [MODEL] [DTYPE]`.

`make install` runs it for SmolLM2 in bfloat16 (the workers' default), so that the first start of a
worker reads converted tensors instead of dequantizing the GGUF. It exits 0 even when it could not
warm anything: the cache is a speed-up, workers convert on their own when it is cold.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

from engine.config import DTYPES
from engine.weights import cache as weight_cache
from engine.weights.loader import resolve


def warm(spec: str, dtype: torch.dtype) -> weight_cache.Origin:
    """Convert model `spec` to `dtype` into the cache unless it is there already."""
    source = resolve(spec)
    tensors, origin = weight_cache.load(source.name, source.files, source.tensors, dtype,
                                        converts=source.converts(dtype))
    for _ in tensors:  # a "direct" source converts lazily; nothing to keep
        pass
    return origin


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    spec = argv[0] if argv else "smollm2"
    dtype_name = argv[1] if len(argv) > 1 else "bfloat16"
    t0 = time.perf_counter()
    try:
        if dtype_name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        origin = warm(spec, getattr(torch, dtype_name))
    except Exception as exc:  # noqa: BLE001 - report, never fail the install
        print(f"weights cache not warmed for {spec} ({exc}); workers will convert on first start")
        return 0
    took = time.perf_counter() - t0
    if origin.source == "direct":
        print(f"{spec} {dtype_name}: not cached ({origin.note})")
    elif origin.note:
        print(f"{spec} {dtype_name}: converted in {took:.1f} s but {origin.note}")
    else:
        verb = "already cached" if origin.source == "cache" else f"converted in {took:.1f} s"
        print(f"{spec} {dtype_name} weights {verb}: {origin.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
