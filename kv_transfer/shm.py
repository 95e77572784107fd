"""Same-host path: a POSIX shared-memory staging buffer in /dev/shm, split into `depth` slots.

The source creates the buffer once (`ShmSender`), touches every page (no page faults on the
data path), gathers each chunk's blocks with index_select straight into a torch view of a free
slot, and hands the caller a ChunkHeader. The destination (`ShmReceiver`, attached by the
buffer's name) copies from the slot into its cache with index_copy_. A slot is free again
when the caller passes the destination's ack to `ShmSender.ack(seq)`.

Only the creator unlinks the file (close(), context exit, or garbage collection via a
finalizer), so an exception in either process leaves nothing in /dev/shm once the source closes.
When the cache is on a GPU, the buffer is page-locked with cudaHostRegister (untested on CPU hosts).
"""

from __future__ import annotations

import mmap
import os
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from kv_transfer.base import (DEFAULT_CHUNK_BYTES, MiB, Attachment, ChunkHeader, KVReceiver, KVSender, block_bytes,
                              block_shape, index_tensor, touch_zero)

SHM_DIR = "/dev/shm"
PREFIX = "kvferry-kv-"
DEFAULT_SHM_BYTES = 64 * MiB


class _Mapping:
    """An mmap of a /dev/shm file and a uint8 tensor over it."""

    def __init__(self, path: str, size: int, create: bool) -> None:
        self.path, self.size, self.owner = path, size, create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"{path} holds {os.fstat(fd).st_size} bytes, expected {size}")
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            if create:
                os.unlink(path)
            raise
        os.close(fd)
        self.u8 = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.registered = False
        self._fin = weakref.finalize(self, _Mapping._release, path, create)

    @staticmethod
    def _release(path: str, owner: bool) -> None:
        if owner:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def pin(self) -> None:
        """cudaHostRegister the buffer (for a CUDA cache: async H2D/D2H copies)."""
        if not self.registered and torch.cuda.is_available():
            torch.cuda.cudart().cudaHostRegister(self.u8.data_ptr(), self.size, 0)
            self.registered = True

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.u8.data_ptr())
            self.registered = False
        self.u8 = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            pass  # views still alive elsewhere; the mapping goes with them, the file is unlinked below
        self._fin()


def _slot_view(u8: torch.Tensor, offset: int, cache: torch.Tensor, n: int) -> torch.Tensor:
    nbytes = n * block_bytes(cache)
    return u8[offset:offset + nbytes].view(cache.dtype).view(block_shape(cache, n))


def sweep_stale_buffers(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink staging buffers whose creating process is gone (killed before it could unlink them:
    `kill -9` skips finalizers). Names carry the creator's pid; a live pid keeps its files."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        parts = name[len(PREFIX):].split("-", 1) if name.startswith(PREFIX) else []
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except OSError:
            pass
    return removed


class ShmSender(KVSender):
    """Source side: owns the staging buffer. `shm_name` is what the destination attaches to."""

    name = "shm"
    bound = "index_select gather into warm shm (~8-10 GB/s here) then index_copy_ out of it"

    def __init__(self, cache: torch.Tensor, shm_bytes: int = DEFAULT_SHM_BYTES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.cache = cache
        bpb = block_bytes(cache)
        chunk_bytes = min(chunk_bytes, shm_bytes // 2)  # at least two slots: gather while the other drains
        self.chunk_blocks = max(1, chunk_bytes // bpb)
        self.slot_bytes = self.chunk_blocks * bpb
        self.depth = max(1, shm_bytes // self.slot_bytes)
        self.shm_bytes = self.depth * self.slot_bytes
        self.shm_name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._map = _Mapping(os.path.join(SHM_DIR, self.shm_name), self.shm_bytes, create=True)
        touch_zero(self._map.u8)  # touch every page once: no page faults on the data path
        if cache.is_cuda:
            self._map.pin()
        self._free = list(range(self.depth))
        self._inflight: dict[int, int] = {}  # seq -> slot
        self._seq = 0

    def attach_info(self) -> dict[str, Any]:
        """What the destination needs for ShmReceiver (send it once per migration)."""
        return {"shm_name": self.shm_name, "shm_bytes": self.shm_bytes}

    def attachment(self) -> Attachment:
        return Attachment(staging=self.shm_name, staging_bytes=self.shm_bytes)

    def can_send(self) -> bool:
        return bool(self._free)

    def send_chunk(self, src_ids: Sequence[int], dst_ids: Sequence[int], last: bool = False) -> ChunkHeader:
        n = len(src_ids)
        if n != len(dst_ids) or not 0 < n <= self.chunk_blocks:
            raise ValueError(f"chunk of {n} source / {len(dst_ids)} destination blocks (at most {self.chunk_blocks})")
        if not self._free:
            raise RuntimeError("no free shm slot: wait for an ack")
        slot = self._free.pop(0)
        offset = slot * self.slot_bytes
        view = _slot_view(self._map.u8, offset, self.cache, n)
        idx = index_tensor(src_ids, self.cache.device)
        if self.cache.is_cuda:
            view.copy_(self.cache.index_select(2, idx))  # D2H into page-locked memory
        else:
            torch.index_select(self.cache, 2, idx, out=view)
        seq = self._seq
        self._seq += 1
        self._inflight[seq] = slot
        return ChunkHeader(seq=seq, dst_block_ids=list(dst_ids), slot=slot, offset=offset, last=last)

    def in_flight(self) -> int:
        return len(self._inflight)

    def ack(self, seq: int) -> None:
        slot = self._inflight.pop(seq, None)
        if slot is None:
            raise KeyError(f"no chunk {seq} in flight")
        self._free.append(slot)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None  # type: ignore[assignment]


class ShmReceiver(KVReceiver):
    """Destination side: attaches to the source's buffer by name; never unlinks it."""

    name = "shm"

    def __init__(self, cache: torch.Tensor, shm_name: str, shm_bytes: int) -> None:
        if "/" in shm_name or not shm_name.startswith(PREFIX):
            raise ValueError(f"not a kvferry shm name: {shm_name!r}")
        self.cache = cache
        self._map = _Mapping(os.path.join(SHM_DIR, shm_name), shm_bytes, create=False)
        if cache.is_cuda:
            self._map.pin()

    def receive_chunk(self, header: ChunkHeader, frames: Sequence[Any] = ()) -> int:
        n = len(header.dst_block_ids)
        if header.offset < 0 or header.offset + n * block_bytes(self.cache) > self._map.size:
            raise ValueError(f"chunk {header.seq} lies outside the staging buffer")
        view = _slot_view(self._map.u8, header.offset, self.cache, n)
        idx = index_tensor(header.dst_block_ids, self.cache.device)
        self.cache.index_copy_(2, idx, view.to(self.cache.device, non_blocking=True))
        if self.cache.is_cuda:
            torch.cuda.current_stream().synchronize()  # the slot may be reused once acked
        return n

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None  # type: ignore[assignment]
