"""The paged KV cache tensors: one [layers, 2, blocks, block_size, kv_heads, head_dim] tensor."""

from __future__ import annotations

import torch

from engine.config import ModelConfig


class KVCache:
    """Preallocated key/value blocks of every layer; block i of every layer belongs together."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # zeros, not empty: touching every page now keeps page faults out of the first steps.
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [self.data[i] for i in range(cfg.num_hidden_layers)]  # [2, blocks, ...] per layer

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return cfg.kv_bytes_per_token(dtype) * block_size

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the blocks: [layers, 2, len(block_ids), block_size, kv_heads, head_dim]."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        return self.data.index_select(2, idx)

    def write_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        expected = (*self.data.shape[:2], len(block_ids), *self.data.shape[3:])
        if tuple(blocks.shape) != expected:
            raise ValueError(f"KV blocks of shape {tuple(blocks.shape)}, expected {expected}")
        self.data.index_copy_(2, idx, blocks.to(device=self.data.device, dtype=self.data.dtype))
