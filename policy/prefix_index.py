"""The global prefix index: which instances hold which cached KV blocks (design §4).

Soft state, like the rest of the scheduler's view: built from the workers' KV events (blocks
stored, blocks evicted), cleared for an instance that resyncs or dies, never persisted. Keys are
content hashes (protocol/kv_hash.py); they carry the model, dtype, block size and tenant salt,
so hashes from different instances compare without knowing any of those.

Bounded: each instance keeps at most `max_entries_per_instance` hashes, the least recently stored
dropped first, so a flood of distinct prompts (or an instance that never reports evictions) evicts
entries instead of growing the index. Pure data structure, no I/O: the live scheduler and the
simulator share it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence

DEFAULT_MAX_ENTRIES_PER_INSTANCE = 1 << 17


class PrefixIndex:
    """hash → instances holding that block, with a per-instance LRU cap."""

    def __init__(self, max_entries_per_instance: int = DEFAULT_MAX_ENTRIES_PER_INSTANCE) -> None:
        if max_entries_per_instance < 1:
            raise ValueError("max_entries_per_instance must be at least 1")
        self.max_entries_per_instance = max_entries_per_instance
        self._by_instance: dict[str, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[str]] = {}
        self.dropped = 0  # entries dropped by the cap (not by an eviction event)

    # ---- updates ------------------------------------------------------------------------

    def stored(self, instance: str, hashes: Iterable[int]) -> None:
        """`instance` now caches these blocks (a repeat refreshes the entry's age)."""
        own = self._by_instance.setdefault(instance, OrderedDict())
        for h in hashes:
            if h in own:
                own.move_to_end(h)
                continue
            own[h] = None
            self._holders.setdefault(h, set()).add(instance)
        while len(own) > self.max_entries_per_instance:
            h, _ = own.popitem(last=False)
            self._unhold(h, instance)
            self.dropped += 1

    def removed(self, instance: str, hashes: Iterable[int]) -> None:
        """`instance` evicted these blocks (unknown ones are ignored)."""
        own = self._by_instance.get(instance)
        if not own:
            return
        for h in hashes:
            if h in own:
                del own[h]
                self._unhold(h, instance)

    def clear(self, instance: str) -> None:
        """Forget everything `instance` holds (it resyncs, restarts or is gone)."""
        for h in self._by_instance.pop(instance, ()):
            self._unhold(h, instance)

    def _unhold(self, h: int, instance: str) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(instance)
            if not holders:
                del self._holders[h]

    # ---- queries ------------------------------------------------------------------------

    def num_entries(self, instance: str | None = None) -> int:
        """Entries of one instance, or of all of them."""
        if instance is not None:
            return len(self._by_instance.get(instance, ()))
        return sum(len(own) for own in self._by_instance.values())

    def instances(self) -> list[str]:
        return list(self._by_instance)

    def holds(self, instance: str, h: int) -> bool:
        return h in self._by_instance.get(instance, ())

    def match(self, hashes: Sequence[int], candidates: Collection[str] | None = None) -> dict[str, int]:
        """For each instance holding the first block: how many leading blocks of `hashes` it holds
        (an engine reuses only an unbroken run from the start). Instances holding none are absent.
        `candidates` limits the answer to those instances."""
        if not hashes:
            return {}
        live = set(self._holders.get(hashes[0], ()))
        if candidates is not None:
            live &= set(candidates)
        run: dict[str, int] = {}
        for n, h in enumerate(hashes):
            if not live:
                break
            holders = self._holders.get(h)
            if holders is None:
                for i in live:
                    run[i] = n
                live = set()
                break
            gone = live - holders
            for i in gone:
                run[i] = n
            live -= gone
        for i in live:
            run[i] = len(hashes)
        return run
