"""`kvferry bench cached-prefill`: what a prefix-cache hit leaves of a prefill, on the real engine.

Three kinds of one-request prefill, each timed from `add_request` until its first token is
sampled (median of --repeat, prompts of random token ids, greedy):
- `new`: a cold prompt of --new tokens (the work a hit leaves, with no context to attend to);
- `cached`: a prompt of --prompt-len tokens whose first --cached tokens (a multiple of the block
  size) another request left in the cache: the engine computes only the rest, attending to all;
- `cold`: a cold prompt of --prompt-len tokens.
`ratio` = cached / new (issue 16's target: at most 1.3 for 2,048 tokens with 1,920 cached) and
`speedup` = cold / cached. Other processes' CPU use during the run is reported, as `bench engine`.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Options:
    """`kvferry bench cached-prefill`'s settings (the flags, same names)."""

    model: str
    dtype: str
    device: str
    prompt_len: int
    cached: int
    repeat: int
    seed: int
    threads: int | None
    json: str | None


def run(opts: Options) -> int:
    import torch

    from bench import UsageError
    from bench.engine import BUSY_CORES, CPUWatch, machine_info
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from engine.request import SamplingParams

    if opts.threads:
        torch.set_num_threads(opts.threads)
    bs = EngineConfig().block_size
    if not 0 < opts.cached < opts.prompt_len or opts.cached % bs:
        raise UsageError(f"--cached must be a positive multiple of the block size ({bs}) below --prompt-len")
    new = opts.prompt_len - opts.cached
    engine = LLMEngine.from_model(opts.model, EngineConfig(dtype=opts.dtype, device=opts.device,
                                                           max_num_batched_tokens=max(2048, opts.prompt_len)))
    if opts.prompt_len + 1 > engine.max_model_len:
        raise UsageError(f"--prompt-len {opts.prompt_len} exceeds the model's context of {engine.max_model_len}")
    rng = random.Random(opts.seed)
    vocab = engine.vocab_size
    ids = iter(range(1 << 30))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    def prefill(prompt: list[int]) -> float:
        t0 = time.perf_counter()
        req = engine.add_request(f"p{next(ids)}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()
        assert req.is_finished
        return (time.perf_counter() - t0) * 1000.0

    info = machine_info()
    print(f"kvferry bench cached-prefill: model {engine.model_name}, {opts.dtype}, {info['cpu_count']} CPUs "
          f"({info['cpu_model']}), torch {info['torch_version']} with {info['torch_threads']} threads", file=sys.stderr)
    for _ in range(2):  # warm-up: allocator, kernels, the first cached-context path
        prefill(tokens(new))
    shared = tokens(opts.cached)
    prefill(shared + tokens(new))  # leaves the shared blocks in the cache
    prefill(shared + tokens(new))
    watch = CPUWatch()
    ms: dict[str, list[float]] = {"new": [], "cached": [], "cold": []}
    hits_before = engine.stats().prefix_hit_tokens
    for _ in range(opts.repeat):  # interleaved, so a slow stretch of the machine hits every kind
        ms["new"].append(prefill(tokens(new)))
        ms["cached"].append(prefill(shared + tokens(new)))
    hit = (engine.stats().prefix_hit_tokens - hits_before) / opts.repeat
    for _ in range(max(1, opts.repeat // 4)):  # the slow one, fewer times
        ms["cold"].append(prefill(tokens(opts.prompt_len)))
    busy = watch.others_cores()
    med = {k: statistics.median(v) for k, v in ms.items()}
    result = {"machine": info, "model": opts.model, "dtype": opts.dtype, "prompt_len": opts.prompt_len,
              "cached": opts.cached, "new": new, "repeat": opts.repeat, "hit_tokens_per_cached_prefill": hit,
              "new_ms": med["new"], "cached_ms": med["cached"], "cold_ms": med["cold"],
              "ratio": med["cached"] / med["new"], "speedup": med["cold"] / med["cached"], "samples_ms": ms,
              "other_processes_cores": busy}
    print(f"{'prefill':<34} {'median ms':>10}")
    print(f"{f'new: {new} cold tokens':<34} {med['new']:>10.1f}")
    print(f"{f'cached: {opts.prompt_len} tokens, {opts.cached} cached':<34} {med['cached']:>10.1f}")
    print(f"{f'cold: {opts.prompt_len} tokens':<34} {med['cold']:>10.1f}")
    print(f"ratio cached / new {result['ratio']:.2f}, speedup cold / cached {result['speedup']:.1f}x "
          f"({hit:.0f} tokens hit per cached prefill)")
    if busy is not None and busy > BUSY_CORES:
        print(f"(WARNING: other processes used {busy:.2f} cores on average: figures disturbed)")
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {opts.json}", file=sys.stderr)
    return 0
