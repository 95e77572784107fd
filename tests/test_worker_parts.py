"""The worker's parts on hand-built inputs, without sockets or a Worker: the control handler and
both migration roles get a WorkerContext over a real tiny engine, with fakes for the socket, the
token streamer and the scheduler link. A migration runs source → destination through an
in-process requester that passes each message through the wire codec, so the KV data path
(frames or shm) and the commit are the real ones.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from engine.request import RequestOutput
from engine.request import SamplingParams as EngineSamplingParams
from protocol import (
    AbortRequest,
    Ack,
    AddRequest,
    Drain,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    MigrateAbort,
    MigrateCommand,
    MigrateReserve,
    Ping,
    Pong,
    SamplingParams,
    Shutdown,
)
from protocol.codec import decode, encode
from protocol.sockets import Received
from services.config import WorkerConfig
from services.worker.context import WorkerContext, WorkerState
from services.worker.control import ControlHandler
from services.worker.engine_factory import build_engine
from services.worker.migration.copy_threads import CopyThreads
from services.worker.migration.destination import MigrationDestination
from services.worker.migration.kv_io import SenderPool
from services.worker.migration.metrics import MigrationMetrics
from services.worker.migration.source import MigrationSource
from services.worker.streams import Route, RouteTable

WAIT_S = 30.0  # bound on anything the tests await (a migration of a few blocks takes milliseconds)
HOST = "test-host/boot"
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


# ---- fakes ------------------------------------------------------------------------------------------

class InlineDriver:
    """EngineDriver's `call`, run inline: the test steps the engine itself, between calls."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls = 0

    async def call(self, fn: Any, timeout_s: float = 10.0) -> Any:
        self.calls += 1
        return fn(self.engine)

    def busy_s(self) -> float:
        return 0.0


@dataclass
class FakeStreamer:
    published: list[RequestOutput] = field(default_factory=list)
    announced: list[tuple[str, str | None]] = field(default_factory=list)

    def publish(self, outputs: list[RequestOutput]) -> list[str]:
        self.published.extend(outputs)
        return []

    def announce(self, route: Route, control_endpoint: str | None = None) -> None:
        self.announced.append((route.request_id, control_endpoint))


@dataclass
class FakeLink:
    dirty: int = 0
    heard: list[str] = field(default_factory=list)
    sent: list[object] = field(default_factory=list)

    def mark_dirty(self) -> None:
        self.dirty += 1

    def heard_from(self, sender_id: str) -> None:
        self.heard.append(sender_id)

    async def send(self, msg: object) -> None:
        self.sent.append(msg)


@dataclass
class FakeSocket:
    sent: list[tuple[object, bytes | None]] = field(default_factory=list)

    async def send(self, msg: object, peer: bytes | None = None, timeout_s: float = 1.0, **_: Any) -> None:
        self.sent.append((msg, peer))


def wire(msg: Any) -> Any:
    """`msg` as the receiver decodes it (type tag, version and field checks of the real codec)."""
    return decode(encode(msg))


class ReplySocket:
    """A destination's migration socket: the replies it sends (from tasks) resolve the request
    they answer (by `reply_to`), as a Requester's would."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[Any]] = {}

    async def send(self, msg: Any, peer: bytes | None = None, timeout_s: float = 1.0, **_: Any) -> None:
        fut = self.waiting.pop(msg.reply_to, None)
        if fut is not None and not fut.done():
            fut.set_result(wire(msg))


async def ask(destination: MigrationDestination, sock: ReplySocket, msg: Any, peer: bytes,
              frames: list[Any] | None = None) -> Any:
    """Deliver `msg` (through the codec) to the destination's handler; its reply."""
    fut = sock.waiting[msg.msg_id] = asyncio.get_running_loop().create_future()
    payload = [bytes(memoryview(f)) for f in frames or []]
    direct = await destination(Received(wire(msg), payload, peer))
    if direct is not None:
        sock.waiting.pop(msg.msg_id, None)
        return wire(direct)
    async with asyncio.timeout(WAIT_S):
        return await fut


class DirectRequester:
    """The source's Requester for one destination, without a socket: each request goes through the
    codec to the destination's handler, as its migration socket would deliver it."""

    def __init__(self, destination: MigrationDestination, sock: ReplySocket, peer: bytes) -> None:
        self.destination, self.sock, self.peer = destination, sock, peer

    async def request(self, msg: Any, timeout_s: float, frames: list[Any] | None = None,
                      raise_errors: bool = True) -> Any:
        return await ask(self.destination, self.sock, msg, self.peer, frames)

    async def send(self, msg: Any, timeout_s: float | None = None) -> None:
        await self.destination(Received(wire(msg), [], self.peer))  # one-way (MigrateAbort)


class DirectPeers:
    def __init__(self, destination: MigrationDestination, sock: ReplySocket) -> None:
        self.requester = DirectRequester(destination, sock, b"source-peer")

    def get(self, endpoint: str) -> DirectRequester:
        return self.requester


# ---- building a worker's parts ---------------------------------------------------------------------

def worker_config(**kw: Any) -> WorkerConfig:
    return WorkerConfig(**{"engine": "torch", "model": "tiny", "dtype": "float32", "block_size": 4,
                           "num_blocks": 64, "threads": 1, **kw})


@dataclass
class Parts:
    ctx: WorkerContext
    engine: Any
    streamer: FakeStreamer
    link: FakeLink


def make_parts(worker_id: str, **cfg: Any) -> Parts:
    wc = worker_config(worker_id=worker_id, **cfg)
    engine, info = build_engine(wc)
    streamer, link = FakeStreamer(), FakeLink()
    ctx = WorkerContext(worker_id=worker_id, cfg=wc, info=info, control_endpoint=f"tcp://127.0.0.1:1/{worker_id}",
                        kv_tensor=engine.kv_tensor, driver=InlineDriver(engine), routes=RouteTable(),  # type: ignore[arg-type]
                        streamer=streamer, link=link, state=WorkerState())  # type: ignore[arg-type]
    return Parts(ctx, engine, streamer, link)


@dataclass
class Lifecycle:
    draining: list[bool] = field(default_factory=list)
    stops: list[dict[str, Any]] = field(default_factory=list)

    def request_stop(self, **kw: Any) -> None:
        self.stops.append(kw)


def control_handler(parts: Parts) -> tuple[ControlHandler, FakeSocket, Lifecycle, MigrationSource]:
    sock, life = FakeSocket(), Lifecycle()
    source = MigrationSource(parts.ctx, None, None, CopyThreads(19), MigrationMetrics(), HOST)  # type: ignore[arg-type]
    handler = ControlHandler(parts.ctx, sock, source, set_draining=life.draining.append,  # type: ignore[arg-type]
                             request_stop=life.request_stop)
    return handler, sock, life, source


def add_msg(rid: str, prompt: list[int] | None = None, frontend: str = "fe-0", incarnation: str = "",
            sampling: SamplingParams = GREEDY) -> AddRequest:
    return AddRequest(request_id=rid, prompt_token_ids=prompt or [1, 2, 3, 4, 5, 6, 7], sampling=sampling,
                      frontend_id=frontend, reply_address="tcp://127.0.0.1:2", frontend_incarnation=incarnation)


async def settle(handler: ControlHandler) -> None:
    """Let the handler's add/abort tasks finish (they reply from tasks)."""
    async with asyncio.timeout(WAIT_S):
        while handler._tasks:
            await asyncio.wait(set(handler._tasks))


async def deliver(handler: ControlHandler, msg: Any, peer: bytes = b"peer") -> Any:
    reply = await handler(Received(wire(msg), [], peer))
    await settle(handler)
    return reply


def replies(sock: FakeSocket) -> list[object]:
    return [m for m, _ in sock.sent]


def blocks_in_use(engine: Any) -> int:
    stats = engine.stats()
    return stats.num_blocks - stats.num_free_blocks


# ---- the control handler ---------------------------------------------------------------------------

async def test_add_routes_the_request_into_the_engine_and_acks() -> None:
    p = make_parts("w0")
    handler, sock, _, _ = control_handler(p)
    assert await deliver(handler, add_msg("r1")) is None  # answered from its task
    assert [type(m) for m in replies(sock)] == [Ack] and replies(sock)[0].detail == "added"  # type: ignore[attr-defined]
    assert "r1" in p.ctx.routes and p.engine.num_waiting() == 1 and p.link.dirty == 1


async def test_add_is_refused_for_a_duplicate_id_while_draining_and_while_stopping() -> None:
    p = make_parts("w0")
    handler, sock, _, _ = control_handler(p)
    await deliver(handler, add_msg("r1"))
    dup = await deliver(handler, add_msg("r1"))
    assert isinstance(dup, ErrorReply) and dup.code == ErrorCode.REFUSED and "already running" in dup.message
    p.ctx.state.draining = True
    assert "draining" in (await deliver(handler, add_msg("r2"))).message
    p.ctx.state.stopping = True
    assert "stopping" in (await deliver(handler, add_msg("r3"))).message
    assert p.ctx.routes.ids() == ["r1"] and p.engine.num_waiting() == 1


async def test_a_full_waiting_queue_is_overloaded_and_an_invalid_request_is_invalid() -> None:
    p = make_parts("w0", max_waiting=1)
    handler, sock, _, _ = control_handler(p)
    await deliver(handler, add_msg("r1"))
    await deliver(handler, add_msg("r2"))
    await deliver(handler, add_msg("r3", prompt=[10**6]))  # not a token id of the tiny model
    codes = [getattr(m, "code", None) for m in replies(sock)]
    assert codes == [None, ErrorCode.OVERLOADED, ErrorCode.OVERLOADED]
    p.engine.abort_request("r1")
    p.ctx.routes.pop("r1")
    await deliver(handler, add_msg("r3", prompt=[10**6]))
    last = replies(sock)[-1]
    assert isinstance(last, ErrorReply) and last.code == ErrorCode.INVALID
    assert p.ctx.routes.ids() == [] and blocks_in_use(p.engine) == 0  # refused adds leave nothing routed


async def test_abort_sends_the_final_batch_and_frees_the_blocks() -> None:
    p = make_parts("w0")
    handler, sock, _, _ = control_handler(p)
    await deliver(handler, add_msg("r1"))
    p.engine.step()
    assert blocks_in_use(p.engine) > 0
    await deliver(handler, AbortRequest(request_id="r1", reason="client gone"))
    ack = replies(sock)[-1]
    assert isinstance(ack, Ack) and ack.ok and ack.detail == "aborted"
    assert [o.finish_reason for o in p.streamer.published] == ["abort"]
    assert blocks_in_use(p.engine) == 0
    p.ctx.routes.pop("r1")  # the real streamer unroutes on a final batch
    await deliver(handler, AbortRequest(request_id="r1"))
    again = replies(sock)[-1]
    assert isinstance(again, Ack) and not again.ok and "not on this worker" in again.detail


async def test_ping_drain_and_shutdown_reach_the_link_and_the_lifecycle() -> None:
    p = make_parts("w0")
    handler, sock, life, _ = control_handler(p)
    pong = await deliver(handler, Ping(sender_id="scheduler"))
    assert isinstance(pong, Pong) and pong.sender_id == "w0" and p.link.heard == ["scheduler"]
    ack = await deliver(handler, Drain(draining=True))
    assert isinstance(ack, Ack) and ack.detail == "draining" and life.draining == [True]
    assert await deliver(handler, Shutdown(drain_first=True, reason="scale in")) is None
    assert life.stops == [{"drain_first": True, "reason": "scale in"}]
    assert isinstance(replies(sock)[-1], Ack)  # acked before the stop


async def test_requests_of_a_silent_or_restarted_frontend_are_aborted() -> None:
    p = make_parts("w0")
    handler, _, _, _ = control_handler(p)
    await deliver(handler, Heartbeat(sender_id="fe-a", role="frontend", incarnation="0001"))
    await deliver(handler, add_msg("a1", frontend="fe-a", incarnation="0001"))
    await deliver(handler, add_msg("b1", frontend="fe-b", incarnation="0001"))
    await deliver(handler, add_msg("b2", frontend="fe-b", incarnation="0002"))  # fe-b restarted
    assert [o.request_id for o in p.streamer.published] == ["b1"]
    handler.frontend_seen["fe-a"] -= 60.0
    await handler.abort_lost_frontends(timeout_s=5.0)
    assert sorted(o.request_id for o in p.streamer.published) == ["a1", "b1"]
    assert p.engine.num_waiting() == 1  # b2, of fe-b's newer start, goes on


async def test_migrate_commands_are_validated_by_the_source() -> None:
    p = make_parts("w0")
    handler, _, _, _ = control_handler(p)
    cmd = dict(migration_id="m1", dst_worker_id="w0", dst_endpoint="tcp://127.0.0.1:3")
    to_self = await deliver(handler, MigrateCommand(**cmd))
    assert isinstance(to_self, ErrorReply) and to_self.code == ErrorCode.INVALID
    missing = await deliver(handler, MigrateCommand(**{**cmd, "dst_worker_id": "w1", "request_id": "nope"}))
    assert isinstance(missing, ErrorReply) and missing.code == ErrorCode.NOT_FOUND


# ---- both migration roles, without sockets --------------------------------------------------------

def run_to_end(engine: Any, rid: str) -> list[int]:
    tokens: list[int] = []
    for _ in range(200):
        for out in engine.step():
            if out.request_id == rid:
                tokens.extend(out.new_token_ids)
                if out.finished:
                    return tokens
    raise AssertionError(f"{rid} did not finish")


@pytest.mark.parametrize("path", ["frames", "shm"])
async def test_a_live_migration_moves_the_request_and_its_kv(path: str) -> None:
    prompt = list(range(3, 30))  # 27 tokens: several full blocks of 4, and a partial one
    ref = make_parts("ref")
    ref.engine.add_request("r", prompt, EngineSamplingParams(max_tokens=24, ignore_eos=True))
    want = run_to_end(ref.engine, "r")

    src, dst = make_parts("src", migration_path=path), make_parts("dst", migration_path=path)
    threads, sock = CopyThreads(19), ReplySocket()
    destination = MigrationDestination(dst.ctx, sock, threads, MigrationMetrics(), HOST)  # type: ignore[arg-type]
    pool = SenderPool(src.engine.kv_tensor, 1 << 12, 1 << 20, max_idle=1)  # small chunks: several per stage
    source = MigrationSource(src.ctx, DirectPeers(destination, sock), pool, threads, MigrationMetrics(),  # type: ignore[arg-type]
                             HOST)
    try:
        route = Route("r", "fe-0", "tcp://127.0.0.1:2")
        src.ctx.routes.add(route)
        src.engine.add_request("r", prompt, EngineSamplingParams(max_tokens=24, ignore_eos=True))
        before = []
        for _ in range(5):  # the prefill and four decode steps
            before += [t for o in src.engine.step() for t in o.new_token_ids]
        route.tokens_sent = len(before)  # what the real streamer counts as it streams them
        m = await source.start(MigrateCommand(migration_id="m1", request_id="r", dst_worker_id="dst",
                                              dst_endpoint="inproc://dst"))
        async with asyncio.timeout(WAIT_S):
            await m.done.wait()
        assert (m.outcome, m.abort_reason, m.path) == ("committed", "", path)
        assert m.blocks == -(-(len(prompt) + len(before) - 1) // 4)  # every block with computed KV
        assert "r" not in src.ctx.routes and blocks_in_use(src.engine) == 0 and not src.engine.has_unfinished_requests()
        assert "r" in dst.ctx.routes and dst.streamer.announced == [("r", None)]
        async with asyncio.timeout(WAIT_S):  # the result goes to the scheduler from a task
            while not src.link.sent:
                await asyncio.sleep(0.01)
        assert [type(r).__name__ for r in src.link.sent] == ["MigrationResult"]
        assert before + run_to_end(dst.engine, "r") == want  # the moved KV is what it continues from
    finally:
        await source.aclose()
        await destination.aclose()
        threads.shutdown()


def reserve_msg(dst: Parts, mid: str, n: int, **kw: Any) -> MigrateReserve:
    """A source's MigrateReserve (stage 0 unless `stage` says otherwise) fitting `dst`'s KV layout."""
    return MigrateReserve(**{"migration_id": mid, "request_id": f"req-{mid}", "src_worker_id": "src", "stage": 0,
                             "num_blocks": n, "block_size": dst.ctx.info.block_size,
                             "kv_bytes_per_block": dst.ctx.info.kv_bytes_per_block,
                             "kv_dtype": str(dst.engine.kv_tensor.dtype).removeprefix("torch."), "src_host": HOST,
                             "src_device": "cpu", **kw})


async def test_a_destination_refuses_what_it_cannot_hold_and_frees_an_aborted_reservation() -> None:
    dst = make_parts("dst")
    sock = ReplySocket()
    destination = MigrationDestination(dst.ctx, sock, CopyThreads(19), MigrationMetrics(), HOST)  # type: ignore[arg-type]

    def reserve(mid: str, n: int, **kw: Any) -> MigrateReserve:
        return reserve_msg(dst, mid, n, **kw)

    try:
        layout = await ask(destination, sock, reserve("m0", 2, block_size=8), b"p")
        assert not layout.ok and layout.reason.startswith("layout")
        full = await ask(destination, sock, reserve("m1", 10_000), b"p")
        assert not full.ok and full.reason.startswith("no_room") and blocks_in_use(dst.engine) == 0
        ok = await ask(destination, sock, reserve("m2", 3), b"p")
        assert ok.ok and len(ok.block_ids) == 3 and blocks_in_use(dst.engine) == 3
        other_peer = await ask(destination, sock, reserve("m2", 1, stage=1), b"someone else")
        assert isinstance(other_peer, ErrorReply) and other_peer.code == ErrorCode.NOT_FOUND
        assert await destination(Received(wire(MigrateAbort(migration_id="m2", reason="test")), [], b"p")) is None
        async with asyncio.timeout(WAIT_S):
            while len(destination) or blocks_in_use(dst.engine):
                await asyncio.sleep(0.01)
        dst.ctx.state.draining = True
        drained = await ask(destination, sock, reserve("m3", 1), b"p")
        assert not drained.ok and drained.reason == "draining"
    finally:
        await destination.aclose()


# ---- prefix-aware transfer: the destination links what its prefix cache holds ----------------------

LONG_PROMPT = list(range(40, 81))  # 41 tokens: 10 full blocks of 4, and one more token


async def migrate_with_a_twin(dst: Parts, path: str = "frames", mode: str = "live",
                              ) -> tuple[Any, list[int], list[int], Parts]:
    """On a fresh source, `r` and its twin `t` (same prompt: t shares r's prompt blocks there)
    decode a few tokens; `r` moves to `dst`. The migration, then each one's tokens when run to the
    end (r at the destination, t at the source), and the source's parts."""
    src = make_parts("src", migration_path=path)
    threads, sock = CopyThreads(19), ReplySocket()
    destination = MigrationDestination(dst.ctx, sock, threads, MigrationMetrics(), HOST)  # type: ignore[arg-type]
    pool = SenderPool(src.engine.kv_tensor, 1 << 12, 1 << 20, max_idle=1)
    source = MigrationSource(src.ctx, DirectPeers(destination, sock), pool, threads, MigrationMetrics(),  # type: ignore[arg-type]
                             HOST)
    sampling = EngineSamplingParams(max_tokens=24, ignore_eos=True)
    try:
        route = Route("r", "fe-0", "tcp://127.0.0.1:2")
        src.ctx.routes.add(route)
        src.engine.add_request("r", LONG_PROMPT, sampling)
        got: dict[str, list[int]] = {"r": [], "t": []}
        for i in range(6):  # r's prefill (it caches the prompt), then t's (a hit) and decodes
            if i == 1:
                src.engine.add_request("t", LONG_PROMPT, sampling)
            for o in src.engine.step():
                got[o.request_id] += o.new_token_ids
        assert src.engine.block_table("t")[:10] == src.engine.block_table("r")[:10]
        route.tokens_sent = len(got["r"])
        m = await source.start(MigrateCommand(migration_id="m1", request_id="r", dst_worker_id="dst",
                                              dst_endpoint="inproc://dst", mode=mode))  # type: ignore[arg-type]
        async with asyncio.timeout(WAIT_S):
            await m.done.wait()
            while not src.link.sent:  # the result goes to the scheduler from a task
                await asyncio.sleep(0.01)
        assert (m.outcome, m.abort_reason) == ("committed", ""), m
        result = src.link.sent[0]
        assert (result.blocks, result.blocks_skipped) == (m.blocks, m.blocks_skipped)  # type: ignore[attr-defined]
        assert source.metrics.value("kvferry_migration_blocks_skipped_total") == m.blocks_skipped
        r = got["r"] + run_to_end(dst.engine, "r")
        t = got["t"] + run_to_end(src.engine, "t")  # its blocks, shared with r, stayed here
        for e in (src.engine, dst.engine):
            e.check_integrity()
        return m, r, t, src
    finally:
        await source.aclose()
        await destination.aclose()
        threads.shutdown()


@pytest.mark.parametrize(("path", "mode"), [("frames", "live"), ("shm", "live"), ("frames", "blocking")])
async def test_a_destination_caching_the_prompt_is_sent_only_the_blocks_it_lacks(path: str, mode: str) -> None:
    """Live: stage 0 skips the cached blocks; blocking (no pre-copy): the one stop-and-copy does."""
    ref = make_parts("ref")
    ref.engine.add_request("r", LONG_PROMPT, EngineSamplingParams(max_tokens=24, ignore_eos=True))
    want = run_to_end(ref.engine, "r")
    warm = make_parts("warm", migration_path=path)
    warm.engine.add_request("w", LONG_PROMPT, EngineSamplingParams(max_tokens=1, ignore_eos=True))
    run_to_end(warm.engine, "w")  # the prompt's 10 full blocks stay cached there
    hot, r_hot, t_hot, _ = await migrate_with_a_twin(warm, path, mode)
    cold, r_cold, t_cold, _ = await migrate_with_a_twin(make_parts("cold", migration_path=path), path, mode)
    assert r_hot == t_hot == r_cold == t_cold == want  # moved and unmoved requests agree
    assert (hot.blocks_skipped, cold.blocks_skipped) == (10, 0)
    assert hot.stages == cold.stages == (1 if mode == "blocking" else 2)
    total = hot.blocks + hot.blocks_skipped
    assert total == cold.blocks and hot.blocks <= total - 10 + 1  # at most its private blocks + 1
    per_block = warm.ctx.info.kv_bytes_per_block
    assert (hot.bytes_moved, cold.bytes_moved) == (hot.blocks * per_block, cold.blocks * per_block)


async def test_linked_cached_blocks_go_back_to_the_cache_when_the_migration_aborts() -> None:
    dst = make_parts("dst")
    dst.engine.add_request("w", LONG_PROMPT, EngineSamplingParams(max_tokens=1, ignore_eos=True))
    run_to_end(dst.engine, "w")
    cached = dst.engine.stats().num_cached_blocks
    assert cached >= 10 and blocks_in_use(dst.engine) == 0
    sock = ReplySocket()
    destination = MigrationDestination(dst.ctx, sock, CopyThreads(19), MigrationMetrics(), HOST)  # type: ignore[arg-type]

    def reserve(mid: str, n: int, **kw: Any) -> MigrateReserve:
        return reserve_msg(dst, mid, n, **kw)

    async def abort(mid: str) -> None:
        await destination(Received(wire(MigrateAbort(migration_id=mid, reason="test")), [], b"p"))
        async with asyncio.timeout(WAIT_S):
            while mid in destination.incoming or blocks_in_use(dst.engine):
                await asyncio.sleep(0.01)

    try:
        old = await ask(destination, sock, reserve("m0", 12), b"p")  # an older source offers no tokens
        assert old.ok and old.cached_blocks == 0 and blocks_in_use(dst.engine) == 12
        await abort("m0")
        salted = await ask(destination, sock, reserve("m1", 12, token_ids=LONG_PROMPT[:40], cache_salt="t-b"), b"p")
        assert salted.ok and salted.cached_blocks == 0  # another tenant's salt: no hit
        await abort("m1")
        hit = await ask(destination, sock, reserve("m2", 12, token_ids=LONG_PROMPT[:40]), b"p")
        assert hit.ok and hit.cached_blocks == 10 and len(hit.block_ids) == 12 and blocks_in_use(dst.engine) == 12
        assert dst.engine.stats().num_cached_blocks >= 10  # linked ones stay registered (and unevictable)
        await abort("m2")
        dst.engine.check_integrity()
        assert dst.engine.stats().num_cached_blocks >= 10  # released into the cache, not dropped
        dst.engine.add_request("again", LONG_PROMPT, EngineSamplingParams(max_tokens=1, ignore_eos=True))
        assert dst.engine.scheduler.schedule().scheduled[0].start == 40  # still hits
    finally:
        await destination.aclose()


async def test_a_frontend_that_dies_before_its_first_heartbeat_still_loses_its_requests() -> None:
    """A kvferry frontend (it sends its incarnation) is watched from its first AddRequest; a client
    that neither heartbeats nor sends one is not (its requests run until they end)."""
    p = make_parts("w0")
    handler, _, _, _ = control_handler(p)
    await deliver(handler, add_msg("f1", frontend="fe-new", incarnation="0001"))
    await deliver(handler, add_msg("raw1", frontend="raw-client"))
    assert set(handler.frontend_seen) == {"fe-new"}
    handler.frontend_seen["fe-new"] -= 60.0
    await handler.abort_lost_frontends(timeout_s=5.0)
    assert [o.request_id for o in p.streamer.published] == ["f1"] and p.engine.num_waiting() == 1
