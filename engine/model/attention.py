"""Attention over a paged KV cache, in plain PyTorch.

A step's tokens are flattened into one [T, ...] batch: first one token per decoding request,
then the prefill chunks. New keys and values are written into their cache slots; decodes gather
their context from the cache block tables in one batched SDPA call; each prefill chunk attends
to its own fresh keys (first chunk) or to its gathered cached context (later chunks, recompute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.model import paged_decode_cpu


@dataclass
class PrefillChunk:
    q_start: int  # offset of the chunk's first token in the flat batch
    q_len: int
    start_pos: int  # tokens of this request already in the cache before this chunk
    block_table: torch.Tensor | None = None  # needed when start_pos > 0
    mask: torch.Tensor | None = None  # [q_len, start_pos + q_len], additive (0 / -inf), when start_pos > 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of every token
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks]
    decode_context_lens: torch.Tensor | None = None  # [B] keys each decode attends to (position + 1)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size], True = attend; built lazily
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D]: K and V of one layer
    meta: AttentionMetadata,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v)
    if meta.num_decode == num_tokens and not meta.prefills:
        return _decode(q, kv_cache, meta, group)
    out = torch.empty_like(q)
    if meta.num_decode:
        out[: meta.num_decode] = _decode(q[: meta.num_decode], kv_cache, meta, group)
    for p in meta.prefills:
        end = p.q_start + p.q_len
        qp = q[p.q_start : end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if p.start_pos == 0:
            kp = k[p.q_start : end].transpose(0, 1).unsqueeze(0)
            vp = v[p.q_start : end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=group > 1)
        else:
            ctx = p.start_pos + p.q_len
            kp = _gather(k_cache, p.block_table.unsqueeze(0))[:, :, :ctx]
            vp = _gather(v_cache, p.block_table.unsqueeze(0))[:, :, :ctx]
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, enable_gqa=group > 1)
        out[p.q_start : end] = o.squeeze(0).transpose(0, 1)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, KVH, max_blocks * block_size, D] (a view of a copy)."""
    b, nb = block_tables.shape
    _, bs, kvh, d = cache.shape
    # index_select on the flat block axis is several times faster than advanced indexing.
    return cache.index_select(0, block_tables.flatten()).view(b, nb * bs, kvh, d).transpose(1, 2)


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, group: int) -> torch.Tensor:
    if (q.device.type == "cpu" and meta.decode_context_lens is not None
            and paged_decode_cpu.available()):
        # Fused kernel: reads K and V straight from the blocks, no gather copy, no mask.
        return paged_decode_cpu.paged_decode(q, kv_cache, meta.decode_block_tables,
                                             meta.decode_context_lens, q.shape[-1] ** -0.5)
    b, num_heads, d = q.shape
    kvh = num_heads // group
    # One query token per request: fold the query heads of a KV group into the "query length"
    # axis, so grouped-query attention needs no repeat of the keys.
    qd = q.view(b, kvh, group, d)
    # K and V blocks in one gather: [2, B * max_blocks, block_size * KVH * D].
    _, nblocks, bs, _, _ = kv_cache.shape
    tables = meta.decode_block_tables
    kv = kv_cache.view(2, nblocks, -1).index_select(1, tables.flatten())
    kv = kv.view(2, b, tables.shape[1] * bs, kvh, d).transpose(2, 3)  # [2, B, KVH, S, D]
    if meta.decode_mask is None:  # built once per step, shared by the layers
        keys = torch.arange(tables.shape[1] * bs, device=q.device)
        meta.decode_mask = (keys[None, :] < meta.decode_context_lens[:, None]).view(b, 1, 1, -1)
    o = F.scaled_dot_product_attention(qd, kv[0], kv[1], attn_mask=meta.decode_mask)
    return o.reshape(b, num_heads, d)
