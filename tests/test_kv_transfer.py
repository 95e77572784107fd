"""KV transfer paths: blocks moved between two processes arrive bit-identical in other block ids,
chunked across many chunks; the shm staging buffer never outlives close (also after an error)."""

from __future__ import annotations

import glob
import os
import random

import pytest
import torch
import zmq

from bench.transfer import make_cache, run_pair
from kv_transfer.base import WorkerPlace, choose_path, split_chunks
from kv_transfer.shm import PREFIX, ShmReceiver, ShmSender
from kv_transfer.zmq_frames import FramesReceiver, FramesSender

BLOCK = (4, 2, 4, 2, 8)  # small blocks: layers, kv, block_size, heads, head_dim


def shm_files(pid: int | None = None) -> set[str]:
    """kvferry's staging buffers in /dev/shm; with `pid`, those that process created (names carry
    the creator's pid). Tests filter by creator: other tests running beside this one (pytest-xdist,
    live clusters) create and remove buffers of their own."""
    return set(glob.glob(f"/dev/shm/{PREFIX}{'' if pid is None else f'{pid}-'}*"))


def leaked(before: set[str]) -> set[str]:
    """Buffers that appeared since `before` and whose creating process is gone: nobody will unlink them."""
    def owner(path: str) -> str:
        return os.path.basename(path)[len(PREFIX):].split("-", 1)[0]
    return {f for f in shm_files() - before if not os.path.exists(f"/proc/{owner(f)}")}


def small_cache(n: int, dtype: torch.dtype, seed: int | None) -> torch.Tensor:
    return make_cache(n, dtype, seed, block=BLOCK)


def transfers(num_blocks: int, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    src = rng.sample(range(num_blocks), n)
    dst = rng.sample(range(num_blocks), n)
    assert src != dst
    return [(src, dst)]


@pytest.mark.e2e  # two spawned processes per case
@pytest.mark.parametrize("path", ["shm", "frames", "frames-ipc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_two_processes_bit_identical(path: str, dtype: torch.dtype) -> None:
    before = shm_files()
    # SmolLM2 blocks (360 KiB bf16) with 1 MiB chunks and a 3 MiB shm buffer: 40 blocks = many chunks,
    # more than the ring holds at once.
    opts = {"chunk_bytes": 1 << 20, **({"shm_bytes": 3 << 20} if path == "shm" else {"depth": 2})}
    tr = transfers(96, 40, seed=7) + transfers(96, 5, seed=8)
    times, ok = run_pair(path, 96, dtype, tr, reps=2, seed=123, verify=True, opts=opts, timeout=60)
    assert ok == [True] * 4
    assert len(times) == 2 and all(len(t) == 2 for t in times)
    assert not leaked(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shm_two_handles_one_process(dtype: torch.dtype) -> None:
    before = shm_files(os.getpid())
    src_cache = small_cache(64, dtype, seed=1)
    dst_cache = small_cache(64, dtype, seed=None)
    bpb = src_cache[:, :, :1].numel() * src_cache.element_size()
    src, dst = transfers(64, 50, seed=3)[0]
    with ShmSender(src_cache, shm_bytes=4 * 3 * bpb, chunk_bytes=3 * bpb) as s:
        assert s.chunk_blocks == 3 and s.depth == 4
        assert len(shm_files(os.getpid()) - before) == 1
        with ShmReceiver(dst_cache, **s.attach_info()) as r:
            chunks = s.chunks(src, dst)
            assert len(chunks) == 17
            headers = []
            for i, (a, b) in enumerate(chunks):
                if not s.can_send():  # ring full: the destination drains everything sent so far
                    for h in headers:
                        r.receive_chunk(h)
                        s.ack(h.seq)
                    headers = []
                headers.append(s.send_chunk(a, b, last=i == len(chunks) - 1))
            assert headers[-1].last
            for h in headers:
                r.receive_chunk(h)
                s.ack(h.seq)
    assert torch.equal(dst_cache[:, :, dst].view(torch.uint8), src_cache[:, :, src].view(torch.uint8))
    untouched = sorted(set(range(64)) - set(dst))
    assert not dst_cache[:, :, untouched].view(torch.uint8).any()
    assert shm_files(os.getpid()) == before


def test_shm_cleaned_up_after_exception() -> None:
    before = shm_files(os.getpid())
    cache = small_cache(8, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="boom"):
        with ShmSender(cache, shm_bytes=1 << 16, chunk_bytes=1 << 14) as s:
            with ShmReceiver(small_cache(8, torch.float32, None), **s.attach_info()):
                raise RuntimeError("boom")
    assert shm_files(os.getpid()) == before
    s = ShmSender(cache, shm_bytes=1 << 16)
    assert shm_files(os.getpid()) != before
    del s  # garbage collection unlinks too
    import gc
    gc.collect()
    assert shm_files(os.getpid()) == before


def test_shm_full_ring_and_bad_acks() -> None:
    cache = small_cache(8, torch.float32, seed=0)
    bpb = cache[:, :, :1].numel() * 4
    with ShmSender(cache, shm_bytes=2 * bpb, chunk_bytes=bpb) as s:
        s.send_chunk([0], [1])
        s.send_chunk([1], [2])
        with pytest.raises(RuntimeError):
            s.send_chunk([2], [3])
        with pytest.raises(KeyError):
            s.ack(7)
        s.ack(0)
        assert s.can_send()
        with pytest.raises(ValueError):
            s.send_chunk([0, 1], [2, 3])  # more than one chunk
    with pytest.raises(ValueError):
        ShmReceiver(cache, "../etc/passwd", 10)


def test_frames_in_process_dealer_router() -> None:
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"dst")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    try:
        src_cache = small_cache(32, torch.bfloat16, seed=5)
        dst_cache = small_cache(32, torch.bfloat16, seed=None)
        bpb = src_cache[:, :, :1].numel() * 2
        # the destination says hello so the router knows its routing id
        dealer.send(b"hi")
        assert router.recv_multipart()[0] == b"dst"
        s = FramesSender(src_cache, router, chunk_bytes=4 * bpb, depth=2, prefix=[b"dst"])
        r = FramesReceiver(dst_cache)
        src, dst = transfers(32, 30, seed=9)[0]
        chunks = s.chunks(src, dst)
        for i, (a, b) in enumerate(chunks):
            assert s.wait_slot(5.0)
            s.send_chunk(a, b, last=i == len(chunks) - 1)
            h = r.recv(dealer)
            assert h.last == (i == len(chunks) - 1)
        s.close()
        assert torch.equal(dst_cache[:, :, dst].view(torch.uint8), src_cache[:, :, src].view(torch.uint8))
    finally:
        router.close(0)
        dealer.close(0)


def test_choose_path_and_split() -> None:
    a, b = WorkerPlace("h1", "cuda"), WorkerPlace("h1", "cuda")
    assert choose_path(a, b) == "shm"  # no CUDA IPC path yet: CUDA caches of one host stage through shm
    assert choose_path(WorkerPlace("h1"), WorkerPlace("h1", "cuda")) == "shm"
    assert choose_path(WorkerPlace("h1"), WorkerPlace("h2")) == "frames"
    assert split_chunks([1, 2, 3], [4, 5, 6], 2) == [([1, 2], [4, 5]), ([3], [6])]
    with pytest.raises(ValueError):
        split_chunks([1], [2, 3], 2)


def test_sweep_removes_buffers_of_dead_creators_only(tmp_path):
    import os

    from kv_transfer.shm import PREFIX, sweep_stale_buffers

    dead = tmp_path / f"{PREFIX}999999999-abc"  # no such pid
    mine = tmp_path / f"{PREFIX}{os.getpid()}-def"
    other = tmp_path / "unrelated-file"
    for f in (dead, mine, other):
        f.write_bytes(b"x")
    assert sweep_stale_buffers(str(tmp_path)) == [dead.name]
    assert not dead.exists() and mine.exists() and other.exists()
