"""Paged KV-cache bookkeeping: which physical block belongs to which owner, and which full blocks
are cached for reuse.

The block manager knows nothing about tensors or models; it only hands out block ids.
An owner is a request id, or a reservation key for an incoming migration.

Prefix caching (design §4): a full block whose KV is computed can be registered under its content
hash (engine/block_hash.py). A later request whose prompt starts with the same blocks shares them
(`share`): blocks are reference-counted, and one shared by k owners is in k tables. A registered
block whose last owner lets go stays cached, ready for reuse, until its memory is needed: it then
counts as free, and allocation takes truly free blocks first, then the least recently released
cached ones (evicting their hash). Only full blocks are ever shared, and an owner only writes
blocks past its computed tokens, so a shared block is never written.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.errors import OutOfBlocksError


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


@dataclass
class KvEventBatch:
    """What changed in the cache since the last batch, as net effects: hashes now cached
    (`stored`) and hashes no longer cached (`removed`). With `reset`, `stored` is every cached
    hash and the receiver forgets what it knew first (after an overflow of the pending events)."""

    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    reset: bool = False

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed or self.reset)


class KvEventLog:
    """The net KV events since the last `take`: hash → stored (True) or removed (False). Off until
    `enable`; the first take after it, and the first after more than `max_pending` changes piled
    up (or an `overflow()`), is a reset with the whole cache."""

    def __init__(self, max_pending: int) -> None:
        self._pending: dict[int, bool] | None = None
        self._max_pending = max_pending
        self._overflow = False

    def enable(self) -> None:
        if self._pending is None:
            self._pending = {}
            self._overflow = True

    def overflow(self) -> None:
        """The receiver must get the whole cache next (e.g. it was cleared)."""
        self._overflow = True

    def note(self, h: int, stored: bool) -> None:
        p = self._pending
        if p is None or self._overflow:
            return
        p[h] = stored
        if len(p) > self._max_pending:
            self._overflow = True  # the cache changed too much: resend it whole
            p.clear()

    def take(self, cached: Callable[[], list[int]], reset: bool = False) -> KvEventBatch:
        """The changes since the last take; a reset with `cached()` when one is due or `reset`."""
        if self._pending is None:
            return KvEventBatch()
        if self._overflow or reset:
            batch = KvEventBatch(stored=cached(), reset=True)
        else:
            batch = KvEventBatch(stored=[h for h, on in self._pending.items() if on],
                                 removed=[h for h, on in self._pending.items() if not on])
        self._pending = {}
        self._overflow = False
        return batch


class BlockManager:
    """Free list, cached blocks (LRU), reference counts, and one block table per owner."""

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.0) -> None:
        if num_blocks < 1:
            raise OutOfBlocksError("the KV cache has no block: raise kv_cache_bytes or num_blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(num_blocks * watermark)
        # Popping from the end hands out low ids first, which keeps tests readable.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._refs: dict[int, int] = {}  # owned block → how many tables hold it
        self._hash_of: dict[int, int] = {}  # registered block → its content hash
        self._by_hash: dict[int, int] = {}  # content hash → its registered block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unowned; oldest first
        self.evictions = 0
        self._events = KvEventLog(max_pending=4 * num_blocks)  # off until someone drains them

    # ---- queries ----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free ones and cached ones no owner holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered under a content hash (owned or not)."""
        return len(self._hash_of)

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

    def hash_of(self, block: int) -> int | None:
        """The content hash `block` is cached under (None when it is not registered)."""
        return self._hash_of.get(block)

    def cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the start."""
        found = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def num_unowned(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` (cached) no owner holds: sharing them takes them out of `num_free`."""
        return sum(1 for b in blocks if b in self._evictable)

    # ---- changes ----------------------------------------------------------------------

    def _take(self) -> int:
        if self._free:
            b = self._free.pop()
        else:
            b, _ = self._evictable.popitem(last=False)  # the least recently released cached block
            h = self._hash_of.pop(b)
            del self._by_hash[h]
            self.evictions += 1
            self._note(h, False)
        self._refs[b] = 1
        return b

    def _add(self, owner: str, num_blocks: int) -> list[int]:
        if num_blocks > self.num_free:
            raise OutOfBlocksError(f"{owner}: needs {num_blocks} blocks, {self.num_free} free")
        added = [self._take() for _ in range(num_blocks)]
        self._tables.setdefault(owner, []).extend(added)
        return added

    def grow(self, owner: str, num_tokens: int) -> list[int]:
        """Make `owner`'s table cover `num_tokens` tokens; returns the blocks added."""
        return self._add(owner, self.extra_blocks_needed(owner, num_tokens))

    def allocate(self, owner: str, num_blocks: int) -> list[int]:
        """Append exactly `num_blocks` blocks to `owner`'s table."""
        return self._add(owner, num_blocks)

    def share(self, owner: str, blocks: Sequence[int]) -> None:
        """Start `owner`'s (empty) table with cached `blocks` (from `cached_prefix`)."""
        if self._tables.get(owner):
            raise OutOfBlocksError(f"{owner} already owns blocks; a shared prefix comes first")
        for b in blocks:
            if b not in self._hash_of:
                raise OutOfBlocksError(f"block {b} is not cached")
            if b in self._evictable:
                del self._evictable[b]
            self._refs[b] = self._refs.get(b, 0) + 1
        self._tables[owner] = list(blocks)

    def register(self, block: int, content_hash: int) -> bool:
        """Cache owned, full, computed `block` under `content_hash`. False when another block
        already holds that content (this one stays private) or this one is registered already."""
        if block in self._hash_of or content_hash in self._by_hash:
            return False
        if block not in self._refs:
            raise OutOfBlocksError(f"block {block} is not owned")
        self._hash_of[block] = content_hash
        self._by_hash[content_hash] = block
        self._note(content_hash, True)
        return True

    # ---- KV events ----------------------------------------------------------------------

    def cached_hashes(self) -> list[int]:
        """Every hash cached now (owned or not)."""
        return list(self._by_hash)

    def enable_events(self) -> None:
        """Start recording KV events; the first drain is a reset with the whole cache."""
        self._events.enable()

    def drain_events(self, reset: bool = False) -> KvEventBatch:
        """The KV events since the last drain (empty when events are off); with `reset` (a
        receiver lost track), a reset with the whole cache whatever happened since."""
        return self._events.take(self.cached_hashes, reset)

    def _note(self, h: int, stored: bool) -> None:
        self._events.note(h, stored)

    def free(self, owner: str) -> int:
        """Let go of all of `owner`'s blocks; returns how many it held. Blocks no other owner holds
        become free, or stay cached when registered (the table's tail first in line for eviction:
        a prefix is likelier to be shared than a continuation)."""
        blocks = self._tables.pop(owner, [])
        for b in reversed(blocks):
            left = self._refs[b] - 1
            if left:
                self._refs[b] = left
                continue
            del self._refs[b]
            if b in self._hash_of:
                self._evictable[b] = None
            else:
                self._free.append(b)
        return len(blocks)

    def rename(self, old: str, new: str) -> None:
        """Hand a table to a new owner (a reservation becomes a request)."""
        if new in self._tables:
            raise OutOfBlocksError(f"{new} already owns blocks")
        self._tables[new] = self._tables.pop(old, [])

    # ---- integrity --------------------------------------------------------------------

    def check_integrity(self, expected_owners: set[str] | None = None) -> None:
        """Each block is free, cached and unowned, or owned (its count = the tables holding it);
        the hash index and the counts agree."""
        seen: dict[int, str] = {}
        for b in self._free:
            if b in seen:
                raise AssertionError(f"block {b} is twice in the free list")
            if b in self._hash_of:
                raise AssertionError(f"free block {b} is still registered")
            seen[b] = "<free>"
        for b in self._evictable:
            if b in seen:
                raise AssertionError(f"cached block {b} is also free")
            if b not in self._hash_of:
                raise AssertionError(f"unowned cached block {b} has no hash")
            seen[b] = "<cached>"
        holders: dict[int, int] = {}
        for owner, table in self._tables.items():
            if len(set(table)) != len(table):
                raise AssertionError(f"{owner} holds a block twice")
            for b in table:
                if not 0 <= b < self.num_blocks:
                    raise AssertionError(f"{owner} holds out-of-range block {b}")
                if seen.get(b, "<owned>") != "<owned>":
                    raise AssertionError(f"block {b} is held by {owner} and is {seen[b]}")
                seen[b] = "<owned>"
                holders[b] = holders.get(b, 0) + 1
        if len(seen) != self.num_blocks:
            raise AssertionError(f"{self.num_blocks - len(seen)} blocks are neither free nor owned (nor cached): leak")
        for b in holders.keys() | self._refs.keys():
            if holders.get(b, 0) != self._refs.get(b, 0):
                raise AssertionError(f"block {b} is in {holders.get(b, 0)} tables, its count says {self._refs.get(b, 0)}")
        for b, h in self._hash_of.items():
            if self._by_hash.get(h) != b:
                raise AssertionError(f"block {b}'s hash is not indexed to it")
        if len(self._by_hash) != len(self._hash_of):
            raise AssertionError("the hash index has stray entries")
        if expected_owners is not None:
            stray = {o for o in self._tables if self._tables[o]} - expected_owners
            if stray:
                raise AssertionError(f"blocks held by unknown owners: {sorted(stray)}")
