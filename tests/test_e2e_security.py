"""End to end on 127.0.0.1 (`kvferry up`'s LocalCluster, 2 sim workers): CurveZMQ on every socket,
and a live fuzz run against every ZeroMQ endpoint and HTTP route of a running cluster.

- Curve: with `curve_keys_dir` set, HTTP, the SDK (with keys) and `kvferry ctl` (with keys) work;
  a DEALER without keys, or with a keypair nobody listed, gets no answer from the scheduler, any
  worker's control or migration socket, or the SDK endpoint.
- Fuzz: random, mutated and hostile frames to the scheduler ROUTER, every worker's control and
  migration ROUTER, the frontend's SDK ROUTER and token PULL, and random/mutated bodies to every
  HTTP route; afterwards every socket still answers, a normal request works over HTTP and the
  SDK, the scheduler lists only the real workers, and they report zero used blocks.
- Both: nothing the cluster's processes listen on is bound beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgpack
import pytest
import zmq
import zmq.asyncio

from protocol import PROTOCOL_VERSION, Message, Ping, Pong, SchedulerReplies, StatusReply, StatusRequest, decode, encode
from protocol.examples import example_messages
from protocol.security import curve_keys, use_curve
from protocol.sockets import MessageSocket, request
from sdk import AsyncClient, GenerateTimeout, curve_keys_from_dir
from services.config import load_config
from services.launcher import ClusterSpec, LocalCluster, free_ports

pytestmark = pytest.mark.timeout(300)

PROMPT = "Once upon a time"


def start_cluster(**cluster: object) -> LocalCluster:
    http, base = free_ports(2)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base, **cluster},
        "worker": {"engine": "sim", "model": "instant", "num_blocks": 2048, "max_num_seqs": 64,
                   "migration_timeout_s": 2.0},  # a fuzzed reservation is swept within seconds
        "frontend": {"model": "tiny", "max_tokens_limit": 16, "max_prompt_tokens": 2048},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=2, ready_timeout_s=120, extra_env={"KVFERRY_LOG_LEVEL": "warning"}))
    c.start()
    return c


def listening_addresses(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds (/proc)."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            addr, port = local.split(":")
            raw = bytes.fromhex(addr)
            if len(raw) == 4:
                ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:  # four little-endian 32-bit words
                ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            out.append((ip, int(port, 16)))
    return out


def assert_loopback_only(c: LocalCluster) -> None:
    found = listening_addresses([ch.proc.pid for ch in c.children if ch.proc.poll() is None])
    cl = c.spec.config.cluster
    ports = {p for _, p in found}
    want = {int(ep.rsplit(":", 1)[1]) for ep in [cl.scheduler(), cl.frontend_sdk(0), cl.frontend_tokens(0),
                                                 cl.worker_control(0), cl.worker_migration(1)]} | {cl.http_port}
    assert want <= ports, (want, found)
    assert all(ip == "127.0.0.1" for ip, _ in found), found


async def ask_status(c: LocalCluster, ctx: zmq.asyncio.Context) -> StatusReply:
    sock = MessageSocket.connect(ctx, zmq.DEALER, c.scheduler_endpoint, SchedulerReplies, server_role="scheduler")
    try:
        return await request(sock, StatusRequest(include_requests=True), timeout_s=5.0)
    finally:
        sock.close()


async def wait_clean(c: LocalCluster, ctx: zmq.asyncio.Context, timeout_s: float = 60.0,
                     require_idle: bool = True) -> StatusReply:
    """Until the scheduler's live instances are exactly the real workers and each reports zero used
    blocks. (Fake registrations it declared dead stay listed, not alive, until it forgets them a
    minute later: they take no requests, so they are not waited for.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        st = await ask_status(c, ctx)
        alive = [i for i in st.instances if i.alive]
        ids = sorted(i.worker_id for i in alive)
        if ids == ["worker-0", "worker-1"] and (not require_idle or all(
                i.used_blocks == 0 and i.num_running == 0 and i.num_waiting == 0 for i in alive)):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"not clean: {[(i.worker_id, i.used_blocks, i.num_running) for i in st.instances]}")
        await asyncio.sleep(0.3)


async def plain_answer(endpoint: str, frame: bytes, ctx: zmq.asyncio.Context, timeout_s: float = 1.5) -> bytes | None:
    """Send one frame on a fresh DEALER of `ctx`; the first answer, or None."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        await sock.send(frame)
        if await sock.poll(int(timeout_s * 1000)):
            return await sock.recv()
        return None
    finally:
        sock.close(linger=0)


# ---- CurveZMQ ------------------------------------------------------------------------------------

@pytest.fixture
def curve_cluster(tmp_path_factory):
    keys = tmp_path_factory.mktemp("curve") / "keys"
    assert subprocess.run([sys.executable, "-m", "cli.main", "keys", "generate", str(keys)],
                          capture_output=True, timeout=60).returncode == 0
    c = start_cluster(curve_keys_dir=str(keys))
    try:
        yield c, keys
    finally:
        c.stop()
    assert [ch.proc.returncode for ch in c.children] == [0] * 4  # clean exits: the ZAP threads do not hang them


async def test_curve_cluster_serves_only_peers_with_keys(curve_cluster):
    c, keys = curve_cluster
    cl = c.spec.config.cluster
    # HTTP (the frontend's ZeroMQ hops under it are all Curve) and the SDK with keys.
    async with httpx.AsyncClient(timeout=60) as h:
        r = await h.post(f"{c.http_url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    async with AsyncClient(c.sdk_endpoint, timeout=30, **curve_keys_from_dir(str(keys))) as sdk:
        assert (await sdk.generate(PROMPT, max_tokens=4)).usage.completion_tokens == 4
        chunks = [ch async for ch in sdk.stream(PROMPT, max_tokens=4)]
        assert chunks[-1].finish_reason == "length"
    out = subprocess.run([sys.executable, "-m", "cli.main", "ctl", "status", "--json", "--scheduler",
                          c.scheduler_endpoint, "--curve-keys", str(keys)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(i["worker_id"] for i in json.loads(out.stdout)["instances"]) == ["worker-0", "worker-1"]

    # Without keys, or with keys nobody listed: no answer anywhere.
    ping = encode(Ping(sender_id="intruder"))
    endpoints = [c.scheduler_endpoint, c.sdk_endpoint] + [f(i) for i in range(2) for f in (cl.worker_control,
                                                                                          cl.worker_migration)]
    plain = zmq.asyncio.Context()
    public, secret = zmq.curve_keypair()
    listed = curve_keys(cl, "client")
    assert listed is not None
    stranger = use_curve(zmq.asyncio.Context(), dataclasses.replace(listed, public=public, secret=secret))
    trusted = use_curve(zmq.asyncio.Context(), listed)
    try:
        results = await asyncio.gather(*(plain_answer(ep, ping, plain) for ep in endpoints))
        assert results == [None] * len(endpoints)
        roles = ["scheduler", "frontend", "worker", "worker", "worker", "worker"]

        async def ping(ctx: zmq.asyncio.Context, ep: str, role: str, timeout_s: float) -> bool:
            s = MessageSocket.connect(ctx, zmq.DEALER, ep, None, server_role=role)
            try:
                return isinstance(await request(s, Ping(sender_id="probe"), timeout_s=timeout_s), Pong)
            except asyncio.TimeoutError:
                return False
            finally:
                s.close()

        assert not any(await asyncio.gather(*(ping(stranger, ep, r, 1.5) for ep, r in zip(endpoints, roles))))
        assert all(await asyncio.gather(*(ping(trusted, ep, r, 10.0) for ep, r in zip(endpoints, roles))))
        async with AsyncClient(c.sdk_endpoint, timeout=2) as sdk:  # an SDK client without keys
            with pytest.raises(GenerateTimeout):
                await sdk.generate(PROMPT, max_tokens=4)
        bad_ctl = subprocess.run([sys.executable, "-m", "cli.main", "ctl", "status", "--scheduler",
                                  c.scheduler_endpoint, "--timeout", "1"], capture_output=True, text=True, timeout=60,
                                 env={k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")})
        assert bad_ctl.returncode == 2 and "did not answer" in bad_ctl.stderr
        # Garbage from a non-Curve PUSH never reaches the token socket; the cluster still serves.
        push = plain.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(cl.frontend_tokens(0))
        for _ in range(20):
            with_timeout = push.send(os.urandom(64), flags=zmq.NOBLOCK)
            try:
                await with_timeout
            except zmq.Again:
                break  # no handshake: nothing can be queued
        push.close(linger=0)
        await wait_clean(c, trusted)
    finally:
        for ctx in (plain, stranger, trusted):
            ctx.destroy(linger=0)
    assert_loopback_only(c)


# ---- live fuzzing --------------------------------------------------------------------------------

@pytest.fixture
def plain_cluster():
    c = start_cluster()
    try:
        yield c
    finally:
        c.stop()
    assert all(ch.proc.returncode is not None for ch in c.children)


def _seeds(c: LocalCluster) -> dict[str, list[Message]]:
    """Valid messages per endpoint, aimed at nothing real: ids that no mutation turns into a real
    worker's, a few tokens each, tokens pushed back to the frontend (which knows no such request).
    Drain and Shutdown (legitimate, destructive commands) are left out."""
    import msgspec

    cl = c.spec.config.cluster
    ex = {type(m).__name__: m for m in example_messages()}

    def fix(m: Message) -> Message:
        changes = {}
        for f, v in (("worker_id", "fz-w0"), ("src_worker_id", "fz-w0"), ("dst_worker_id", "fz-w1"),
                     ("request_id", "fz-r1"), ("frontend_id", "fz-fe"), ("reply_address", cl.frontend_tokens(0)),
                     ("dst_endpoint", "tcp://127.0.0.1:9"), ("sender_id", "fz-s")):
            if f in m.__struct_fields__:
                changes[f] = v
        if "sampling" in m.__struct_fields__ and m.sampling is not None:
            changes["sampling"] = msgspec.structs.replace(m.sampling, max_tokens=4)
        if "endpoints" in m.__struct_fields__:
            changes["endpoints"] = msgspec.structs.replace(m.endpoints, control="tcp://127.0.0.1:9",
                                                           migration="tcp://127.0.0.1:9")
        return msgspec.structs.replace(m, **changes)

    def pick(*names: str) -> list[Message]:
        return [fix(ex[n]) for n in names]

    return {
        "scheduler": pick("RegisterWorker", "LoadReport", "Heartbeat", "Deregister", "MigrationResult",
                          "DispatchRequest", "StatusRequest", "MigrateRequestTo", "DrainInstance", "UndrainInstance",
                          "ScaleQuery", "KvEvents", "Ping"),
        "control": pick("AddRequest", "AbortRequest", "Heartbeat", "MigrateCommand", "CancelMigration", "Ping"),
        "migration": pick("MigrateReserve", "MigrateBlocks", "MigrateCommit", "MigrateAbort", "Ping"),
        "sdk": [fix(msgspec.structs.replace(ex["GenerateRequest"], sampling=msgspec.structs.replace(
            ex["GenerateRequest"].sampling, max_tokens=4))), *pick("CancelGenerate", "Ping")],
        "tokens": pick("TokenBatch", "TokenBatches", "RequestMoved"),
    }


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(max(1, len(buf)))
        op = rng.choice(["flip", "byte", "insert", "delete", "truncate"])
        if op == "flip" and buf:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == "byte" and buf:
            buf[pos] = rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC3, 0xCF, 0xD3, 0xDC, 0xDE, 0xFF,
                                   rng.randrange(256)])
        elif op == "insert":
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == "delete":
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


def _hostile_value(rng: random.Random) -> object:
    return rng.choice([None, True, -1, 0, (1 << 64) - 1, 1.5, float("nan"), "", "x" * 3000, b"\xff", [], {},
                       [1] * 500, {"a": [None]}, "tcp://127.0.0.1:9", "worker-", rng.randbytes(8)])


def fuzz_frames(rng: random.Random, seeds: list[Message], n: int) -> list[list[bytes]]:
    """`n` multipart messages: random bytes, mutated seeds, hostile field values, wrong versions,
    unknown types, extra or empty frames, one big frame."""
    out: list[list[bytes]] = []
    encoded = [encode(m) for m in seeds]
    for i in range(n):
        kind = i % 6
        if kind == 0:
            parts = [rng.randbytes(rng.randint(0, 300))]
        elif kind in (1, 2):
            parts = [_mutate(rng, rng.choice(encoded))]
        elif kind == 3:
            seed = rng.choice(seeds)
            body = msgpack.unpackb(encode(seed), raw=False)[2]
            for name in rng.sample(list(type(seed).__struct_fields__), k=min(2, len(type(seed).__struct_fields__))):
                body[name] = _hostile_value(rng)
            parts = [msgpack.packb([PROTOCOL_VERSION, type(seed).__name__, body], use_bin_type=True)]
        elif kind == 4:
            if rng.random() < 0.5:  # a wrong version or an unknown type (Shutdown: never with version 1)
                parts = [msgpack.packb([rng.choice([0, 2, 99, "1", None]), rng.choice(["Ping", "Nope", "", "Shutdown"]),
                                        {}])]
            else:  # a valid envelope with data frames it does not describe
                parts = [rng.choice(encoded), *[rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 3))]]
        else:
            parts = rng.choice([[b""], [b"", b""], [rng.choice(encoded)[:3]],
                                [b"\x93\x01\xa4Ping\xdf\xff\xff\xff\xff"]])  # a map that claims 4G entries
        out.append(parts)
    out.append([b"\x93" + rng.randbytes(2 << 20)])  # big, within the frame limit: parsed and refused
    return out


async def _fuzz_router(endpoint: str, frames: list[list[bytes]], ctx: zmq.asyncio.Context) -> int:
    """Send every message on one DEALER, then read answers for a moment; returns how many were
    ErrorReplies (each must decode as a protocol message)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    errors = 0
    try:
        for parts in frames:
            await sock.send_multipart(parts)
        # Until every message is answered, or 3 s pass without an answer (some get none: one-way
        # messages, a reply that failed to send).
        answers = 0
        while answers < len(frames) and await sock.poll(3000):
            reply = decode(await sock.recv())  # whatever a service answers is a valid message
            answers += 1
            errors += type(reply).__name__ == "ErrorReply"
    finally:
        sock.close(linger=0)
    return errors


async def _fuzz_pull(endpoint: str, frames: list[list[bytes]], ctx: zmq.asyncio.Context) -> None:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for parts in frames:
            await asyncio.wait_for(sock.send_multipart(parts), 5.0)
    finally:
        sock.close(linger=0)


HTTP_ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
               ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/chat/completions"), ("PATCH", "/v1/completions"),
               ("POST", "/v1/completions/x"), ("GET", "/")]
VALID_BODIES = [{"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": True},
                {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                {"prompt": [1, 2, 3], "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}]


def http_bodies(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        base = rng.choice(VALID_BODIES)
        kind = i % 4
        if kind == 0:
            out.append(rng.randbytes(rng.randint(0, 200)))
        elif kind == 1:
            out.append(_mutate(rng, json.dumps(base).encode()))
        elif kind == 2:
            body = dict(base)
            for key in rng.sample(["model", "prompt", "messages", "max_tokens", "stream", "stop", "temperature",
                                   "top_p", "seed", "n", "priority", "stream_options"], k=2):
                body[key] = _hostile_value(rng)
            out.append(json.dumps(body, default=repr).encode())  # bytes as their repr; NaN as NaN
        else:
            out.append(rng.choice([b"[" * 5000, b"{" * 10, b'{"prompt": "\\ud800"}', b"\xff\xfe\x00",
                                   b'{"prompt": "' + b"y" * (5 << 20) + b'"}', b"null", b"{}"]))
    return out


async def test_live_fuzz_every_endpoint_keeps_serving(plain_cluster):
    c = plain_cluster
    cl = c.spec.config.cluster
    rng = random.Random(int(os.environ.get("KVFERRY_FUZZ_SEED", "6")))
    n = int(os.environ.get("KVFERRY_LIVE_FUZZ_MESSAGES", "150"))
    seeds = _seeds(c)
    ctx = zmq.asyncio.Context()
    try:
        routers = [(c.scheduler_endpoint, "scheduler"), (c.sdk_endpoint, "sdk")]
        routers += [(cl.worker_control(i), "control") for i in range(2)]
        routers += [(cl.worker_migration(i), "migration") for i in range(2)]
        errors = await asyncio.gather(*(_fuzz_router(ep, fuzz_frames(rng, seeds[kind], n), ctx)
                                        for ep, kind in routers))
        assert all(e > n // 4 for e in errors), errors  # garbage is answered with ErrorReplies
        await _fuzz_pull(cl.frontend_tokens(0), fuzz_frames(rng, seeds["tokens"], n), ctx)
        # Fuzzed RegisterWorkers made fake instances (soft state: without Curve anyone on the network
        # may register); they leave dispatch after the heartbeat timeout, before the HTTP phase.
        await wait_clean(c, ctx, require_idle=False)

        statuses: dict[int, int] = {}
        async with httpx.AsyncClient(base_url=c.http_url, timeout=20) as h:
            sem = asyncio.Semaphore(8)

            async def one(method: str, path: str, body: bytes) -> None:
                async with sem:
                    r = await h.request(method, path, content=body, headers={"content-type": "application/json"})
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    assert r.status_code < 500, (method, path, body[:200], r.status_code, r.text[:300])

            await asyncio.gather(*(one(*rng.choice(HTTP_ROUTES), b) for b in http_bodies(rng, n)))
        assert statuses.get(200) and statuses.get(400) and statuses.get(413), statuses

        # Every socket still answers, then a normal request over HTTP and the SDK.
        for ep, _ in routers:
            s = MessageSocket.connect(ctx, zmq.DEALER, ep, None)
            assert isinstance(await request(s, Ping(sender_id="after"), timeout_s=5.0), Pong), ep
            s.close()
        async with httpx.AsyncClient(timeout=30) as h:
            # (a completion: chat's ChatML ids lie beyond the sim engine's 256-token vocabulary)
            r = await h.post(f"{c.http_url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        async with AsyncClient(c.sdk_endpoint, timeout=30) as sdk:
            assert (await sdk.generate(PROMPT, max_tokens=4)).usage.completion_tokens == 4
        await wait_clean(c, ctx)  # fake registrations expired, fuzzed requests and reservations freed
    finally:
        ctx.destroy(linger=0)
    assert c.first_exited() is None  # no service died
    assert_loopback_only(c)
