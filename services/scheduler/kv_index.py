"""The scheduler's view of the workers' prefix caches, built from their KvEvents (design §4).

Soft state like the registry: a policy.PrefixIndex (block hash → instances, capped per instance)
plus, per worker, where its event stream stands. A worker's KvEvents are applied in `seq` order.
Its stream starts (at registration) waiting for a reset, which the worker sends after every
registration; a message out of order (a gap: one was lost), one that arrives while a reset is
awaited, or a malformed one clears what the index holds of that worker and asks it to resync
(ResyncKvEvents), at most every RESYNC_RETRY_S while none comes. A worker that deregisters, dies
or registers again is forgotten. Also the cluster's hashing parameters: the (namespace, block
size) most of the registered workers announced, which the frontends learn from DispatchReply.

Pure bookkeeping: no sockets, no clock of its own (callers pass `now`, monotonic seconds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from policy.prefix_index import DEFAULT_MAX_ENTRIES_PER_INSTANCE, PrefixIndex
from protocol.to_scheduler import KvEvents

RESYNC_RETRY_S = 1.0  # ask a worker that owes a reset again after this long (the ask may be lost)

Hashing = tuple[int, int]  # (kv namespace, block size)


@dataclass
class _Stream:
    """Where one worker's KvEvents stand: the next seq expected (None: waiting for a reset)."""

    hashing: Hashing
    expected: int | None = None
    asked_at: float = -math.inf  # when a resync was last asked (a registration counts as one)


class KvIndex:
    """The prefix index and the workers' event streams; counts what it applied and dropped."""

    def __init__(self, max_entries_per_instance: int = DEFAULT_MAX_ENTRIES_PER_INSTANCE) -> None:
        self.index = PrefixIndex(max_entries_per_instance)
        self._streams: dict[str, _Stream] = {}
        self._cluster: Hashing | None = None  # cached most common hashing; None: recompute
        self.applied = 0  # KvEvents applied
        self.dropped = 0  # KvEvents dropped: out of order, awaited a reset, malformed (or unreadable), unknown worker
        self.resyncs = 0  # resyncs asked of workers

    # ---- membership ------------------------------------------------------------------------

    def register(self, worker_id: str, kv_namespace: int, block_size: int, now: float) -> None:
        """A worker (re-)registered: forget what it held; it sends a reset next by itself."""
        self.index.clear(worker_id)
        if kv_namespace:
            self._streams[worker_id] = _Stream((kv_namespace, block_size), asked_at=now)
        else:
            self._streams.pop(worker_id, None)  # no prefix caching: nothing to index
        self._cluster = None

    def forget(self, worker_id: str) -> None:
        """A worker deregistered or died: its entries go, and its stream (it registers anew)."""
        self.index.clear(worker_id)
        if self._streams.pop(worker_id, None) is not None:
            self._cluster = None

    # ---- events ----------------------------------------------------------------------------

    def apply(self, msg: KvEvents, now: float) -> str | None:
        """Apply `msg` if it is next in its worker's stream. Returns why the worker must resync
        (ask it with ResyncKvEvents), or None when there is nothing to ask."""
        wid = msg.worker_id
        st = self._streams.get(wid)
        if st is None:  # registered without prefix caching, or forgotten: nothing to track
            self.dropped += 1
            return None
        if msg.reset:
            self.index.clear(wid)
        elif st.expected is None:
            self.dropped += 1
            return self._ask(st, now, "awaiting a reset")
        elif msg.seq != st.expected:
            self.dropped += 1
            reason = f"gap: expected seq {st.expected}, got {msg.seq}"
            self._lost(wid, st)
            return self._ask(st, now, reason)
        st.expected = msg.seq + 1
        if msg.removed:
            self.index.removed(wid, msg.removed)
        if msg.stored:
            self.index.stored(wid, msg.stored)
        self.applied += 1
        return None

    def invalid(self, worker_id: str, now: float) -> str | None:
        """A malformed KvEvents came from `worker_id`: what it held is unknown now. Returns why to
        ask it to resync (None: it has no stream)."""
        self.dropped += 1
        st = self._streams.get(worker_id)
        if st is None:
            return None
        self._lost(worker_id, st)
        return self._ask(st, now, "a malformed KvEvents")

    def _lost(self, worker_id: str, st: _Stream) -> None:
        self.index.clear(worker_id)
        st.expected = None
        st.asked_at = -math.inf  # ask at once

    def _ask(self, st: _Stream, now: float, reason: str) -> str | None:
        if now - st.asked_at < RESYNC_RETRY_S:
            return None  # asked lately (or it just registered): its reset is on its way
        st.asked_at = now
        self.resyncs += 1
        return reason

    # ---- queries ---------------------------------------------------------------------------

    def match(self, hashes: Sequence[int], kv_namespace: int, block_size: int) -> dict[str, int]:
        """Instance → leading blocks of `hashes` it holds, among the workers hashing with
        (`kv_namespace`, `block_size`) and in sync (a worker awaiting a reset holds nothing here)."""
        if not hashes or not kv_namespace:
            return {}
        want = (kv_namespace, block_size)
        candidates = [w for w, st in self._streams.items() if st.hashing == want and st.expected is not None]
        return self.index.match(hashes, candidates) if candidates else {}

    def hashing(self) -> Hashing:
        """The (namespace, block size) most registered workers with prefix caching hash with
        (ties: the smaller one); (0, 0) when none caches."""
        if self._cluster is None:
            counts = Counter(st.hashing for st in self._streams.values())
            self._cluster = min(counts, key=lambda h: (-counts[h], h)) if counts else (0, 0)
        return self._cluster

    def entries(self, worker_id: str) -> int:
        return self.index.num_entries(worker_id)
