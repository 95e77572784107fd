"""Paged KV-cache bookkeeping: which physical block belongs to which owner.

The block manager knows nothing about tensors or models; it only hands out block ids.
An owner is a request id, or a reservation key for an incoming migration.
"""

from __future__ import annotations

from engine.errors import OutOfBlocksError


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Free list plus one block table per owner."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0) -> None:
        if num_blocks < 1:
            raise OutOfBlocksError("the KV cache has no block: raise kv_cache_bytes or num_blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(num_blocks * watermark)
        # Popping from the end hands out low ids first, which keeps tests readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}

    # ---- queries ----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def owners(self) -> list[str]:
        return list(self._tables)

    def table(self, owner: str) -> list[int]:
        return self._tables.get(owner, [])

    def num_owned(self, owner: str) -> int:
        return len(self._tables.get(owner, ()))

    def extra_blocks_needed(self, owner: str, num_tokens: int) -> int:
        return max(0, blocks_for(num_tokens, self.block_size) - self.num_owned(owner))

    def can_grow(self, owner: str, num_tokens: int, keep_watermark: bool = False) -> bool:
        reserve = self.watermark_blocks if keep_watermark else 0
        return self.extra_blocks_needed(owner, num_tokens) <= self.num_free - reserve

    # ---- changes ----------------------------------------------------------------------

    def grow(self, owner: str, num_tokens: int) -> list[int]:
        """Make `owner`'s table cover `num_tokens` tokens; returns the blocks added."""
        need = self.extra_blocks_needed(owner, num_tokens)
        if need > len(self._free):
            raise OutOfBlocksError(f"{owner}: needs {need} blocks, {len(self._free)} free")
        added = [self._free.pop() for _ in range(need)]
        self._tables.setdefault(owner, []).extend(added)
        return added

    def allocate(self, owner: str, num_blocks: int) -> list[int]:
        """Append exactly `num_blocks` blocks to `owner`'s table."""
        if num_blocks > len(self._free):
            raise OutOfBlocksError(f"{owner}: needs {num_blocks} blocks, {len(self._free)} free")
        added = [self._free.pop() for _ in range(num_blocks)]
        self._tables.setdefault(owner, []).extend(added)
        return added

    def free(self, owner: str) -> int:
        """Return all of `owner`'s blocks to the pool; returns how many."""
        blocks = self._tables.pop(owner, [])
        self._free.extend(reversed(blocks))
        return len(blocks)

    def rename(self, old: str, new: str) -> None:
        """Hand a table to a new owner (a reservation becomes a request)."""
        if new in self._tables:
            raise OutOfBlocksError(f"{new} already owns blocks")
        self._tables[new] = self._tables.pop(old, [])

    # ---- integrity --------------------------------------------------------------------

    def check_integrity(self, expected_owners: set[str] | None = None) -> None:
        """Each block is free or owned by exactly one owner, and the counts add up."""
        seen: dict[int, str] = {}
        for b in self._free:
            if b in seen:
                raise AssertionError(f"block {b} is twice in the free list")
            seen[b] = "<free>"
        for owner, table in self._tables.items():
            for b in table:
                if not 0 <= b < self.num_blocks:
                    raise AssertionError(f"{owner} holds out-of-range block {b}")
                if b in seen:
                    raise AssertionError(f"block {b} is held by {owner} and by {seen[b]}")
                seen[b] = owner
        if len(seen) != self.num_blocks:
            raise AssertionError(f"{self.num_blocks - len(seen)} blocks are neither free nor owned (leak)")
        if expected_owners is not None:
            stray = {o for o in self._tables if self._tables[o]} - expected_owners
            if stray:
                raise AssertionError(f"blocks held by unknown owners: {sorted(stray)}")
