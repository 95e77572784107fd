"""The worker's KV events: which block hashes its prefix cache stored and evicted, for the
scheduler's prefix index (design §4).

The worker takes them from the engine on the engine thread, in the same call as the load
report's stats (so they go out at the reports' rate), and this module turns each batch into
KvEvents messages of at most MAX_KV_EVENT_HASHES hashes per list, numbered one by one from 0 for
the life of the process. The next batch is a resync (a reset that carries the whole cache) after
every registration with the scheduler (a restarted scheduler starts from nothing), when the
scheduler asks (ResyncKvEvents: it saw a gap or a malformed message), and when a KvEvents could
not leave (the scheduler would see a gap) or a read failed halfway (its events may be lost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.fields import MAX_KV_EVENT_HASHES
from protocol.to_scheduler import KvEvents
from services.log import get_logger

if TYPE_CHECKING:
    from engine.block_manager import KvEventBatch

log = get_logger(__name__)


class KvEventPublisher:
    """Numbers and splits one worker's KV event batches, and remembers when a resync is due.
    Used on the event loop only; the engine calls happen elsewhere (the worker's engine driver)."""

    def __init__(self, worker_id: str, enabled: bool, max_hashes: int = MAX_KV_EVENT_HASHES) -> None:
        if max_hashes < 1:
            raise ValueError("max_hashes must be at least 1")
        self.worker_id = worker_id
        self.enabled = enabled  # the engine caches prefixes and reports them (engine.interface.kv_event_source)
        self.max_hashes = max_hashes
        self.seq = 0  # the next message's
        self.resyncs = 0  # resets sent
        self._resync = True  # the engine's first batch is a reset anyway

    def request_resync(self, reason: str) -> None:
        """Make the next batch a reset with the whole cache."""
        if self.enabled and not self._resync:
            log.info("worker.kv_resync", worker_id=self.worker_id, reason=reason)
        self._resync = True

    def take_resync(self) -> bool:
        """Whether the batch about to be read must be a reset; the request counts as served (a read
        that fails must call `request_resync` again)."""
        due, self._resync = self._resync, False
        return due and self.enabled

    def messages(self, batch: "KvEventBatch | None") -> list[KvEvents]:
        """`batch` as consecutive KvEvents (none for an empty batch); only the first of a reset has
        `reset` set, the others carry the rest of its hashes."""
        if batch is None or not batch:
            return []
        m = self.max_hashes
        parts = max(1, -(-len(batch.stored) // m), -(-len(batch.removed) // m))
        out = []
        for i in range(parts):
            out.append(KvEvents(worker_id=self.worker_id, seq=self.seq, reset=batch.reset and i == 0,
                                stored=batch.stored[i * m:(i + 1) * m], removed=batch.removed[i * m:(i + 1) * m]))
            self.seq += 1
        if batch.reset:
            self.resyncs += 1
        return out
