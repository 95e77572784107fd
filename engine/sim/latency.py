"""Step-time models for the sim executor: how long one engine step takes, with no model.

step = base + per_seq * batch + per_prefill_token * prefill_tokens + per_context_token * context_tokens

Three profiles:
- `llama7b-a10`: LLaMA-7B in fp16 on one A10 (24 GB), the paper's setup. Derived from the A10's
  data sheet (600 GB/s memory, 125 TFLOP/s dense fp16 tensor) with achieved fractions typical of
  vLLM on that card: a decode step streams the 13.5 GB of weights (~23 ms at ~95 % of peak
  bandwidth plus ~4 ms of launch overhead), prefill runs at ~70 TFLOP/s, i.e. 14 GFLOP per token
  ~ 0.2 ms/token, and attention reads 0.5 MB of KV per context token (~0.9 us at 560 GB/s).
  KV capacity: 24 GB x 0.9 - 13.5 GB weights - ~1 GB activations ~ 7 GB ~ 14,000 tokens.
- `smollm2-cpu`: fitted by `kvferry bench engine --model smollm2 --dtype bfloat16 --fit` (least
  squares on relative error over 331 timed steps: decode at batch 1-64 and context 64-1536, prefill
  of 32-2048 tokens; median error 5 %, max 21 %) from this engine serving SmolLM2-135M in bfloat16
  on a 2-core AMD EPYC VM with torch 2.13.0+cpu (figures in the README). KV: 30 layers x 3 KV
  heads x 64 x 2 (K, V) x 2 bytes = 23,040 bytes/token; capacity is the engine's default 1 GiB
  cache (46,592 tokens in 16-token blocks). On a shared 2-core machine expect +-30 % run to run.
- `instant`: no model at all, for benchmarking the serving path (`kvferry bench frontend`): every
  step sleeps a flat 1 ms (so a busy worker does not spin a core, and 64 running sequences still
  give 64,000 tokens/s per worker), huge KV capacity, and a 256-token vocabulary (byte tokens of
  the `tiny` tokenizer the frontend uses with sim workers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LatencyModel:
    """A linear step-time model plus the instance's KV capacity, for one model on one device."""

    name: str
    base_ms: float
    per_seq_ms: float
    per_prefill_token_ms: float
    per_context_token_ms: float
    kv_capacity_tokens: int
    kv_bytes_per_token: int
    vocab_size: int = 32000

    def step_seconds(self, batch_size: int, prefill_tokens: int, context_tokens: int) -> float:
        ms = (self.base_ms + self.per_seq_ms * batch_size + self.per_prefill_token_ms * prefill_tokens
              + self.per_context_token_ms * context_tokens)
        return ms / 1000.0

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


LLAMA7B_A10 = LatencyModel(
    name="llama7b-a10", base_ms=27.0, per_seq_ms=0.15, per_prefill_token_ms=0.20,
    per_context_token_ms=0.0009, kv_capacity_tokens=14000, kv_bytes_per_token=524288, vocab_size=32000,
)

SMOLLM2_CPU = LatencyModel(
    name="smollm2-cpu", base_ms=20.2, per_seq_ms=1.53, per_prefill_token_ms=0.88,
    per_context_token_ms=0.00563, kv_capacity_tokens=46592, kv_bytes_per_token=23040, vocab_size=49152,
)

INSTANT = LatencyModel(
    name="instant", base_ms=1.0, per_seq_ms=0.0, per_prefill_token_ms=0.0,
    per_context_token_ms=0.0, kv_capacity_tokens=1 << 22, kv_bytes_per_token=16, vocab_size=256,
)

PROFILES: dict[str, LatencyModel] = {m.name: m for m in (LLAMA7B_A10, SMOLLM2_CPU, INSTANT)}
