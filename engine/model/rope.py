"""Rotary position embeddings (Hugging Face's half-split layout), with Llama-3 and linear scaling."""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.errors import ConfigError


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables; `tables` gathers a step's rows once, `rotate` applies them."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None, dtype: torch.dtype) -> None:
        super().__init__()
        inv = inverse_frequencies(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        # rotate_half(x) * sin == roll(x, half) * sin_signed, with the first half's sign folded
        # into the table: one roll instead of two slices, a negation and a concatenation.
        sin = emb.sin()
        sin[:, : head_dim // 2] *= -1
        self.register_buffer("sin_signed", sin.to(dtype), persistent=False)
        self.half = head_dim // 2

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin rows for a step's positions, [T, 1, D]: gathered once per step."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, D] (q and k heads together) in Hugging Face's half-split layout."""
        rolled = x.roll(self.half, dims=-1)
        if x.dtype not in (torch.bfloat16, torch.float16):
            return torch.addcmul(x * cos, rolled, sin_signed)
        # bf16/fp16: round like transformers' `q * cos + rotate_half(q) * sin`: each product is
        # rounded to x's dtype, then the sum. addcmul computes rolled * sin + x*cos in float32 and
        # rounds once, which differs by an ulp often enough to flip near-tie greedy tokens.
        return (x * cos).add_(rolled.mul_(sin_signed))
