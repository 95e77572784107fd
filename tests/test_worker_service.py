"""The worker service as a real process on 127.0.0.1: the test plays the scheduler (a ROUTER that
answers RegisterWorker) and the frontend (a PULL at the requests' reply address).

Every wait is bounded; every process started here is killed in a finally.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
import zmq
import zmq.asyncio

from protocol import (
    PROTOCOL_VERSION,
    AbortRequest,
    Ack,
    AddRequest,
    CancelMigration,
    Drain,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    LoadReport,
    MigrateCommand,
    Ping,
    Pong,
    RegisterReply,
    RegisterWorker,
    SamplingParams,
    Shutdown,
    TokenBatches,
    encode,
)
from protocol.sockets import MessageSocket, request
from testkit.fakes import FakeScheduler, TokenSink
from testkit.wait import until
from testkit.worker import WorkerProcess

WAIT_S = 10.0  # generous bound for anything that should take well under a second
STOP_S = 20.0  # a worker asked to stop now is gone within this, on a loaded machine too
SLOW_STOP = {"KVFERRY_WORKER_STOP_DEADLINE_S": "60"}  # a drain would outlast STOP_S: "at once" is measurable


# ---- ports ------------------------------------------------------------------------------------

def free_base_port() -> int:
    """A base port whose scheduler, frontend-0 and worker-0 ports are all free."""
    from services.launcher import free_ports

    return free_ports(1)[1]  # from this pytest worker's own ranges (tests/conftest.py)


# ---- the fake scheduler and frontend: testkit.fakes; the worker process: testkit.worker -----------

class Cluster:
    """One test's fake scheduler + fake frontend + a client DEALER to the worker's control socket."""

    def __init__(self, base_port: int, tmp: Path) -> None:
        self.base_port, self.tmp = base_port, tmp
        self.ctx = zmq.asyncio.Context()
        self.scheduler_endpoint = f"tcp://127.0.0.1:{base_port}"
        self.scheduler = FakeScheduler(self.ctx, self.scheduler_endpoint)
        # one worker, nothing moves: every batch starts at the next index, nothing after the final one
        self.frontend = TokenSink(self.ctx, f"tcp://127.0.0.1:{base_port + 2}", in_order=True,
                                  name="fake-frontend", label="the fake frontend")
        self.workers: list[WorkerProcess] = []
        self.client: MessageSocket | None = None

    async def start_worker(self, *extra: str, env: dict[str, str] | None = None) -> WorkerProcess:
        w = WorkerProcess(self.base_port, self.tmp, *extra, env=env, name=f"worker-{self.base_port}")
        self.workers.append(w)
        line = await w.ready()
        assert line == f"READY worker worker-0 {w.control}", (line, w.logs())
        self.client = MessageSocket.connect(self.ctx, zmq.DEALER, w.control, (Ack, ErrorReply, Pong), name="client")
        return w

    def add(self, rid: str, prompt: list[int] | None = None, max_tokens: int = 8, **kw: Any) -> AddRequest:
        return AddRequest(request_id=rid, prompt_token_ids=prompt or [1, 2, 3, 4],
                          sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                          frontend_id="fe-test", reply_address=self.frontend.endpoint, **kw)

    async def call(self, msg: Any, timeout: float = WAIT_S) -> Any:
        assert self.client is not None
        return await request(self.client, msg, timeout, raise_errors=False)

    async def close(self) -> None:
        for w in self.workers:
            w.kill()
        if self.client is not None:
            self.client.close()
        await self.scheduler.close()
        await self.frontend.close()
        self.ctx.term()


@pytest.fixture
async def cluster(tmp_path):
    c = Cluster(free_base_port(), tmp_path)
    try:
        yield c
    finally:
        await c.close()


SIM = ("--engine", "sim", "--model", "llama7b-a10", "--num-blocks", "64")

pytestmark = pytest.mark.e2e  # real worker processes (but for two in-process tests at the end)


# ---- tests ---------------------------------------------------------------------------------------

async def test_registers_streams_and_reports(cluster):
    w = await cluster.start_worker(*SIM)
    reg = await cluster.scheduler.wait_for(lambda m: isinstance(m, RegisterWorker))
    assert reg.worker_id == "worker-0" and reg.engine == "sim" and reg.model == "llama7b-a10"
    assert reg.endpoints.control == w.control
    assert reg.endpoints.migration == f"tcp://127.0.0.1:{cluster.base_port + 101}"
    assert (reg.total_blocks, reg.block_size) == (64, 16)
    assert reg.kv_bytes_per_block == 524288 * 16 and reg.pid == w.proc.pid and reg.max_running and reg.host

    acks = await asyncio.gather(*(cluster.call(cluster.add(f"r{i}", max_tokens=6 + i)) for i in range(3)))
    assert all(isinstance(a, Ack) and a.ok for a in acks), acks
    for i in range(3):
        fin = await cluster.frontend.finished(f"r{i}")
        assert fin.finish_reason == "length" and fin.worker_id == "worker-0" and fin.error is None
        assert len(cluster.frontend.tokens[f"r{i}"]) == 6 + i

    busy = await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport) and m.free_blocks < m.total_blocks)
    assert busy.worker_id == "worker-0" and busy.total_blocks == 64
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport) and m.free_blocks == 64
                                     and m.seq > busy.seq and not m.requests)
    seqs = [r.seq for r in cluster.scheduler.reports()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert any(r.requests and r.requests[0].request_id.startswith("r") for r in cluster.scheduler.reports())
    await cluster.scheduler.wait_for(lambda m: isinstance(m, Heartbeat) and m.sender_id == "worker-0")

    # a resumed request: its indices continue from first_index
    ack = await cluster.call(cluster.add("resumed", prompt=[1, 2, 3, 4, 5, 6], max_tokens=3, first_index=2))
    assert isinstance(ack, Ack)
    cluster.frontend.tokens["resumed"] = [5, 6]  # what the frontend already holds
    await cluster.frontend.finished("resumed")
    assert len(cluster.frontend.tokens["resumed"]) == 5


async def test_abort_mid_stream_frees_blocks(cluster):
    await cluster.start_worker(*SIM)
    assert isinstance(await cluster.call(cluster.add("long", max_tokens=500)), Ack)
    await cluster.frontend.until(lambda: len(cluster.frontend.tokens.get("long", [])) >= 3)
    start = len(cluster.scheduler.messages)
    ack = await cluster.call(AbortRequest(request_id="long", reason="client gone"))
    assert isinstance(ack, Ack) and ack.ok, ack
    fin = await cluster.frontend.finished("long")
    assert fin.finish_reason == "abort"
    assert len(cluster.frontend.tokens["long"]) < 500
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport) and m.free_blocks == m.total_blocks
                                     and not m.requests, start=start)
    again = await cluster.call(AbortRequest(request_id="long"))
    assert isinstance(again, Ack) and not again.ok
    unknown = await cluster.call(AbortRequest(request_id="never-seen"))
    assert isinstance(unknown, Ack) and not unknown.ok


async def test_bad_input_gets_error_replies_and_worker_keeps_serving(cluster):
    await cluster.start_worker(*SIM)
    raw = cluster.ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(cluster.workers[0].control)
    ping = encode(Ping(sender_id="t"))
    valid_add = msgpack.unpackb(encode(cluster.add("x")))
    bad_frames = {
        "random bytes": os.urandom(64),
        "truncated msgpack": ping[: len(ping) // 2],
        "unknown type": msgpack.packb([PROTOCOL_VERSION, "NoSuchMessage", {}]),
        "wrong version": msgpack.packb([PROTOCOL_VERSION + 7, "Ping", {"sender_id": "t"}]),
        "not for this socket": encode(RegisterReply(reply_to="x", scheduler_id="s")),
        "empty prompt": msgpack.packb([PROTOCOL_VERSION, "AddRequest", {**valid_add[2], "prompt_token_ids": []}]),
        "max_tokens 0": msgpack.packb([PROTOCOL_VERSION, "AddRequest",
                                       {**valid_add[2], "sampling": {"max_tokens": 0}}]),
    }
    try:
        for name, frame in bad_frames.items():
            await raw.send(frame)
            reply = msgpack.unpackb(await asyncio.wait_for(raw.recv(), WAIT_S))
            assert reply[1] == "ErrorReply", (name, reply)
            assert reply[2]["code"] in {"malformed", "unknown_type", "version_mismatch", "invalid"}, (name, reply)
    finally:
        raw.close()

    # rejected by the engine (token id beyond the sim vocabulary): INVALID with the engine's reason
    bad_token = await cluster.call(cluster.add("big-token", prompt=[1, 10**6]))
    assert isinstance(bad_token, ErrorReply) and bad_token.code == ErrorCode.INVALID, bad_token
    assert "prompt token ids" in bad_token.message
    # a migration with nothing to migrate, and a cancel of an unknown one: clear answers
    mig = await cluster.call(MigrateCommand(migration_id="m1", dst_worker_id="w2",
                                            dst_endpoint="tcp://127.0.0.1:1"))
    assert isinstance(mig, ErrorReply) and mig.code == ErrorCode.NOT_FOUND and "migrate" in mig.message, mig
    cancel = await cluster.call(CancelMigration(migration_id="m1"))
    assert isinstance(cancel, Ack) and not cancel.ok
    # a duplicate id while the first runs: refused
    assert isinstance(await cluster.call(cluster.add("dup", max_tokens=200)), Ack)
    dup = await cluster.call(cluster.add("dup"))
    assert isinstance(dup, ErrorReply) and dup.code == ErrorCode.REFUSED, dup
    # an expired request
    late = await cluster.call(msgspec.structs.replace(cluster.add("late"), deadline_ms=1))
    assert isinstance(late, ErrorReply) and late.code == ErrorCode.EXPIRED
    # and a normal request still works
    pong = await cluster.call(Ping(sender_id="t"))
    assert isinstance(pong, Pong) and pong.sender_id == "worker-0"
    assert isinstance(await cluster.call(cluster.add("ok", max_tokens=4)), Ack)
    fin = await cluster.frontend.finished("ok")
    assert fin.finish_reason == "length" and len(cluster.frontend.tokens["ok"]) == 4
    assert cluster.workers[0].proc.poll() is None
    assert isinstance(await cluster.call(AbortRequest(request_id="dup")), Ack)


async def test_overloaded_when_the_waiting_queue_is_full(cluster):
    await cluster.start_worker(*SIM, "--max-num-seqs", "1", env={"KVFERRY_WORKER_MAX_WAITING": "2"})
    replies = [await cluster.call(cluster.add(f"q{i}", max_tokens=300)) for i in range(6)]
    codes = [r.code if isinstance(r, ErrorReply) else "ack" for r in replies]
    assert codes[:2] == ["ack", "ack"] and ErrorCode.OVERLOADED in codes, codes
    for i, r in enumerate(replies):
        if isinstance(r, Ack):
            await cluster.call(AbortRequest(request_id=f"q{i}"))


async def test_scheduler_restart_makes_the_worker_register_again(cluster):
    # A huge heartbeat timeout: the first re-registration below must come from the not_found answer.
    await cluster.start_worker(*SIM, env={"KVFERRY_SCHEDULER_HEARTBEAT_TIMEOUT_MS": "60000"})
    await cluster.scheduler.wait_for(lambda m: isinstance(m, RegisterWorker))
    assert isinstance(await cluster.call(cluster.add("through", max_tokens=60)), Ack)

    # 1. the scheduler restarts at once (same id): it answers reports with not_found
    await cluster.scheduler.close()
    cluster.scheduler = FakeScheduler(cluster.ctx, cluster.scheduler_endpoint, not_found=True)
    reg = await cluster.scheduler.wait_for(lambda m: isinstance(m, RegisterWorker))
    assert reg.worker_id == "worker-0"
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport))
    # the request kept streaming all along
    fin = await cluster.frontend.finished("through")
    assert fin.finish_reason == "length" and len(cluster.frontend.tokens["through"]) == 60


async def test_kv_events_reach_the_scheduler_with_a_reset_after_registering_and_on_request(cluster):
    from protocol import KvEvents, ResyncKvEvents
    from protocol.kv_hash import prompt_hashes, root_from_namespace

    await cluster.start_worker(*SIM)
    reg = await cluster.scheduler.wait_for(lambda m: isinstance(m, RegisterWorker))
    assert reg.kv_namespace  # the sim engine caches prefixes
    first = await cluster.scheduler.wait_for(lambda m: isinstance(m, KvEvents))
    assert first.reset and first.seq == 0 and first.worker_id == "worker-0"
    prompt = list(range(1, 66))  # 4 full blocks
    assert isinstance(await cluster.call(cluster.add("p", prompt=prompt, max_tokens=2)), Ack)
    await cluster.frontend.finished("p")
    want = set(prompt_hashes(prompt, 16, root_from_namespace(reg.kv_namespace)))
    stored = await cluster.scheduler.wait_for(lambda m: isinstance(m, KvEvents) and want <= set(m.stored))
    assert not stored.reset
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport) and m.num_cached_blocks >= 4)
    seqs = [m.seq for m in cluster.scheduler.messages if isinstance(m, KvEvents)]
    assert seqs == list(range(len(seqs)))  # consecutive from 0
    # the scheduler lost track: it asks, the worker sends its whole cache again
    start = len(cluster.scheduler.messages)
    await cluster.scheduler.sock.send(ResyncKvEvents(scheduler_id="sched-1", reason="test"), peer=b"worker-0")
    again = await cluster.scheduler.wait_for(lambda m: isinstance(m, KvEvents) and m.reset, start=start)
    assert want <= set(again.stored) and again.seq > seqs[-1]


async def test_silent_scheduler_is_detected_by_heartbeat_timeout(cluster):
    await cluster.start_worker(*SIM, env={"KVFERRY_SCHEDULER_HEARTBEAT_TIMEOUT_MS": "600"})
    w = cluster.workers[0]
    await cluster.scheduler.wait_for(lambda m: isinstance(m, RegisterWorker))
    lost_before = w.log_text().count("worker.scheduler_lost")
    await cluster.scheduler.close()  # gone: no pongs any more
    await w.wait_log("worker.scheduler_lost", lost_before + 1)  # the worker noticed the silence
    cluster.scheduler = FakeScheduler(cluster.ctx, cluster.scheduler_endpoint, scheduler_id="sched-2")
    await cluster.scheduler.wait_for(lambda m: isinstance(m, RegisterWorker))
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport))
    assert isinstance(await cluster.call(cluster.add("after", max_tokens=3)), Ack)
    await cluster.frontend.finished("after")


async def test_drain_and_shutdown_commands(cluster):
    w = await cluster.start_worker(*SIM)
    ack = await cluster.call(Drain(draining=True))
    assert isinstance(ack, Ack) and ack.ok
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport) and m.draining)
    refused = await cluster.call(cluster.add("no"))
    assert isinstance(refused, ErrorReply) and refused.code == ErrorCode.REFUSED
    assert isinstance(await cluster.call(Drain(draining=False)), Ack)
    assert isinstance(await cluster.call(cluster.add("yes", max_tokens=500)), Ack)
    await cluster.frontend.until(lambda: len(cluster.frontend.tokens.get("yes", [])) >= 1)
    ack = await cluster.call(Shutdown(drain_first=False, reason="test"))
    assert isinstance(ack, Ack)
    assert await w.wait_exit(WAIT_S) == 0, w.logs()
    fin = await cluster.frontend.finished("yes")  # the unfinished request ends with an error, not silence
    assert fin.finish_reason == "error" and "stopped" in (fin.error or "")
    await cluster.scheduler.wait_for(lambda m: type(m).__name__ == "Deregister")


async def test_sigint_stops_at_once(cluster):
    w = await cluster.start_worker(*SIM, env=SLOW_STOP)
    assert isinstance(await cluster.call(cluster.add("running", max_tokens=500)), Ack)
    await cluster.frontend.until(lambda: len(cluster.frontend.tokens.get("running", [])) >= 1)
    w.proc.send_signal(signal.SIGINT)
    # at once: a drain would keep it for stop_deadline_s (60 s here), longer than STOP_S
    assert await w.wait_exit(STOP_S) == 0, w.logs()
    fin = await cluster.frontend.finished("running")
    assert fin.finish_reason == "error"  # the frontend resumes it elsewhere
    await cluster.scheduler.wait_for(lambda m: type(m).__name__ == "Deregister")
    assert "worker.stopped" in w.logs()


async def test_sigterm_drains_then_stops_at_the_deadline(cluster):
    """SIGTERM: the worker reports draining (the scheduler would migrate its requests away; this
    fake one does not), refuses new requests, and stops at `stop_deadline_s`; what is left ends
    with an error batch."""
    w = await cluster.start_worker(*SIM, env={"KVFERRY_WORKER_STOP_DEADLINE_S": "1.5"})
    assert isinstance(await cluster.call(cluster.add("running", max_tokens=100_000)), Ack)
    await cluster.frontend.until(lambda: len(cluster.frontend.tokens.get("running", [])) >= 1)
    start = len(cluster.scheduler.messages)
    t0 = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport) and m.draining, start=start)
    refused = await cluster.call(cluster.add("late"))
    assert isinstance(refused, ErrorReply) and refused.code == ErrorCode.REFUSED and "draining" in refused.message
    assert await w.wait_exit(STOP_S) == 0, w.logs()
    took = time.monotonic() - t0
    # Not before the deadline (a load-independent lower bound). The upper bound only tells the deadline
    # from no deadline at all (the request would run for an hour): generous for a loaded machine.
    assert 1.4 < took < STOP_S, took
    fin = await cluster.frontend.finished("running")
    assert fin.finish_reason == "error" and "SIGTERM" in (fin.error or "")
    await cluster.scheduler.wait_for(lambda m: type(m).__name__ == "Deregister")


async def test_sigterm_on_an_idle_worker_and_a_second_signal_stop_at_once(cluster):
    # the stop deadline is longer than STOP_S here: "at once" is an exit within STOP_S
    w = await cluster.start_worker(*SIM, env=SLOW_STOP)
    w.proc.send_signal(signal.SIGTERM)  # nothing to drain
    assert await w.wait_exit(STOP_S) == 0, w.logs()
    cluster.workers.clear()
    w.kill()
    w = await cluster.start_worker(*SIM, env=SLOW_STOP)
    assert isinstance(await cluster.call(cluster.add("busy", max_tokens=100_000)), Ack)
    await cluster.frontend.until(lambda: len(cluster.frontend.tokens.get("busy", [])) >= 1)
    start = len(cluster.scheduler.messages)
    w.proc.send_signal(signal.SIGTERM)
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport) and m.draining, start=start)
    assert w.proc.poll() is None  # draining
    w.proc.send_signal(signal.SIGTERM)  # a second signal cuts the drain short
    assert await w.wait_exit(STOP_S) == 0, w.logs()
    assert (await cluster.frontend.finished("busy")).finish_reason == "error"


async def test_torch_tiny_greedy_matches_in_process_engine(cluster):
    from engine import EngineConfig, LLMEngine
    from engine import SamplingParams as EngineSampling

    prompt = [5, 17, 42, 99, 3]
    engine = LLMEngine.from_model("tiny", EngineConfig(dtype="float32", kv_cache_bytes=8 << 20))
    (req,) = engine.generate([prompt], EngineSampling(max_tokens=12))
    expected = req.output_token_ids

    await cluster.start_worker("--engine", "torch", "--model", "tiny", "--dtype", "float32", "--threads", "1",
                               "--num-blocks", "64")
    msg = AddRequest(request_id="greedy", prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=12),
                     frontend_id="fe-test", reply_address=cluster.frontend.endpoint)
    assert isinstance(await cluster.call(msg), Ack)
    fin = await cluster.frontend.finished("greedy", timeout=30)
    assert fin.finish_reason in ("length", "stop")
    assert cluster.frontend.tokens["greedy"] == expected


# ---- in-process: step failures and per-frontend batching ------------------------------------------

async def test_a_failing_step_fails_its_requests_and_the_driver_keeps_serving():
    from engine import EngineConfig, LLMEngine
    from engine import SamplingParams as EngineSampling
    from engine.sim.latency import LLAMA7B_A10
    from services.worker.engine_driver import EngineDriver

    engine = LLMEngine.sim(LLAMA7B_A10, EngineConfig(num_blocks=64, debug_checks=True), clock="virtual")
    outs: list[Any] = []
    errors: list[BaseException] = []
    done = asyncio.Event()

    def on_outputs(batch):
        outs.extend(batch)
        if any(o.finished for o in outs if o.request_id == "after"):
            done.set()

    real_execute = engine.executor.execute
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device fell off the bus")
        return real_execute(*a, **kw)

    engine.executor.execute = flaky
    driver = EngineDriver(engine, asyncio.get_running_loop(), on_outputs, errors.append)
    driver.start()
    try:
        sampling = EngineSampling(max_tokens=50, ignore_eos=True)
        # both in one call: both are in the batch when the third step fails
        await driver.call(lambda e: [e.add_request(rid, [1, 2, 3], sampling) for rid in ("a", "b")])
        await until(lambda: len({o.request_id for o in outs if o.finished}) >= 2, WAIT_S, "both requests to fail")
        failed = {o.request_id: o for o in outs if o.finished}
        assert set(failed) == {"a", "b"}
        assert all(o.finish_reason.value == "error" and "device fell off the bus" in o.error
                   for o in failed.values()), failed
        assert len(errors) == 1
        await driver.call(lambda e: e.add_request("after", [1, 2], EngineSampling(max_tokens=3, ignore_eos=True)))
        await asyncio.wait_for(done.wait(), WAIT_S)
        stats = await driver.call(lambda e: e.stats())
        assert stats.num_free_blocks == stats.num_blocks
        await driver.call(lambda e: e.check_integrity())
    finally:
        driver.stop()


def test_streamer_sends_one_message_per_frontend_per_step():
    from engine.request import FinishReason, RequestOutput
    from protocol import decode
    from services.worker.streams import Route, RouteTable, TokenStreamer

    ctx = zmq.Context()
    pulls, addrs = [], []
    for _ in range(2):
        s = ctx.socket(zmq.PULL)
        s.setsockopt(zmq.LINGER, 0)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        pulls.append(s)
        addrs.append(f"tcp://127.0.0.1:{port}")
    routes = RouteTable()
    routes.add(Route("a", "fe0", addrs[0]))
    routes.add(Route("b", "fe0", addrs[0], index_offset=10))
    routes.add(Route("c", "fe1", addrs[1]))
    streamer = TokenStreamer("w0", routes, ctx)
    try:
        finished = streamer.publish([RequestOutput("a", [1], 0), RequestOutput("b", [2], 3),
                                     RequestOutput("c", [3], 0, finished=True, finish_reason=FinishReason.STOP),
                                     RequestOutput("zzz", [4], 0)])
        assert finished == ["c"] and "c" not in routes and len(routes) == 2
        for s in pulls:
            assert s.poll(int(WAIT_S * 1000))
        m0 = decode(pulls[0].recv(), TokenBatches)
        m1 = decode(pulls[1].recv(), TokenBatches)
        assert [(b.request_id, b.first_index, b.token_ids) for b in m0.batches] == [("a", 0, [1]), ("b", 13, [2])]
        assert [(b.request_id, b.finish_reason) for b in m1.batches] == [("c", "stop")]
        assert pulls[0].poll(50) == 0  # one message per frontend per step
    finally:
        streamer.close()
        for s in pulls:
            s.close(linger=0)
        ctx.term()


async def test_requests_of_a_lost_frontend_are_aborted(cluster):
    await cluster.start_worker(*SIM, env={"KVFERRY_WORKER_FRONTEND_TIMEOUT_S": "1.0"})
    await cluster.client.send(Heartbeat(sender_id="fe-test", role="frontend", seq=1))
    assert isinstance(await cluster.call(cluster.add("orphan", max_tokens=1000)), Ack)
    await cluster.frontend.until(lambda: len(cluster.frontend.tokens.get("orphan", [])) >= 1)
    start = len(cluster.scheduler.messages)
    fin = await cluster.frontend.finished("orphan")  # no more heartbeats: aborted after ~1 s
    assert fin.finish_reason == "abort" and len(cluster.frontend.tokens["orphan"]) < 1000
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport) and m.free_blocks == m.total_blocks
                                     and not m.requests, start=start)


async def test_requests_of_an_earlier_start_of_a_frontend_are_aborted_at_its_restart(cluster):
    # A supervisor restarts a frontend quicker than the silence timeout: its first heartbeat (a
    # newer incarnation) must free what the dead start added; nothing else is touched.
    await cluster.start_worker(*SIM, env={"KVFERRY_WORKER_FRONTEND_TIMEOUT_S": "60"})
    first, second = "00000000000000a1-x", "00000000000000b2-y"
    await cluster.client.send(Heartbeat(sender_id="fe-test", role="frontend", seq=1, incarnation=first))
    for rid, inc in (("of-first", first), ("unsaid", "")):
        assert isinstance(await cluster.call(cluster.add(rid, max_tokens=1000, frontend_incarnation=inc)), Ack)
    await cluster.frontend.until(lambda: all(cluster.frontend.tokens.get(r) for r in ("of-first", "unsaid")))
    await cluster.client.send(Heartbeat(sender_id="fe-test", role="frontend", seq=1, incarnation=second))
    assert isinstance(await cluster.call(cluster.add("of-second", max_tokens=1000, frontend_incarnation=second)), Ack)
    fin = await cluster.frontend.finished("of-first")
    assert fin.finish_reason == "abort" and len(cluster.frontend.tokens["of-first"]) < 1000
    # a late heartbeat of the earlier start changes nothing: the later start's request goes on
    await cluster.client.send(Heartbeat(sender_id="fe-test", role="frontend", seq=2, incarnation=first))
    await cluster.frontend.until(lambda: len(cluster.frontend.tokens.get("of-second", [])) >= 3)
    start = len(cluster.scheduler.messages)
    for rid in ("unsaid", "of-second"):  # neither was aborted by the restart: they abort now
        ack = await cluster.call(AbortRequest(request_id=rid))
        assert isinstance(ack, Ack) and ack.ok, (rid, ack)
    await cluster.scheduler.wait_for(lambda m: isinstance(m, LoadReport) and m.free_blocks == m.total_blocks
                                     and not m.requests, start=start)
