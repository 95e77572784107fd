"""The global scheduler service: in-process unit tests of its state, then a real scheduler process
on 127.0.0.1 driven by test code that plays workers (DEALERs sending RegisterWorker, LoadReport,
Heartbeat; a ROUTER as a worker's control endpoint) and frontends (DispatchRequest).

Every wait is bounded; every process started here is killed in a finally.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from protocol import (
    Ack,
    Deregister,
    DispatchReply,
    DispatchRequest,
    Drain,
    DrainInstance,
    ErrorReply,
    Heartbeat,
    LoadReport,
    MigrateRequestTo,
    Ping,
    Pong,
    RegisterReply,
    RegisterWorker,
    RequestLoadEntry,
    SchedulerReplies,
    StatusReply,
    StatusRequest,
    UndrainInstance,
    WorkerEndpoints,
)
from protocol.codec import decode, encode
from protocol.fields import PROTOCOL_VERSION
from protocol.sockets import Received
from protocol.to_worker import WorkerControlInbound, WorkerSchedulerReplies
from services.config import SchedulerConfig
from services.scheduler.handlers import SchedulerCore
from services.scheduler.load import instance_load
from services.scheduler.registry import Registry, ReportOutcome
from testkit.wait import wait_until

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
KVFERRY = str(Path(PY).with_name("kvferry"))
# Heartbeat timeout of the test schedulers: long, so that the fake workers (which send no heartbeats)
# stay alive however slowly a loaded machine runs the test; the silent-worker test sets its own.
TIMEOUT_MS = 30_000
INTERVAL_MS = 150  # their heartbeat interval


# ---- helpers ---------------------------------------------------------------------------------------

def control_of(wid: str) -> str:
    """A control endpoint where nothing listens (a privileged port): the scheduler's Pings go nowhere."""
    return f"tcp://127.0.0.1:{40 + sum(wid.encode()) % 50}"


def reg(wid: str, blocks: int = 100, control: str | None = None, **kw: Any) -> RegisterWorker:
    return RegisterWorker(worker_id=wid, endpoints=WorkerEndpoints(control=control or control_of(wid),
                                                                    migration="tcp://127.0.0.1:9"),
                          host="localhost", engine="sim", model="tiny", total_blocks=blocks, block_size=16, **kw)


def report(wid: str, seq: int, free: int, running: int = 0, waiting: int = 0, total: int = 100,
           requests: tuple[tuple[str, int], ...] = (), **kw: Any) -> LoadReport:
    entries = [RequestLoadEntry(request_id=rid, priority=0, num_blocks=nb, num_tokens=nb * 16) for rid, nb in requests]
    return LoadReport(worker_id=wid, seq=seq, total_blocks=total, free_blocks=free, num_running=running,
                      num_waiting=waiting, requests=entries, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """A blocking DEALER to the scheduler (plays a worker or a frontend)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, identity: str | None = None,
                 allowed: Any = SchedulerReplies) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity:
            self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.sock.connect(endpoint)
        self.allowed = allowed

    def send(self, msg: Any) -> None:
        self.sock.send(encode(msg))

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout_s: float = 10.0) -> Any:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no reply from the scheduler")
        return decode(self.sock.recv(), self.allowed)

    def poll_msg(self, timeout_s: float) -> Any | None:
        return self.recv(timeout_s) if self.sock.poll(int(timeout_s * 1000)) else None

    def ask(self, msg: Any, timeout_s: float = 10.0) -> Any:
        self.send(msg)
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.recv(max(0.01, deadline - time.monotonic()))
            if getattr(reply, "reply_to", None) == msg.msg_id:
                return reply

    def close(self) -> None:
        self.sock.close(linger=0)


class FakeWorker(Client):
    """A worker's DEALER to the scheduler (identity = worker id)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, wid: str, blocks: int = 100, control: str | None = None):
        super().__init__(ctx, endpoint, identity=wid, allowed=WorkerSchedulerReplies)
        self.wid, self.blocks, self.control, self.seq = wid, blocks, control, 0

    def register(self) -> RegisterReply:
        reply = self.ask(reg(self.wid, self.blocks, self.control))
        assert isinstance(reply, RegisterReply), reply
        return reply

    def report(self, free: int, running: int = 0, waiting: int = 0, **kw: Any) -> None:
        self.seq += 1
        self.send(report(self.wid, self.seq, free, running, waiting, total=self.blocks, **kw))

    def heartbeat(self) -> None:
        self.seq += 1
        self.send(Heartbeat(sender_id=self.wid, role="worker", seq=self.seq))


class Scheduler:
    """A real scheduler process (`python -m services.scheduler`, or `kvferry scheduler`)."""

    def __init__(self, port: int, *args: str, cli: bool = False, **settings: int) -> None:
        self.port = port
        self.endpoint = f"tcp://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
        env.update({"KVFERRY_SCHEDULER_HEARTBEAT_TIMEOUT_MS": str(settings.get("timeout_ms", TIMEOUT_MS)),
                    "KVFERRY_SCHEDULER_HEARTBEAT_INTERVAL_MS": str(settings.get("interval_ms", INTERVAL_MS)),
                    "KVFERRY_LOG_LEVEL": "WARNING"})
        cmd = [KVFERRY, "scheduler"] if cli else [PY, "-m", "services.scheduler"]
        self.proc = subprocess.Popen([*cmd, "--base-port", str(port), *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            self.ready_line = self._read_line(15.0)
        except BaseException:
            self.kill()
            raise

    def _read_line(self, timeout_s: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError("scheduler did not print READY")
        line = self.proc.stdout.readline().strip()
        assert line == f"READY scheduler {self.endpoint}", (line, self.proc.stderr.read() if line == "" else "")
        return line

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)
        finally:
            for f in (self.proc.stdout, self.proc.stderr):
                f.close()


@pytest.fixture
def ctx():
    c = zmq.Context()
    try:
        yield c
    finally:
        c.destroy(linger=0)


@pytest.fixture
def sched():
    s = Scheduler(free_port())
    try:
        yield s
    finally:
        s.kill()


def dispatch(fe: Client, rid: str = "r", tokens: int = 32, **kw: Any) -> Any:
    return fe.ask(DispatchRequest(request_id=rid, num_prompt_tokens=tokens, frontend_id="fe-0", **kw))


def status(fe: Client) -> StatusReply:
    reply = fe.ask(StatusRequest())
    assert isinstance(reply, StatusReply), reply
    return reply


# ---- in-process: conversion, registry, handlers -----------------------------------------------------

def test_instance_load_from_registration_and_report():
    info = reg("w1", blocks=100, max_running=8)
    empty = instance_load(info, None)
    assert (empty.total_blocks, empty.free_blocks, empty.num_running, empty.max_running) == (100, 100, 0, 8)
    rep = report("w1", 3, free=40, running=2, waiting=1, head_of_line_blocks=7, requests=(("a", 30), ("b", 30)))
    load = instance_load(info, rep, alive=True, draining=False)
    assert (load.total_blocks, load.free_blocks, load.num_running, load.num_waiting) == (100, 40, 2, 1)
    assert load.head_of_line_blocks == 7 and load.max_running == 8 and load.requests == ()
    full = instance_load(info, rep, include_requests=True)
    assert [(r.request_id, r.num_blocks, r.num_tokens) for r in full.requests] == [("a", 30, 480), ("b", 30, 480)]
    assert instance_load(info, report("w1", 4, free=40, draining=True)).draining  # the worker's own word
    assert instance_load(info, rep, draining=True).draining  # the scheduler's
    assert not instance_load(info, rep, alive=False).alive
    assert instance_load(info, report("w1", 5, free=40, max_running=2)).max_running == 2


def test_registry_keeps_highest_seq_and_declares_silent_workers_dead():
    r = Registry(timeout_s=1.0)
    r.register(reg("b"), b"b", now=0.0, now_ms=0)
    r.register(reg("a"), b"a", now=0.0, now_ms=0)
    assert [s.instance_id for s in r.snapshots()] == ["a", "b"]  # id order, no sort per dispatch
    assert r.apply_report(report("a", 5, free=10), 0.1, 1) is ReportOutcome.APPLIED
    assert r.apply_report(report("a", 4, free=90), 0.2, 2) is ReportOutcome.STALE
    assert r.apply_report(report("a", 5, free=90), 0.2, 2) is ReportOutcome.STALE
    assert r.get("a").snapshot.free_blocks == 10
    assert r.apply_report(report("zz", 1, free=1), 0.2, 2) is ReportOutcome.UNKNOWN
    assert r.heard("b", 0.9)
    assert [d.worker_id for d in r.sweep(1.5)] == ["a"]  # a: last heard at 0.2
    assert not r.get("a").alive and not r.snapshots()[0].alive
    assert r.apply_report(report("a", 6, free=50), 1.6, 3) is ReportOutcome.UNKNOWN  # dead: register again
    assert not r.heard("a", 1.6)
    _, known = r.register(reg("a"), b"a", now=1.7, now_ms=4)
    assert not known and r.get("a").alive
    assert r.apply_report(report("a", 1, free=50), 1.8, 5) is ReportOutcome.APPLIED  # a new sequence
    r.set_draining("a", True)
    r.register(reg("a"), b"a", now=1.9, now_ms=6)
    assert r.get("a").draining  # the operator's drain survives a re-registration
    assert r.remove("a") is not None and [s.instance_id for s in r.snapshots()] == ["b"]


def test_core_dispatch_counts_requests_since_the_last_report():
    clock = [0.0]
    core = SchedulerCore(SchedulerConfig(policy="load"), clock=lambda: clock[0])

    def handle(msg: Any) -> Any:
        return asyncio.run(core.handle(Received(msg, [], b"peer")))

    assert handle(DispatchRequest(request_id="r0", num_prompt_tokens=5, frontend_id="f")).code == "unavailable"
    for w in ("w0", "w1", "w2"):
        assert isinstance(handle(reg(w)), RegisterReply)
    for w in ("w0", "w1", "w2"):
        assert handle(report(w, 1, free=80)) is None
    picks = Counter(handle(DispatchRequest(request_id=f"r{i}", num_prompt_tokens=64, frontend_id="f")).worker_id
                    for i in range(9))
    assert picks == {"w0": 3, "w1": 3, "w2": 3}
    handle(report("w1", 2, free=100))  # w1 reports: its count starts over and it is freest
    assert handle(DispatchRequest(request_id="x", num_prompt_tokens=64, frontend_id="f")).worker_id == "w1"
    excl = handle(DispatchRequest(request_id="y", num_prompt_tokens=64, frontend_id="f", exclude_workers=["w1"]))
    assert excl.worker_id != "w1"
    nf = handle(report("ghost", 1, free=1))
    assert isinstance(nf, ErrorReply) and nf.code == "not_found" and "register again" in nf.message
    assert handle(Heartbeat(sender_id="ghost", role="worker")).code == "not_found"
    assert handle(Heartbeat(sender_id="fe-0", role="frontend")) is None
    st = handle(StatusRequest())
    assert [i.worker_id for i in st.instances] == ["w0", "w1", "w2"] and st.policy == "load"
    assert handle(DrainInstance(worker_id="nope")).code == "not_found"
    assert handle(MigrateRequestTo(request_id="r1", dst_worker_id="w0")).code == "not_found"  # on no instance
    clock[0] = 1.9  # timeout 2 s: a worker's Ping keeps it alive, like a Heartbeat
    assert isinstance(handle(Ping(sender_id="w0")), Pong)
    clock[0] = 2.5
    assert [r.worker_id for r in core.sweep()] == ["w1", "w2"]
    clock[0] = 10.0
    assert len(core.sweep()) == 1
    assert handle(DispatchRequest(request_id="z", num_prompt_tokens=1, frontend_id="f")).code == "unavailable"


def test_core_rejects_unknown_policy():
    with pytest.raises(ValueError, match="policy"):
        SchedulerCore(SchedulerConfig(policy="random"))


# ---- a real scheduler process -----------------------------------------------------------------------

@pytest.mark.e2e  # a scheduler process
def test_dispatch_picks_the_freest_and_spreads_a_burst(sched, ctx):
    workers = [FakeWorker(ctx, sched.endpoint, f"w{i}") for i in range(3)]
    fe = Client(ctx, sched.endpoint)
    replies = [w.register() for w in workers]
    assert all(r.scheduler_id == "scheduler-0" and r.heartbeat_interval_ms == INTERVAL_MS for r in replies)
    assert workers[0].register().scheduler_id == "scheduler-0"  # registering again is fine
    for w, free in zip(workers, (30, 90, 60)):
        w.report(free=free, running=1)
    assert wait_until(lambda: status(fe).instances[1].free_blocks == 90, 10.0)
    d = dispatch(fe, "first")
    assert isinstance(d, DispatchReply) and d.worker_id == "w1" and d.request_id == "first"
    assert d.worker_address == control_of("w1")
    # equal instances: a burst between reports spreads evenly
    for w in workers:
        w.report(free=80, running=1)
    assert wait_until(lambda: all(i.free_blocks == 80 for i in status(fe).instances), 10.0)
    picks = Counter(dispatch(fe, f"b{i}", tokens=64).worker_id for i in range(12))
    assert picks == {"w0": 4, "w1": 4, "w2": 4}


@pytest.mark.e2e  # a scheduler process
def test_round_robin_cycles(ctx):
    s = Scheduler(free_port(), "--policy", "rr")
    try:
        workers = [FakeWorker(ctx, s.endpoint, f"w{i}") for i in range(3)]
        for w in workers:
            w.register()
        workers[0].report(free=1, running=50)  # load does not matter to rr
        fe = Client(ctx, s.endpoint)
        assert status(fe).policy == "rr"
        assert [dispatch(fe, f"r{i}").worker_id for i in range(6)] == ["w0", "w1", "w2"] * 2
    finally:
        s.kill()


@pytest.fixture
def quick_sched():
    """A scheduler that declares a worker dead after 1.5 s of silence."""
    s = Scheduler(free_port(), timeout_ms=1500)
    try:
        yield s
    finally:
        s.kill()


@pytest.mark.e2e  # a scheduler process
def test_silent_worker_is_removed_and_must_register_again(quick_sched, ctx):
    sched = quick_sched
    alive, silent = FakeWorker(ctx, sched.endpoint, "alive"), FakeWorker(ctx, sched.endpoint, "silent")
    fe = Client(ctx, sched.endpoint)
    alive.register(), silent.register()
    silent.report(free=100)  # the freest: every dispatch goes there while it lives
    alive.report(free=10, running=5)
    assert wait_until(lambda: {i.worker_id: i.free_blocks for i in status(fe).instances}
                      == {"alive": 10, "silent": 100}, 10.0)
    start = time.monotonic()
    silent.heartbeat()  # its last word: silent from here on
    assert dispatch(fe, "before").worker_id == "silent"

    def silent_is_dead() -> bool:
        alive.heartbeat()
        return not {i.worker_id: i for i in status(fe).instances}["silent"].alive

    # Declared dead after the 1.5 s timeout, not before (a bound that load cannot break); the
    # deadline only tells "removed" from "never removed", generous for a loaded machine.
    assert wait_until(silent_is_dead, 30.0, step_s=0.05)
    assert time.monotonic() - start > 1.4
    alive.heartbeat()
    st = {i.worker_id: i for i in status(fe).instances}
    assert st["alive"].alive and not st["silent"].alive and st["silent"].freeness == -math.inf
    assert {dispatch(fe, f"after{i}").worker_id for i in range(5)} == {"alive"}
    silent.report(free=100)  # a dead worker that speaks again is told to register
    nf = silent.recv(10.0)
    assert isinstance(nf, ErrorReply) and nf.code == "not_found" and "register again" in nf.message
    silent.register()
    silent.report(free=100)
    assert wait_until(lambda: dispatch(fe, "back").worker_id == "silent", 10.0)


@pytest.mark.e2e  # a scheduler process
def test_unknown_worker_report_and_heartbeat_get_not_found(sched, ctx):
    ghost = FakeWorker(ctx, sched.endpoint, "ghost")
    ghost.report(free=5)
    rep = ghost.recv(10.0)
    assert isinstance(rep, ErrorReply) and rep.code == "not_found" and rep.reply_to is None
    ghost.heartbeat()
    assert ghost.recv(10.0).code == "not_found"


@pytest.mark.e2e  # a scheduler process
def test_no_worker_is_unavailable(sched, ctx):
    fe = Client(ctx, sched.endpoint)
    rep = dispatch(fe, "lonely")
    assert isinstance(rep, ErrorReply) and rep.code == "unavailable"
    w = FakeWorker(ctx, sched.endpoint, "full")
    w.register()
    w.send(report("full", 1, free=0, running=4, max_running=4))
    assert wait_until(lambda: status(fe).instances[0].num_running == 4, 10.0)
    assert dispatch(fe, "still").code == "overloaded"  # alive but full: the frontend answers 429
    assert dispatch(fe, "elsewhere", exclude_workers=["full"]).code == "unavailable"  # no other worker: 503
    w.send(Deregister(worker_id="full", reason="test"))
    assert wait_until(lambda: status(fe).instances == [], 10.0)


@pytest.mark.e2e  # a scheduler process
def test_scheduler_restart_workers_register_again(ctx):
    port = free_port()
    s = Scheduler(port)
    try:
        w = FakeWorker(ctx, s.endpoint, "w0")
        fe = Client(ctx, s.endpoint)
        w.register()
        assert dispatch(fe, "a").worker_id == "w0"
        s.kill()
        s = Scheduler(port)  # same port: the DEALERs reconnect by themselves
        w.report(free=50)
        nf = w.recv(5.0)
        assert isinstance(nf, ErrorReply) and nf.code == "not_found"
        w.register()
        assert dispatch(fe, "b", ).worker_id == "w0"
    finally:
        s.kill()


@pytest.mark.e2e  # a scheduler process
def test_drain_stops_dispatch_and_forwards_to_the_worker(sched, ctx):
    # w0's control endpoint is a ROUTER here: it sees the scheduler's Ping heartbeats and Drain.
    control = ctx.socket(zmq.ROUTER)
    control.setsockopt(zmq.LINGER, 0)
    port = control.bind_to_random_port("tcp://127.0.0.1")
    w0 = FakeWorker(ctx, sched.endpoint, "w0", control=f"tcp://127.0.0.1:{port}")
    w1 = FakeWorker(ctx, sched.endpoint, "w1")
    fe = Client(ctx, sched.endpoint)
    w0.register(), w1.register()
    w0.report(free=100), w1.report(free=50, running=1)
    assert wait_until(lambda: {i.worker_id: i.free_blocks for i in status(fe).instances} == {"w0": 100, "w1": 50}, 10.0)

    def control_recv(timeout_s: float = 10.0) -> tuple[bytes, Any]:
        assert control.poll(int(timeout_s * 1000)), "nothing on the worker's control socket"
        peer, data = control.recv_multipart()
        return peer, decode(data, WorkerControlInbound)

    peer, ping = control_recv()
    assert isinstance(ping, Ping) and ping.sender_id == "scheduler-0"  # the scheduler's heartbeat
    control.send_multipart([peer, encode(Pong.to(ping, "w0"))])
    assert dispatch(fe, "x").worker_id == "w0"
    ack = fe.ask(DrainInstance(worker_id="w0"))
    assert isinstance(ack, Ack) and ack.ok
    assert {dispatch(fe, f"d{i}").worker_id for i in range(4)} == {"w1"}
    assert {i.worker_id: i.draining for i in status(fe).instances} == {"w0": True, "w1": False}
    deadline = time.monotonic() + 10.0
    while True:  # skip further Pings until the forwarded Drain arrives
        peer, msg = control_recv(max(0.01, deadline - time.monotonic()))
        if isinstance(msg, Drain):
            break
    assert msg.draining
    control.send_multipart([peer, encode(Ack(reply_to=msg.msg_id))])
    assert isinstance(fe.ask(UndrainInstance(worker_id="w0")), Ack)
    assert dispatch(fe, "y").worker_id == "w0"
    assert fe.ask(DrainInstance(worker_id="nobody")).code == "not_found"
    assert fe.ask(MigrateRequestTo(request_id="x", dst_worker_id="w1")).code == "not_found"  # no report lists x
    control.close(linger=0)


@pytest.mark.e2e  # a scheduler process
def test_bad_input_gets_error_replies_and_the_scheduler_keeps_serving(sched, ctx):
    c = Client(ctx, sched.endpoint)
    good = encode(Ping(sender_id="t"))
    cases = {
        "random": os.urandom(64),
        "truncated": good[: len(good) // 2],
        "unknown_type": msgpack.packb([PROTOCOL_VERSION, "NoSuchMessage", {}]),
        "wrong_version": msgpack.packb([PROTOCOL_VERSION + 7, "Ping", {"sender_id": "t"}]),
        "not_for_scheduler": encode(Drain()),
        "invalid_fields": msgpack.packb([PROTOCOL_VERSION, "DispatchRequest",
                                         {"msg_id": "m1", "request_id": "bad id with spaces",
                                          "num_prompt_tokens": -3, "frontend_id": "f"}]),
        "free_above_total": msgpack.packb([PROTOCOL_VERSION, "LoadReport",
                                           {"worker_id": "w", "seq": 1, "total_blocks": 1, "free_blocks": 9,
                                            "num_running": 0, "num_waiting": 0}]),
        "empty": b"",
    }
    codes = {}
    for name, data in cases.items():
        c.send_raw(data)
        rep = c.recv(10.0)
        assert isinstance(rep, ErrorReply), (name, rep)
        codes[name] = rep.code
    assert codes["unknown_type"] == codes["not_for_scheduler"] == "unknown_type"
    assert codes["wrong_version"] == "version_mismatch"
    assert codes["invalid_fields"] == codes["free_above_total"] == "invalid"
    assert codes["random"] == codes["truncated"] == "malformed"
    bad_endpoint = c.ask(reg("w-bad", control="tcp://127.0.0.1:9/not-a-port"))
    assert isinstance(bad_endpoint, ErrorReply) and bad_endpoint.code == "invalid"
    c.send_raw(good, b"an unexpected data frame")
    assert c.recv(10.0).code == "malformed"
    # an oversized frame: ZeroMQ drops that connection; the scheduler goes on serving others
    big = Client(ctx, sched.endpoint)
    big.send_raw(b"\x00" * (33 << 20))
    big.close()
    assert isinstance(Client(ctx, sched.endpoint).ask(Ping(sender_id="t")), Pong)
    assert sched.proc.poll() is None


@pytest.fixture
def slow_sched():
    """A scheduler with a long heartbeat timeout (the test's workers stay quiet while the CLI runs)."""
    s = Scheduler(free_port(), timeout_ms=30_000)
    try:
        yield s
    finally:
        s.kill()


@pytest.mark.e2e  # a scheduler process
def test_ctl_status_json_and_drain_through_the_cli(slow_sched, ctx, capsys):
    from cli.main import main as kvferry_main

    sched = slow_sched
    w = FakeWorker(ctx, sched.endpoint, "w0")
    w.register()
    w.report(free=70, running=2, requests=(("cmpl-1", 20), ("cmpl-2", 10)))
    fe = Client(ctx, sched.endpoint)
    assert wait_until(lambda: len(status(fe).requests) == 2, 10.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
    out = subprocess.run([KVFERRY, "ctl", "status", "--json", "--scheduler", sched.endpoint], env=env,
                         capture_output=True, text=True, timeout=30)  # the real entry point, once
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (inst,) = data["instances"]
    assert inst["worker_id"] == "w0" and inst["alive"] and inst["used_blocks"] == 30 and inst["num_running"] == 2
    assert inst["endpoints"]["control"] == control_of("w0") and data["policy"] == "kvferry"
    assert {(r["request_id"], r["worker_id"]) for r in data["requests"]} == {("cmpl-1", "w0"), ("cmpl-2", "w0")}
    capsys.readouterr()
    # the rest in-process (same code path, without starting the CLI again)
    assert kvferry_main(["ctl", "drain", "w0", "--base-port", str(sched.port)]) == 0
    assert status(fe).instances[0].draining
    assert kvferry_main(["ctl", "drain", "nobody", "--scheduler", sched.endpoint]) == 1
    assert "error: " in capsys.readouterr().err
    assert kvferry_main(["ctl", "status", "--scheduler", sched.endpoint]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("scheduler scheduler-0  policy kvferry  instances 1")
    assert any(ln.split()[:3] == ["w0", "yes", "yes"] for ln in lines)  # instance, alive, draining
    assert any(ln.split()[:2] == ["cmpl-1", "w0"] for ln in lines)
    assert kvferry_main(["ctl", "undrain", "w0", "--scheduler", sched.endpoint]) == 0
    assert not status(fe).instances[0].draining
    assert kvferry_main(["ctl", "status", "--base-port", str(free_port()), "--timeout", "0.3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did not answer" in err


@pytest.mark.e2e  # a scheduler process
def test_kvferry_scheduler_cli_prints_ready_and_stops_on_sigterm(ctx):
    s = Scheduler(free_port(), "--policy", "rr", cli=True)
    try:
        fe = Client(ctx, s.endpoint)
        assert status(fe).policy == "rr"
        assert s.kill(signal.SIGTERM) == 0
    finally:
        s.kill()
