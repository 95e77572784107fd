"""Dispatched requests' prompt block hashes, kept so that a migration round can ask how much of a
request's prefix each destination caches (policy.plan_migrations' `prefix_blocks`, design §3/§4);
the live scheduler and the simulator both keep one.

Soft state: filled from DispatchRequest.block_hashes at dispatch, bounded by a total number of
hashes (least recently dispatched requests forgotten first), never needed for correctness — a
forgotten request only loses its cache affinity when it migrates. Pure bookkeeping, no I/O.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_MAX_HASHES = 1 << 21  # 16 MiB of hashes: ~1,000 requests of 32k tokens at block size 16


@dataclass(frozen=True)
class _Prefix:
    kv_namespace: int
    block_size: int
    hashes: array  # unsigned 64-bit, 8 bytes a block


class RequestPrefixes:
    """request id → (hash namespace, block size, its prompt's block hashes), at most `max_hashes` in all."""

    def __init__(self, max_hashes: int = DEFAULT_MAX_HASHES) -> None:
        if max_hashes < 1:
            raise ValueError("max_hashes must be at least 1")
        self.max_hashes = max_hashes
        self._by_request: OrderedDict[str, _Prefix] = OrderedDict()
        self.num_hashes = 0

    def __len__(self) -> int:
        return len(self._by_request)

    def remember(self, request_id: str, kv_namespace: int, block_size: int, hashes: Sequence[int]) -> None:
        """Keep `hashes` for `request_id` (a request dispatched again, e.g. resumed, replaces its entry)."""
        self.forget(request_id)
        if not hashes or not kv_namespace or len(hashes) > self.max_hashes:
            return
        entry = _Prefix(kv_namespace, block_size, array("Q", hashes))
        self._by_request[request_id] = entry
        self.num_hashes += len(entry.hashes)
        while self.num_hashes > self.max_hashes:
            _, old = self._by_request.popitem(last=False)
            self.num_hashes -= len(old.hashes)

    def forget(self, request_id: str) -> None:
        old = self._by_request.pop(request_id, None)
        if old is not None:
            self.num_hashes -= len(old.hashes)

    def prefix_blocks(self, match: Callable[[Sequence[int], int, int], dict[str, int]]
                      ) -> Callable[[str, str], int]:
        """policy.plan_migrations' `prefix_blocks(request_id, instance_id)`: the leading blocks of
        the request's prompt that `match(hashes, namespace, block_size)` (the KV index's) says the
        instance holds; 0 for a request not remembered. Each request is matched once per call of
        this method (one migration round)."""
        seen: dict[str, dict[str, int]] = {}

        def lookup(request_id: str, instance_id: str) -> int:
            held = seen.get(request_id)
            if held is None:
                entry = self._by_request.get(request_id)
                held = {} if entry is None else match(entry.hashes, entry.kv_namespace, entry.block_size)
                seen[request_id] = held
            return held.get(instance_id, 0)

        return lookup
