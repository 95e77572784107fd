"""One interface for every KV-block data path between a source and a destination engine.

A transfer of a list of blocks is split into chunks of at most `chunk_bytes` (default 16 MiB),
so a large request never holds the medium (or the control socket) for long. The source side
(`KVSender`) reads each chunk's blocks from its KV cache into the medium and returns a
`ChunkHeader`; the destination side (`KVReceiver`) writes the chunk into the given destination
block ids. Flow control is explicit and message-based: the source may have at most `depth`
chunks in flight (`can_send()`); the destination's acknowledgement of a chunk (carried by the
caller, e.g. a BlocksAck) is handed to `sender.ack(seq)`, which frees its staging slot.

The KV cache is one tensor [layers, 2, blocks, block_size, kv_heads, head_dim] (engine.kv_cache);
block ids index dimension 2.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import torch

PathName = Literal["frames", "shm"]  # a CUDA IPC path is not built yet
MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 16 * MiB


class ChunkHeader(msgspec.Struct, frozen=True, kw_only=True):
    """What the destination needs to consume one chunk (the coordinator carries it in MigrateBlocks).

    seq: chunk number within this sender (monotonic); slot/offset: where the bytes lie in a
    staging buffer (shm; -1/0 for frames); dst_block_ids: where to write them, in order;
    last: the final chunk of a `send` call."""

    seq: int
    dst_block_ids: list[int]
    slot: int = -1
    offset: int = 0
    last: bool = False


def block_bytes(cache: torch.Tensor) -> int:
    """Bytes of one block across all layers and K/V in a [L, 2, blocks, ...] cache."""
    return cache[:, :, :1].numel() * cache.element_size()


def touch_zero(t: torch.Tensor) -> torch.Tensor:
    """Zero a host buffer, touching each page once (no page faults on the data path later), without
    a parallel torch op: the calling thread (the worker's event loop, which lives as long as the
    process) must not become an OpenMP team's master, or every engine step slows down
    (services.worker.torch_threads). numpy's fill is single-threaded. A device tensor is zeroed
    by torch."""
    if t.is_cuda or not t.is_contiguous():
        return t.zero_()
    t.view(torch.uint8).numpy().fill(0)
    return t


def block_shape(cache: torch.Tensor, n: int) -> tuple[int, ...]:
    """Shape of `n` gathered blocks: [L, 2, n, block_size, kv_heads, head_dim]."""
    return (*cache.shape[:2], n, *cache.shape[3:])


def split_chunks(src_ids: Sequence[int], dst_ids: Sequence[int], chunk_blocks: int
                 ) -> list[tuple[list[int], list[int]]]:
    """(src, dst) block id lists of at most `chunk_blocks` each, in order."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    if chunk_blocks < 1:
        raise ValueError("a chunk must hold at least one block")
    return [(list(src_ids[i:i + chunk_blocks]), list(dst_ids[i:i + chunk_blocks]))
            for i in range(0, len(src_ids), chunk_blocks)]


def index_tensor(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(ids), dtype=torch.long, device=device)


@dataclass(frozen=True)
class Attachment:
    """What every MigrateBlocks of one sender carries for the destination: the staging buffer it
    maps (shm: name and size; "" and 0 for none), and whether the chunk's data follows the
    message as a frame (so the message describes it as a tensor)."""

    staging: str = ""
    staging_bytes: int = 0
    data_frames: bool = False


class KVSender(abc.ABC):
    """Source side of a path. `name` is the MigrateBlocks.path value; `bound` names the medium
    copy that limits its bandwidth (compare with `kvferry bench transfer`)."""

    name: PathName
    bound: str
    chunk_blocks: int  # most blocks per chunk
    depth: int  # most chunks in flight

    def chunks(self, src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """The chunking `send_chunk` expects."""
        return split_chunks(src_ids, dst_ids, self.chunk_blocks)

    @abc.abstractmethod
    def can_send(self) -> bool:
        """True when a staging slot is free for the next chunk."""

    @abc.abstractmethod
    def send_chunk(self, src_ids: Sequence[int], dst_ids: Sequence[int], last: bool = False) -> ChunkHeader:
        """Copy blocks `src_ids` (at most chunk_blocks) into the medium; the header for the destination.
        RuntimeError when no slot is free (check `can_send()` or wait for acks first)."""

    @abc.abstractmethod
    def ack(self, seq: int) -> None:
        """The destination consumed chunk `seq`: its slot may be reused."""

    @abc.abstractmethod
    def in_flight(self) -> int:
        """Chunks not yet acknowledged (a sender is reusable for another transfer at 0)."""

    @abc.abstractmethod
    def attachment(self) -> Attachment:
        """What each chunk's message carries besides the header (the same for every chunk)."""

    def payload(self, seq: int) -> list[Any]:
        """Data frames the caller sends after chunk `seq`'s header (none when the data travels
        through a staging buffer the destination maps)."""
        return []

    def close(self) -> None:
        """Release the medium (idempotent)."""

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class KVReceiver(abc.ABC):
    """Destination side of a path: writes chunks into its KV cache."""

    name: PathName

    @abc.abstractmethod
    def receive_chunk(self, header: ChunkHeader, frames: Sequence[Any] = ()) -> int:
        """Write the chunk `header` describes (data in the staging buffer, or in `frames` for the
        frames path) into header.dst_block_ids; returns the blocks written."""

    def close(self) -> None:
        """Release the medium (idempotent)."""

    def __enter__(self) -> KVReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class WorkerPlace:
    """Where a worker's KV cache lives, as far as choosing a path goes."""

    host: str  # a host identity (hostname or machine id), equal for workers on one machine
    device: str = "cpu"  # "cpu" or "cuda"


def choose_path(src: WorkerPlace, dst: WorkerPlace) -> PathName:
    """shm between workers of one host (CUDA caches too, staged through host memory), frames otherwise."""
    return "shm" if src.host == dst.host else "frames"
