"""One block-indexed view over vLLM's KV cache, in the shape kv_transfer expects.

vLLM (CPU, v1) keeps every layer's cache in one backing allocation, as per-layer views
[num_blocks, kv_heads, block_size, 2 * head_dim] laid out one layer after another. kv_transfer
indexes a single tensor on dimension 2 ([layers, 2, blocks, ...] for kvferry's engine), so this
builds [layers, 1, blocks, *per_block] over the same memory: no copy, and block b of every layer
is reached with one index_select / index_copy_ on dimension 2.
"""

from __future__ import annotations

import torch


def unified_kv_view(layer_caches: list[torch.Tensor]) -> torch.Tensor:
    """[layers, 1, blocks, *block] over `layer_caches`; ValueError when they do not share one
    allocation with a constant layer stride (a layout this view cannot express)."""
    if not layer_caches:
        raise ValueError("no KV cache layers")
    first = layer_caches[0]
    storage = first.untyped_storage()
    es = first.element_size()
    for t in layer_caches:
        if t.untyped_storage().data_ptr() != storage.data_ptr():
            raise ValueError("vLLM's KV cache layers do not share one allocation")
        if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype:
            raise ValueError("vLLM's KV cache layers differ in shape, stride or dtype")
    offsets = sorted((t.data_ptr() - storage.data_ptr()) // es for t in layer_caches)
    steps = {b - a for a, b in zip(offsets, offsets[1:])}
    if len(steps) > 1:
        raise ValueError("vLLM's KV cache layers are not evenly spaced")
    layer_stride = steps.pop() if steps else first.numel()
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    flat.set_(storage, 0, (storage.nbytes() // es,), (1,))
    return flat.as_strided((len(layer_caches), 1, *first.shape), (layer_stride, 0, *first.stride()), offsets[0])


def layout_name(view: torch.Tensor) -> str:
    """Names the byte layout of one block, for the migration layout check."""
    return "vllm:" + "x".join(str(d) for d in view.shape[3:])
