"""The worker's ends of the KV data paths (kv_transfer/): senders it reuses as a source, and the
staging buffers of sources it reads from as a destination.

A shm staging buffer costs a create and a page-touch pass, so a source keeps idle senders and
reuses them for the next migration; one with chunks still unacknowledged (an aborted migration)
is closed instead, since the destination may still be reading it. A destination maps each
source's buffer once and unmaps it after it has been idle for a while.
"""

from __future__ import annotations

import time

import torch

from kv_transfer.base import KVReceiver, KVSender, PathName
from kv_transfer.shm import ShmReceiver, ShmSender
from kv_transfer.zmq_frames import FramesReceiver, FramesSender
from services.log import get_logger

log = get_logger(__name__)

RECEIVER_IDLE_S = 120.0
MAX_RECEIVERS = 32


class SenderPool:
    """Idle KV senders per path over this worker's cache."""

    def __init__(self, cache: torch.Tensor, chunk_bytes: int, shm_bytes: int, max_idle: int = 2) -> None:
        self.cache = cache
        self.chunk_bytes = chunk_bytes
        self.shm_bytes = shm_bytes
        self.max_idle = max_idle
        self._idle: dict[str, list[KVSender]] = {}

    def take(self, path: PathName) -> KVSender:
        idle = self._idle.get(path)
        if idle:
            return idle.pop()
        if path == "shm":
            return ShmSender(self.cache, shm_bytes=self.shm_bytes, chunk_bytes=self.chunk_bytes)
        if path == "frames":
            return FramesSender(self.cache, None, chunk_bytes=self.chunk_bytes, depth=2)
        raise ValueError(f"the {path} path is not available on this worker")

    def give_back(self, sender: KVSender) -> None:
        idle = self._idle.setdefault(sender.name, [])
        if sender.in_flight() or len(idle) >= self.max_idle:
            sender.close()
        else:
            idle.append(sender)

    def close(self) -> None:
        for senders in self._idle.values():
            for s in senders:
                s.close()
        self._idle.clear()


class ReceiverCache:
    """A destination's receivers: one FramesReceiver, and one ShmReceiver per source buffer."""

    def __init__(self, cache: torch.Tensor) -> None:
        self.cache = cache
        self.frames = FramesReceiver(cache)
        self._shm: dict[str, tuple[ShmReceiver, float]] = {}

    def get(self, path: str, staging: str = "", staging_bytes: int = 0) -> KVReceiver:
        if path == "frames":
            return self.frames
        if path != "shm":
            raise ValueError(f"the {path} path is not available on this worker")
        entry = self._shm.get(staging)
        if entry is None:
            if len(self._shm) >= MAX_RECEIVERS:
                oldest = min(self._shm, key=lambda k: self._shm[k][1])
                self._shm.pop(oldest)[0].close()
            entry = (ShmReceiver(self.cache, staging, staging_bytes), 0.0)
        self._shm[staging] = (entry[0], time.monotonic())
        return entry[0]

    def sweep(self, idle_s: float = RECEIVER_IDLE_S, busy: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Unmap buffers not used for `idle_s` (except those named in `busy`)."""
        now = time.monotonic()
        for name, (rx, used) in list(self._shm.items()):
            if now - used > idle_s and name not in busy:
                del self._shm[name]
                rx.close()

    def close(self) -> None:
        for rx, _ in self._shm.values():
            rx.close()
        self._shm.clear()
