"""vLLM's KV cache events as kvferry's KV events: the scheduler's prefix index for vLLM workers.

vLLM (with `kv_events_config.enable_kv_cache_events`) reports every full block its prefix cache
stores (`BlockStored`: vLLM's block hashes, the parent's, the blocks' token ids, and per block the
extra keys it hashed, among them the first block's `cache_salt`) and evicts (`BlockRemoved`), once
per engine step, to the scheduler's publisher. `VllmKvEvents` stands in for that publisher (in
process: the engine core steps in the worker's engine thread) and re-hashes each stored block with
kvferry's chained hash (protocol.kv_hash: the root of the worker's namespace and the salt, then
the tokens), the hash frontends compute for a prompt; so the scheduler's `KvIndex` and
cache-aware dispatch need not know vLLM's hash function. It keeps vLLM hash → kvferry hash for
the cached blocks (bounded by the pool: an evicted block's entry goes) and the net stored/removed
changes since the last `take`, like `engine.block_manager.BlockManager`'s events.

Blocks it cannot re-hash are left out of the index (counted in `untranslated`): a block whose
hash involves LoRA, multimodal inputs or prompt embeddings, whose parent it never saw stored, or
of another block size. The index is a hint for dispatch, so leaving a block out costs a missed
hit, never a wrong token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine.block_manager import KvEventBatch, KvEventLog
from protocol.kv_hash import block_hash, root_from_namespace


class VllmKvEvents:
    """A vLLM event publisher (`publish`, `shutdown`) that keeps kvferry's view of the cache."""

    def __init__(self, namespace: int, block_size: int, max_pending: int) -> None:
        self.namespace = namespace
        self.block_size = block_size
        self._ours: dict[Any, int] = {}  # vLLM block hash → kvferry's, for every cached block seen stored
        self._copies: dict[Any, int] = {}  # vLLM block hash → cached blocks under it (vLLM may keep duplicates)
        self._log = KvEventLog(max_pending)
        self.untranslated = 0  # stored blocks left out of the index

    # ---- vLLM's publisher interface (called by its scheduler, once per step with events) ----------

    def publish(self, batch: Any) -> None:
        for ev in batch.events:
            kind = type(ev).__name__
            if kind == "BlockStored":
                self._stored(ev)
            elif kind == "BlockRemoved":
                self._removed(ev.block_hashes)
            elif kind == "AllBlocksCleared":
                self._ours.clear()
                self._copies.clear()
                self._log.overflow()  # the next take is a reset (with nothing in it)

    def shutdown(self) -> None:
        pass

    # ---- kvferry's side (engine.interface.KvEventSource) -------------------------------------------

    def enable(self) -> None:
        """Start recording; the first `take` is a reset with the whole cache."""
        self._log.enable()

    def take(self, resync: bool = False) -> KvEventBatch:
        """The net changes since the last take; a reset with every cached hash when the pending
        changes overflowed, the cache was cleared, or `resync` asks for one."""
        return self._log.take(self.cached_hashes, resync)

    def cached_hashes(self) -> list[int]:
        return list(dict.fromkeys(self._ours.values()))

    # ---- translation --------------------------------------------------------------------------------

    def _stored(self, ev: Any) -> None:
        hashes, tokens, bs = ev.block_hashes, ev.token_ids, self.block_size
        if ev.block_size != bs or len(tokens) != len(hashes) * bs or getattr(ev, "lora_name", None) \
                or getattr(ev, "lora_id", None):
            self.untranslated += len(hashes)
            return
        extra = getattr(ev, "extra_keys", None) or [None] * len(hashes)
        if ev.parent_block_hash is None:
            salt = _salt(extra[0])
            parent = root_from_namespace(self.namespace, salt) if salt is not None else None
            extra = extra[1:]
        else:
            parent = self._ours.get(ev.parent_block_hash)
        # Past the first block, any extra key (multimodal, embeddings) changes the hash: left out.
        if parent is None or any(k for k in extra):
            self.untranslated += len(hashes)
            return
        for i, vh in enumerate(hashes):
            ours = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            n = self._copies.get(vh, 0)
            self._copies[vh] = n + 1
            if n == 0:
                self._ours[vh] = ours
                self._log.note(ours, True)
            parent = ours

    def _removed(self, hashes: Iterable[Any]) -> None:
        for vh in hashes:
            n = self._copies.get(vh, 0)
            if n > 1:
                self._copies[vh] = n - 1
            elif n == 1:
                del self._copies[vh]
                self._log.note(self._ours.pop(vh), False)


def _salt(keys: tuple[Any, ...] | None) -> str | None:
    """The cache_salt among a first block's extra keys ("" without one); None when other keys
    (LoRA, multimodal, embeddings) went into its hash too."""
    if not keys:
        return ""
    if len(keys) == 1 and isinstance(keys[0], str):
        return keys[0]
    return None
