"""Llama-architecture decoder in plain PyTorch (RMSNorm, RoPE, grouped-query attention, SwiGLU).

Projections are fused (q/k/v into one matrix, gate/up into one) to cut per-step operator count;
`load_weights` maps Hugging Face tensor names onto the fused layout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.errors import WeightsError
from engine.model.attention import AttentionMetadata, paged_attention
from engine.model.rope import RotaryEmbedding


def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Linear(nn.Linear):
    """nn.Linear that, once `prepack`ed, runs oneDNN's prepacked bf16 kernel on CPU
    (about 2x faster than the default path for the small batches of decode steps)."""

    packed: torch.Tensor | None = None

    def prepack(self) -> None:
        self.packed = _pack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not _mkldnn_bf16():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


_HALF = (torch.bfloat16, torch.float16)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _HALF:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # bf16/fp16: round where transformers' LlamaRMSNorm rounds. It normalises in float32, casts
        # back to x's dtype, *then* scales by the weight in that dtype (two roundings); F.rms_norm
        # with the weight scales in float32 and rounds once, which moves ~26% of the outputs by an
        # ulp and, on near-tie prompts, flips greedy tokens. F.rms_norm without a weight upcasts
        # internally and is bit-identical to transformers' float32 normalise-and-cast.
        return F.rms_norm(x, self.weight.shape, None, self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, rope_tables: tuple[torch.Tensor, torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # Rotate q and k heads in one go: they are adjacent in the fused projection's output.
        qk = rope.rotate(qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads,
                                                                    self.head_dim), *rope_tables)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, kv_cache, meta)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, rope_tables: tuple[torch.Tensor, torch.Tensor],
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, rope_tables, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """The decoder; `forward` returns hidden states, `compute_logits` the float32 logits."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                    cfg.rope_scaling, dtype)
        self._packed_lm_head: torch.Tensor | None = None

    def prepack(self) -> None:
        """Repack the projection weights for the fastest kernel of this device (after loading)."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.prepack()
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self._packed_lm_head = _pack(head)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """kv_caches: per layer, a [2, blocks, block_size, kv_heads, head_dim] tensor (K and V)."""
        x = self.embed_tokens(input_ids)
        tables = self.rope.tables(positions)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, self.rope, tables, cache, meta)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._packed_lm_head is not None:
            return torch.ops.mkldnn._linear_pointwise(hidden, self._packed_lm_head, None, "none", [], "").float()
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    # ---- weights ----------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face named tensors into the fused parameters; every one must be set."""
        cfg = self.config
        q, kv, inter = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
        fused = {
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
            "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
            "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
            "mlp.up_proj": ("mlp.gate_up_proj", inter, inter),
        }
        params = dict(self.named_parameters())
        filled: dict[str, int] = {n: 0 for n in params}
        for name, tensor in tensors:
            if "rotary_emb" in name:
                continue
            if name.startswith("model."):
                name = name[len("model."):]
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still store the copy
            target, offset, rows = name, None, None
            for src, (dst, off, n) in fused.items():
                if f".{src}." in name:
                    target, offset, rows = name.replace(src, dst), off, n
                    break
            param = params.get(target)
            if param is None:
                raise WeightsError(f"unexpected tensor {name!r} in checkpoint")
            dst = param if offset is None else param[offset : offset + rows]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise WeightsError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            filled[target] += 1 if offset is None else rows
        for n, p in params.items():
            want = p.shape[0] if (".qkv_proj." in n or ".gate_up_proj." in n) else 1
            if filled[n] != want:
                raise WeightsError(f"checkpoint is missing weights for {n!r}")
