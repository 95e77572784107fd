"""The block hashes a frontend sends with each dispatch, for cache-aware dispatch (design §4).

The frontend hashes a prompt's full blocks exactly as the workers' engines key their prefix caches
(protocol.kv_hash: chained from the root of the cluster's namespace and the request's cache_salt),
with the hashing parameters the scheduler announces in every DispatchReply (the namespace and
block size of most registered workers). Until it has heard them, and while the cluster has no
prefix caching (namespace 0), it sends none. A request's hashes are computed once and kept on its
stream; a resumed request (prompt + the tokens delivered so far) only adds the blocks it grew by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol.fields import MAX_BLOCK_HASHES
from protocol.kv_hash import extend_hashes, root_from_namespace


@dataclass
class PromptHashes:
    """One request's block hashes so far and the parameters they were computed with."""

    namespace: int = 0
    block_size: int = 0
    hashes: list[int] = field(default_factory=list)


class PromptHasher:
    """The cluster's hashing parameters (`learn` from each DispatchReply) and prompt hashing."""

    def __init__(self) -> None:
        self.namespace = 0  # 0: unknown, or no prefix caching in the cluster
        self.block_size = 0

    def learn(self, namespace: int, block_size: int) -> None:
        if namespace and block_size:
            self.namespace, self.block_size = namespace, block_size
        else:
            self.namespace = self.block_size = 0

    def hashes(self, kept: PromptHashes, prompt: Sequence[int], cache_salt: str = "") -> PromptHashes:
        """The hashes of `prompt`'s full blocks (the first MAX_BLOCK_HASHES), reusing `kept` (the
        same request's earlier, shorter prompt) when it was hashed with the same parameters."""
        ns, bs = self.namespace, self.block_size
        if not ns:
            return PromptHashes()
        n = min(len(prompt) // bs, MAX_BLOCK_HASHES)
        same = (kept.namespace, kept.block_size) == (ns, bs) and len(kept.hashes) <= n
        hashes = extend_hashes(kept.hashes if same else [], prompt, bs, n, root_from_namespace(ns, cache_salt))
        return PromptHashes(ns, bs, hashes)  # (`kept`'s list grew in place: it is replaced by this one)
