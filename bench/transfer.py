"""`kvferry bench transfer`: GB/s of each KV data path, against a plain memcpy in the same run.

For payloads of 1 MB, 16 MB, 256 MB and 1 GB (rounded up to whole blocks), a source and a
destination process (spawned, each with its own KV-cache tensor) move random source blocks into
random destination blocks: `shm` (same-host staging buffer, 64 MiB, 16 MiB chunks), `frames`
(ZeroMQ copy=False over tcp://127.0.0.1, the cross-host path) and `frames-ipc` (the same over
ipc://). Time = from the first gather to the destination's ack of the last chunk written into
its cache; best of --reps. The reference is torch copy_ of the same bytes between two warm
tensors in this process. Blocks are SmolLM2-135M's: 30 layers x 2 (K,V) x 16 tokens x 3 KV heads
x 64 head dim x 2 bytes (bf16) = 360 KiB per block. A CUDA IPC path is not built yet.

`--between-hosts` adds `frames-hosts`: the frames path between two hosts made as Linux network
namespaces joined by veth pairs through a bridge (testkit.netns; root and iproute2 needed), the
source bound on its host's address, the destination connecting from the other host, next to
`frames` over loopback; and a live migration's downtime across the veth next to loopback
(bench.hosts_migration).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SMOLLM2_BLOCK = (30, 2, 16, 3, 64)  # layers, K/V, block_size, kv_heads, head_dim
SIZES = {"1MB": 10**6, "16MB": 16 * 10**6, "256MB": 256 * 10**6, "1GB": 10**9}
PATHS = ("shm", "frames", "frames-ipc")
HOSTS_PATH = "frames-hosts"  # frames over TCP between two network-namespace hosts (--between-hosts)


@dataclass
class Options:
    """`kvferry bench transfer`'s settings (the flags, same names; their defaults are the CLI's)."""

    json: str | None
    reps: int
    sizes: str  # comma-separated subset of SIZES
    paths: str  # comma-separated subset of PATHS (and HOSTS_PATH with between_hosts)
    between_hosts: bool = False
    migrations: int = 5  # live migrations per cluster for the downtime rows (between_hosts)
    model: str = "smollm2"  # the workers' model for the downtime rows
    clusters: str = "one-host,two-hosts,two-hosts-curve"  # which of them (bench.hosts_migration.CLUSTER_FLAGS)
    context: int = 1024  # tokens of the migrated stream's prompt


def make_cache(num_blocks: int, dtype: torch.dtype, seed: int | None,
               block: tuple[int, ...] = SMOLLM2_BLOCK) -> torch.Tensor:
    """A [L, 2, num_blocks, bs, h, d] cache: random (from `seed`) or zeros (seed None; touched)."""
    import torch

    shape = (block[0], block[1], num_blocks, *block[2:])
    if seed is None:
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def _ctrl_send(sock: Any, kind: bytes, obj: Any = None) -> None:
    import msgspec
    sock.send_multipart([kind, msgspec.msgpack.encode(obj)])


def _ctrl_recv(sock: Any) -> tuple[bytes, Any]:
    import msgspec
    kind, body = sock.recv_multipart()
    return kind, msgspec.msgpack.decode(body)


def source_proc(path: str, ctrl_addr: str, data_addr: str, num_blocks: int, dtype: torch.dtype,
                seed: int | None, transfers: list[tuple[list[int], list[int]]], reps: int,
                opts: dict[str, Any], results: Any, netns: str | None = None) -> None:
    """Spawned source: bind, wait for the destination, run every transfer `reps` times; put seconds lists.
    With `netns`, in that network namespace (entered first, before any thread starts)."""
    if netns is not None:
        from testkit.netns import enter
        enter(netns)
    import torch
    import zmq

    from kv_transfer.shm import ShmSender
    from kv_transfer.zmq_frames import FramesSender

    torch.set_num_threads(1)
    cache = make_cache(num_blocks, dtype, seed)
    ctx = zmq.Context()
    ctrl = ctx.socket(zmq.PAIR)
    ctrl.bind(ctrl_addr)
    data = None
    try:
        if path == "shm":
            sender = ShmSender(cache, **opts)
        else:
            data = ctx.socket(zmq.PUSH)
            if data_addr.startswith("tcp://"):
                data_addr = f"{data_addr}:{data.bind_to_random_port(data_addr)}"
            else:
                data.bind(data_addr)
            sender = FramesSender(cache, data, **opts)
        with sender:
            _ctrl_send(ctrl, b"hello", sender.attach_info() if path == "shm" else {"data_addr": data_addr})
            assert _ctrl_recv(ctrl)[0] == b"ready"
            times: list[list[float]] = []
            for src, dst in transfers:
                t_rep = []
                for _ in range(reps):
                    chunks = sender.chunks(src, dst)
                    t0 = time.perf_counter()
                    pending = 0
                    for i, (a, b) in enumerate(chunks):
                        last = i == len(chunks) - 1
                        if path == "shm":
                            while not sender.can_send():
                                _, seq = _ctrl_recv(ctrl)
                                sender.ack(seq)
                                pending -= 1
                            h = sender.send_chunk(a, b, last=last)
                            _ctrl_send(ctrl, b"hdr", h)
                            pending += 1
                        else:
                            sender.wait_slot()
                            sender.send_chunk(a, b, last=last)
                    if path == "shm":
                        while pending:
                            _, seq = _ctrl_recv(ctrl)
                            sender.ack(seq)
                            pending -= 1
                    else:
                        assert _ctrl_recv(ctrl)[0] == b"done"
                    t_rep.append(time.perf_counter() - t0)
                times.append(t_rep)
            _ctrl_send(ctrl, b"end")
            results.put(("source", times))
            assert _ctrl_recv(ctrl)[0] == b"bye"
    except BaseException as exc:
        results.put(("source-error", repr(exc)))
        raise
    finally:
        ctrl.close(linger=0)
        if data is not None:
            data.close(linger=1000)
        ctx.term()


def dest_proc(path: str, ctrl_addr: str, data_addr: str, num_blocks: int, dtype: torch.dtype,
              src_seed: int | None, transfers: list[tuple[list[int], list[int]]], reps: int, verify: bool,
              results: Any, netns: str | None = None) -> None:
    """Spawned destination: write every chunk into its own cache; with `verify`, after each
    transfer's last chunk, check the blocks against the source's (regenerated from its seed).
    With `netns`, in that network namespace."""
    if netns is not None:
        from testkit.netns import enter
        enter(netns)
    import msgspec
    import torch
    import zmq

    from kv_transfer.base import ChunkHeader
    from kv_transfer.shm import ShmReceiver
    from kv_transfer.zmq_frames import FramesReceiver

    torch.set_num_threads(1)
    cache = make_cache(num_blocks, dtype, None)
    expected = make_cache(num_blocks, dtype, src_seed) if verify else None
    ctx = zmq.Context()
    ctrl = ctx.socket(zmq.PAIR)
    ctrl.connect(ctrl_addr)
    data = None
    ok: list[bool] = []
    try:
        kind, info = _ctrl_recv(ctrl)
        if path == "shm":
            receiver = ShmReceiver(cache, **info)
        else:
            data = ctx.socket(zmq.PULL)
            data.connect(info["data_addr"])
            receiver = FramesReceiver(cache)
        with receiver:
            _ctrl_send(ctrl, b"ready")
            t_index = 0
            poller = zmq.Poller()
            poller.register(ctrl, zmq.POLLIN)
            if data is not None:
                poller.register(data, zmq.POLLIN)
            while True:
                events = dict(poller.poll())
                header = None
                if data is not None and data in events:
                    header = receiver.recv(data)
                elif ctrl in events:
                    kind, body = _ctrl_recv(ctrl)
                    if kind == b"end":
                        break
                    header = msgspec.convert(body, ChunkHeader)
                    receiver.receive_chunk(header)
                    _ctrl_send(ctrl, b"ack", header.seq)
                if header is not None and header.last:
                    if verify:
                        src, dst = transfers[t_index // reps]
                        good = torch.equal(cache[:, :, dst].view(torch.uint8), expected[:, :, src].view(torch.uint8))
                        others = sorted(set(range(num_blocks)) - set(dst))
                        good = good and not cache[:, :, others].view(torch.uint8).any().item()
                        ok.append(bool(good))
                        cache.zero_()
                    t_index += 1
                    if data is not None:
                        _ctrl_send(ctrl, b"done")
        results.put(("dest", ok))
        _ctrl_send(ctrl, b"bye")
    except BaseException as exc:
        results.put(("dest-error", repr(exc)))
        raise
    finally:
        ctrl.close(linger=1000)
        if data is not None:
            data.close(linger=0)
        ctx.term()


def run_pair(path: str, num_blocks: int, dtype: torch.dtype, transfers: list[tuple[list[int], list[int]]],
             reps: int = 1, seed: int | None = 0, verify: bool = False, opts: dict[str, Any] | None = None,
             timeout: float = 120.0, hosts: tuple[tuple[str, str], tuple[str, str]] | None = None,
             ) -> tuple[list[list[float]], list[bool]]:
    """Run `transfers` over `path` between two spawned processes; (seconds per transfer per rep,
    verification result per transfer-rep, empty without verify). `hosts`: ((namespace, address)
    of the source, (namespace, address) of the destination) for the frames path between hosts;
    the control socket stays an ipc:// file, which both namespaces share."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="kvferry-bt-")
    ctrl_addr = f"ipc://{tmp}/ctrl"
    data_addr = f"ipc://{tmp}/data" if path == "frames-ipc" else f"tcp://{hosts[0][1] if hosts else '127.0.0.1'}"
    kind = "shm" if path == "shm" else "frames"
    src_ns, dst_ns = (hosts[0][0], hosts[1][0]) if hosts else (None, None)
    src = ctx.Process(target=source_proc, args=(kind, ctrl_addr, data_addr, num_blocks, dtype, seed, transfers,
                                                reps, opts or {}, results, src_ns), daemon=True)
    dst = ctx.Process(target=dest_proc, args=(kind, ctrl_addr, data_addr, num_blocks, dtype, seed,
                                              transfers, reps, verify, results, dst_ns), daemon=True)
    src.start()
    dst.start()
    got: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < 2:
            k, v = results.get(timeout=max(0.1, deadline - time.monotonic()))
            if k.endswith("-error"):
                raise RuntimeError(f"{k}: {v}")
            got[k] = v
    finally:
        for p in (src, dst):
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(tmp, ignore_errors=True)
    return got["source"], got["dest"]


def memcpy_gbps(nbytes: int, reps: int) -> float:
    import torch

    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.zeros(nbytes, dtype=torch.uint8)
    b.copy_(a)
    best = math.inf
    for _ in range(max(reps, 3)):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def run(opts: Options) -> int:
    sizes = [s for s in opts.sizes.split(",") if s]
    paths = [p for p in opts.paths.split(",") if p]
    known = PATHS + ((HOSTS_PATH,) if opts.between_hosts else ())
    if opts.between_hosts and HOSTS_PATH not in paths:
        paths.append(HOSTS_PATH)
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r} (choose from {', '.join(SIZES)})")
    for p in paths:
        if p not in known:
            raise SystemExit(f"unknown path {p!r} (choose from {', '.join(known)}"
                             f"{'' if opts.between_hosts else f'; {HOSTS_PATH} with --between-hosts'})")
    from bench.hosts_migration import CLUSTER_FLAGS

    clusters = [c for c in opts.clusters.split(",") if c]
    if opts.between_hosts and (not clusters or any(c not in CLUSTER_FLAGS for c in clusters)):
        raise SystemExit(f"--clusters: a comma-separated subset of {','.join(CLUSTER_FLAGS)}")
    net = None
    if opts.between_hosts:
        from testkit.netns import HostNetwork, NetnsUnavailable, check_available
        try:
            check_available()
        except NetnsUnavailable as exc:
            raise SystemExit(f"--between-hosts: {exc}") from None
        net = HostNetwork(["a", "b"]).open()
    try:
        out = _bandwidth(opts, sizes, paths, net)
    finally:
        if net is not None:
            net.close()
    if opts.between_hosts:
        from bench.hosts_migration import print_rows, run_clusters

        t0 = time.perf_counter()
        out["migrations"] = run_clusters(opts.model, opts.migrations, opts.context,
                                         names=[CLUSTER_FLAGS[c] for c in clusters])
        print_rows(out["migrations"])
        print(f"({time.perf_counter() - t0:.1f} s; {opts.model}, a {opts.context}-token context, "
              f"moved back and forth {opts.migrations} times per cluster)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _bandwidth(opts: Options, sizes: list[str], paths: list[str], net: Any) -> dict[str, Any]:
    """The GB/s rows (printed as a table) and the run's facts; `net`: the hosts of HOSTS_PATH."""
    import torch

    dtype = torch.bfloat16
    bpb = math.prod(SMOLLM2_BLOCK) * dtype.itemsize
    nblocks = {s: math.ceil(SIZES[s] / bpb) for s in sizes}
    cache_blocks = max(nblocks.values()) + 64
    rng = random.Random(0)
    transfers = []
    for s in sizes:
        n = nblocks[s]
        transfers.append((rng.sample(range(cache_blocks), n), rng.sample(range(cache_blocks), n)))
    t_start = time.perf_counter()
    memcpy = {s: memcpy_gbps(nblocks[s] * bpb, opts.reps) for s in sizes}
    rows = []
    for path in paths:
        hosts = None
        if path == HOSTS_PATH:
            a, b = net.hosts["a"], net.hosts["b"]
            hosts = ((a.netns, a.address), (b.netns, b.address))
        times, _ = run_pair(path, cache_blocks, dtype, transfers, reps=opts.reps, seed=None, hosts=hosts)
        for s, t in zip(sizes, times):
            nbytes = nblocks[s] * bpb
            gbps = nbytes / min(t) / 1e9
            rows.append({"path": path, "size": s, "bytes": nbytes, "blocks": nblocks[s], "seconds": min(t),
                         "gb_per_s": gbps, "memcpy_gb_per_s": memcpy[s], "pct_of_memcpy": 100 * gbps / memcpy[s]})
    for s in sizes:
        rows.append({"path": "memcpy (torch copy_)", "size": s, "bytes": nblocks[s] * bpb, "blocks": nblocks[s],
                     "seconds": nblocks[s] * bpb / memcpy[s] / 1e9, "gb_per_s": memcpy[s],
                     "memcpy_gb_per_s": memcpy[s], "pct_of_memcpy": 100.0})
    print(f"{'path':<22}{'size':>7}{'blocks':>8}{'GB/s':>9}{'% memcpy':>10}")
    for r in rows:
        print(f"{r['path']:<22}{r['size']:>7}{r['blocks']:>8}{r['gb_per_s']:>9.2f}{r['pct_of_memcpy']:>9.1f}%")
    out = {"block": {"layers": 30, "kv": 2, "block_size": 16, "kv_heads": 3, "head_dim": 64, "dtype": "bfloat16",
                     "bytes": bpb, "model": "SmolLM2-135M"},
           "chunk_bytes": 16 << 20, "shm_bytes": 64 << 20, "reps": opts.reps,
           "cpus": os.cpu_count(), "machine": platform.machine(), "results": rows,
           "wall_s": time.perf_counter() - t_start}
    print(f"({out['wall_s']:.1f} s; block = 360 KiB SmolLM2-135M bf16; best of {opts.reps})")
    return out
