"""Live migration, the scheduler's side: `ctl migrate`, drain rounds, MigrationResult, expiry.

A real scheduler (services.scheduler.main.serve_scheduler) runs on 127.0.0.1 in a thread of this
process; fake workers are raw ZeroMQ sockets: a DEALER to the scheduler (register, report, send
MigrationResult) and a ROUTER as the worker's control endpoint, where the scheduler's MigrateCommand
arrives and the test answers. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
import zmq

from protocol import (
    Ack,
    CancelMigration,
    DispatchReply,
    DispatchRequest,
    Drain,
    DrainInstance,
    ErrorReply,
    LoadReport,
    MigrateCommand,
    MigrateRequestTo,
    MigrationResult,
    Ping,
    Pong,
    RegisterReply,
    RequestLoadEntry,
    StatusReply,
    StatusRequest,
    UndrainInstance,
    WorkerEndpoints,
)
from protocol.addresses import ClusterAddresses
from protocol.codec import decode, encode
from protocol.sockets import Received
from protocol.to_worker import WorkerControlInbound
from services.config import KvferryConfig, SchedulerConfig
from services.scheduler.handlers import SchedulerCore
from services.scheduler.main import serve_scheduler
from services.scheduler.migrations import MigrationTracker
from testkit.wait import wait_until
from tests.test_scheduler_service import Client, FakeWorker, free_port, reg, report

ROUND_MS = 50  # migration_interval_ms of the test schedulers


@contextmanager
def scheduler(**settings: Any) -> Iterator[str]:
    """A scheduler in a thread of this process; yields its endpoint, stops it on exit."""
    sc = SchedulerConfig(heartbeat_interval_ms=200, heartbeat_timeout_ms=30_000, migration_interval_ms=ROUND_MS,
                         **settings)
    cfg = KvferryConfig(cluster=ClusterAddresses(base_port=free_port()), scheduler=sc)
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until_complete(serve_scheduler(cfg, on_ready=lambda _: ready.set(), stop=stop))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert ready.wait(10.0) and not errors, errors
        yield cfg.cluster.scheduler()
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(10.0)
        loop.close()
        assert not t.is_alive()
        assert not errors, errors


class MigWorker(FakeWorker):
    """A fake worker with a real control ROUTER (where MigrateCommand arrives)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, wid: str, blocks: int = 100, **reg_kw: Any) -> None:
        self.ctl = ctx.socket(zmq.ROUTER)
        self.ctl.setsockopt(zmq.LINGER, 0)
        port = self.ctl.bind_to_random_port("tcp://127.0.0.1")
        super().__init__(ctx, endpoint, wid, blocks, control=f"tcp://127.0.0.1:{port}")
        self.migration = f"tcp://127.0.0.1:{port}/{wid}-migration"  # never connected to: only compared
        self.reg_kw = reg_kw

    def register(self) -> RegisterReply:
        msg = reg(self.wid, self.blocks, self.control, **self.reg_kw)
        msg = msgspec.structs.replace(msg, endpoints=WorkerEndpoints(control=self.control, migration=self.migration))
        reply = self.ask(msg)
        assert isinstance(reply, RegisterReply), reply
        return reply

    def load(self, free: int, *requests: tuple[str, int, int, int]) -> None:
        """Report load; requests as (id, blocks, priority, tokens)."""
        self.seq += 1
        entries = [RequestLoadEntry(request_id=r, priority=p, num_blocks=b, num_tokens=t) for r, b, p, t in requests]
        self.send(LoadReport(worker_id=self.wid, seq=self.seq, total_blocks=self.blocks, free_blocks=free,
                             num_running=len(entries), num_waiting=0, requests=entries))

    def command(self, timeout_s: float = 2.0) -> tuple[bytes, Any] | None:
        """The next MigrateCommand or CancelMigration (answering Pings and Drains on the way), or None."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.ctl.poll(max(1, int(left * 1000))):
                return None
            peer, data = self.ctl.recv_multipart()
            msg = decode(data, WorkerControlInbound)
            if isinstance(msg, Ping):
                self.ctl.send_multipart([peer, encode(Pong.to(msg, self.wid))])
            elif isinstance(msg, Drain):
                self.ctl.send_multipart([peer, encode(Ack(reply_to=msg.msg_id))])
            else:
                return peer, msg

    def must_command(self, kind: type = MigrateCommand, timeout_s: float = 10.0) -> tuple[bytes, Any]:
        got = self.command(timeout_s)
        assert got is not None, f"no {kind.__name__} at {self.wid}"
        assert isinstance(got[1], kind), got[1]
        return got

    def answer(self, peer: bytes, msg: Any) -> None:
        self.ctl.send_multipart([peer, encode(msg)])

    def result(self, cmd: MigrateCommand, request_id: str, outcome: str = "committed", reason: str = "") -> None:
        self.send(MigrationResult(migration_id=cmd.migration_id, request_id=request_id, src_worker_id=self.wid,
                                  dst_worker_id=cmd.dst_worker_id, outcome=outcome, reason=reason))

    def close(self) -> None:
        super().close()
        self.ctl.close(linger=0)


@pytest.fixture
def ctx():
    c = zmq.Context()
    try:
        yield c
    finally:
        c.destroy(linger=0)


def registered(ctx: zmq.Context, ep: str, *specs: tuple[str, int, tuple, dict]) -> dict[str, MigWorker]:
    """Workers (id, free blocks, requests, RegisterWorker extras), registered and reported."""
    workers = {}
    for wid, free, requests, kw in specs:
        w = MigWorker(ctx, ep, wid, **kw)
        w.register()
        w.load(free, *requests)
        workers[wid] = w
    fe = Client(ctx, ep)
    want = {wid: free for wid, free, _, _ in specs}
    deadline = time.monotonic() + 20.0
    while {i.worker_id: i.free_blocks for i in fe.ask(StatusRequest()).instances} != want:
        assert time.monotonic() < deadline, "reports not applied"
        time.sleep(0.01)
    fe.close()
    return workers


def ask_later(fe: Client, msg: Any) -> Any:
    fe.send(msg)
    return msg


def reply_to(fe: Client, msg: Any, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        reply = fe.recv(max(0.01, deadline - time.monotonic()))
        if getattr(reply, "reply_to", None) == msg.msg_id:
            return reply


# ---- in-process: the book of migrations ---------------------------------------------------------------

def test_tracker_in_flight_results_and_expiry():
    t = MigrationTracker(history=3, recent_s=1.0)
    a = t.start("s", "d", None, "drain", now=0.0, timeout_s=5.0)
    b = t.start("s", "e", "r2", "ctl", now=0.0, timeout_s=1.0)
    assert a.migration_id != b.migration_id and len(t) == 2
    assert sorted(t.pairs()) == [("s", "d"), ("s", "e")] and t.busy_requests() == {"r2"}
    assert t.accepted(a.migration_id, "r1").request_id == "r1" and t.busy_requests() == {"r1", "r2"}
    res = MigrationResult(migration_id=a.migration_id, request_id="r1", src_worker_id="s", dst_worker_id="d",
                          outcome="committed")
    assert t.finish(res, now=0.5) is a and t.pairs() == [("s", "e")]
    assert t.busy_requests() == {"r1", "r2"}  # r1 just moved: the source's report may still list it
    assert t.accepted(a.migration_id, "r1") is None  # a late Ack after the result changes nothing
    assert [e.migration_id for e in t.expire(now=1.0)] == [b.migration_id] and t.expired == 1
    assert t.busy_requests() == {"r1"}
    t.expire(now=1.6)
    assert t.busy_requests() == set() and len(t) == 0
    for i in range(100):  # the history and the reason counters stay bounded
        t.finish(MigrationResult(migration_id=f"x{i}", request_id="r", src_worker_id="s", dst_worker_id="d",
                                 outcome="aborted", reason=f"why-{i}"), now=2.0)
    assert len(t.history) == 3 and len(t.counts) <= 65 and t.counts[("aborted", "other")] > 0


def test_core_without_command_channels_checks_then_reports_unavailable():
    core = SchedulerCore(SchedulerConfig())

    def handle(msg: Any) -> Any:
        return asyncio.run(core.handle(Received(msg, [], b"peer")))

    for w in ("w0", "w1"):
        handle(reg(w))
    handle(LoadReport(worker_id="w0", seq=1, total_blocks=100, free_blocks=90, num_running=1, num_waiting=0,
                      requests=[RequestLoadEntry(request_id="r", priority=0, num_blocks=10, num_tokens=160)]))
    assert handle(MigrateRequestTo(request_id="r", dst_worker_id="nope")).code == "not_found"
    assert handle(MigrateRequestTo(request_id="r", dst_worker_id="w1")).code == "unavailable"
    assert len(core.migrator.tracker) == 0
    with pytest.raises(ValueError, match="positive"):
        SchedulerCore(SchedulerConfig(migration_interval_ms=0))


# ---- ctl migrate ---------------------------------------------------------------------------------------

def test_ctl_migrate_commands_the_source_and_acks_without_blocking_dispatch(ctx):
    # a long ack timeout: a dispatch that waited for the unanswered command would wait 30 s
    with scheduler(migration_ack_timeout_ms=30_000) as ep:
        ws = registered(ctx, ep, ("w0", 60, (("r1", 20, 0, 300), ("r2", 20, 0, 300)), {}), ("w1", 90, (), {}))
        fe = Client(ctx, ep)
        req = ask_later(fe, MigrateRequestTo(request_id="r1", dst_worker_id="w1"))
        peer, cmd = ws["w0"].must_command()
        assert (cmd.request_id, cmd.dst_worker_id, cmd.reason) == ("r1", "w1", "ctl")
        assert cmd.dst_endpoint == ws["w1"].migration
        assert cmd.migration_id.startswith("mig-")
        # the command is unanswered: the scheduler still dispatches and answers status at once
        other = Client(ctx, ep)
        start = time.monotonic()
        d = other.ask(DispatchRequest(request_id="new", num_prompt_tokens=16, frontend_id="fe"))
        assert isinstance(d, DispatchReply) and d.worker_id == "w1"
        assert isinstance(other.ask(StatusRequest()), StatusReply)
        assert time.monotonic() - start < 10.0  # well within the ack timeout: not blocked by the command
        assert fe.poll_msg(0.05) is None  # no reply to ctl before the worker's
        # while r1 is in flight, another migration of it is refused
        busy = fe.ask(MigrateRequestTo(request_id="r1", dst_worker_id="w1"))
        assert isinstance(busy, ErrorReply) and busy.code == "refused" and "already migrating" in busy.message
        ws["w0"].answer(peer, Ack(reply_to=cmd.msg_id, detail="r1"))
        ack = reply_to(fe, req)
        assert isinstance(ack, Ack) and ack.ok and ack.detail == f"{cmd.migration_id}: r1 w0 -> w1"
        # the result completes it: r1 may migrate again; the worker's ErrorReply reaches the ctl
        ws["w0"].result(cmd, "r1", outcome="aborted", reason="cancelled")
        deadline = time.monotonic() + 20.0
        while True:
            req = ask_later(fe, MigrateRequestTo(request_id="r1", dst_worker_id="w1"))
            got = ws["w0"].command(0.3)
            if got is not None:
                break
            assert reply_to(fe, req).code == "refused" and time.monotonic() < deadline  # result not seen yet
        peer, cmd2 = got
        assert cmd2.migration_id != cmd.migration_id
        ws["w0"].answer(peer, ErrorReply(reply_to=cmd2.msg_id, code="overloaded", message="2 migrations running"))
        err = reply_to(fe, req)
        assert isinstance(err, ErrorReply) and err.code == "overloaded" and "2 migrations running" in err.message
        # a soft refusal (Ack ok=False) is an error for the ctl too
        req = ask_later(fe, MigrateRequestTo(request_id="r2", dst_worker_id="w1"))
        peer, cmd3 = ws["w0"].must_command()
        assert cmd3.request_id == "r2"
        ws["w0"].answer(peer, Ack(reply_to=cmd3.msg_id, ok=False, detail="stopping"))
        err = reply_to(fe, req)
        assert isinstance(err, ErrorReply) and err.code == "refused" and "stopping" in err.message


def test_ctl_migrate_rejects_bad_requests_and_times_out(ctx):
    with scheduler(migration_ack_timeout_ms=300) as ep:
        ws = registered(ctx, ep, ("w0", 60, (("r1", 20, 0, 300),), {}), ("w1", 90, (), {}),
                        ("w2", 90, (), {"kv_bytes_per_block": 4096}), ("w3", 90, (), {}))
        fe = Client(ctx, ep)

        def error(rid: str, dst: str) -> ErrorReply:
            rep = fe.ask(MigrateRequestTo(request_id=rid, dst_worker_id=dst))
            assert isinstance(rep, ErrorReply), rep
            return rep

        e = error("nope", "w1")
        assert e.code == "not_found" and "request nope" in e.message
        e = error("r1", "w9")
        assert e.code == "not_found" and "unknown instance w9" in e.message
        e = error("r1", "w0")
        assert e.code == "refused" and "already on w0" in e.message
        e = error("r1", "w2")
        assert e.code == "refused" and "different KV layouts" in e.message
        assert isinstance(fe.ask(DrainInstance(worker_id="w3")), Ack)
        e = error("r1", "w3")
        assert e.code == "refused" and "draining" in e.message
        assert ws["w0"].command(0.1) is None  # none of these reached the worker
        # the source never answers: a timeout error within the ack timeout, then a best-effort cancel
        start = time.monotonic()
        e = error("r1", "w1")
        # after the 300 ms ack timeout; the upper bound tells the timeout from a hang (generous: loaded machines)
        assert e.code == "timeout" and 0.25 < time.monotonic() - start < 8.0
        _, first = ws["w0"].must_command(MigrateCommand)
        _, cancel = ws["w0"].must_command(CancelMigration)
        assert cancel.migration_id == first.migration_id


# ---- drain ---------------------------------------------------------------------------------------------

def test_drain_moves_requests_to_the_freest_compatible_instance_one_at_a_time(ctx):
    with scheduler() as ep:
        reqs = (("a", 10, 0, 100), ("b", 10, 5, 300), ("c", 10, 5, 50))
        ws = registered(ctx, ep, ("d", 70, reqs, {}), ("x", 50, (), {}), ("y", 80, (), {}),
                        ("z", 95, (), {"kv_bytes_per_block": 1}))  # z is freest but incompatible
        d = ws["d"]
        fe = Client(ctx, ep)
        assert d.command(3 * ROUND_MS / 1000) is None  # nothing drains, nothing moves
        assert isinstance(fe.ask(DrainInstance(worker_id="d")), Ack)
        peer, cmd = d.must_command()
        # lowest priority (largest number) first, then the shortest context; to the freest compatible
        assert (cmd.request_id, cmd.dst_worker_id, cmd.reason) == ("c", "y", "drain")
        assert cmd.dst_endpoint == ws["y"].migration
        assert d.command(4 * ROUND_MS / 1000) is None  # at most one in flight out of d
        d.answer(peer, ErrorReply(reply_to=cmd.msg_id, code="overloaded", message="busy"))
        peer, again = d.must_command()  # refused: simply asked again next round
        assert again.request_id == "c" and again.migration_id != cmd.migration_id
        d.answer(peer, Ack(reply_to=again.msg_id, detail="c"))
        assert d.command(4 * ROUND_MS / 1000) is None  # accepted and in flight: nothing more
        d.result(again, "c")
        d.load(80, reqs[0], reqs[1])
        peer, nxt = d.must_command()  # the result freed the slot
        assert (nxt.request_id, nxt.dst_worker_id) == ("b", "y")
        d.answer(peer, Ack(reply_to=nxt.msg_id, detail="b"))
        assert isinstance(fe.ask(UndrainInstance(worker_id="d")), Ack)
        d.result(nxt, "b")
        d.load(90, reqs[0])
        assert d.command(5 * ROUND_MS / 1000) is None  # undrained: nothing more moves


def test_drain_with_two_per_instance_and_a_lost_result_expires(ctx):
    with scheduler(max_migrations_per_instance=2, migration_timeout_ms=400) as ep:
        reqs = (("a", 10, 0, 100), ("b", 10, 0, 200), ("c", 10, 0, 300))
        ws = registered(ctx, ep, ("d", 70, reqs, {}), ("x", 90, (), {}))
        d = ws["d"]
        fe = Client(ctx, ep)
        start = time.monotonic()  # before either command: each expires 400 ms after it was sent
        assert isinstance(fe.ask(DrainInstance(worker_id="d")), Ack)
        cmds = []
        for _ in range(2):
            peer, cmd = d.must_command()
            d.answer(peer, Ack(reply_to=cmd.msg_id, detail=cmd.request_id))
            cmds.append(cmd)
        assert sorted(c.request_id for c in cmds) == ["a", "b"] and {c.dst_worker_id for c in cmds} == {"x"}
        assert d.command(3 * ROUND_MS / 1000) is None  # two out of d (and into x) at most
        # no result ever comes: after migration_timeout_ms they are forgotten and planned again
        peer, cmd = d.must_command()
        assert time.monotonic() - start > 0.4 and cmd.request_id in {"a", "b"}


# ---- the CLI -------------------------------------------------------------------------------------------

def ctl_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What the ctl printed (the in-process scheduler's log lines, also on stdout, left out)."""
    return [ln for ln in capsys.readouterr().out.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", ln)]


def test_ctl_migrate_and_drain_with_wait_through_the_cli(ctx, capsys):
    from cli.main import main as kvferry_main

    with scheduler() as ep, concurrent.futures.ThreadPoolExecutor(1) as pool:
        ws = registered(ctx, ep, ("w0", 80, (("r1", 20, 0, 300),), {}), ("w1", 90, (), {}))

        def ctl(*args: str) -> concurrent.futures.Future[int]:
            return pool.submit(kvferry_main, ["ctl", *args, "--scheduler", ep])

        run = ctl("migrate", "r1", "--to", "w1", "--wait", "5")
        peer, cmd = ws["w0"].must_command()
        ws["w0"].answer(peer, Ack(reply_to=cmd.msg_id, detail="r1"))
        time.sleep(0.15)  # the ctl polls a while with r1 still on w0
        ws["w0"].result(cmd, "r1")
        ws["w0"].load(100)  # after the result on the same socket: seen applied, the result was too
        ws["w1"].load(70, ("r1", 20, 0, 300))
        assert run.result(10) == 0
        assert ctl_lines(capsys) == [f"{cmd.migration_id}: r1 w0 -> w1", "r1 is on w1"]
        fe = Client(ctx, ep)
        assert wait_until(lambda: fe.ask(StatusRequest()).instances[0].free_blocks == 100, 2.0)

        assert ctl("migrate", "zz", "--to", "w0").result(10) == 1
        assert "not_found" in capsys.readouterr().err
        run = ctl("migrate", "r1", "--to", "w0", "--wait", "0.3")
        peer, cmd = ws["w1"].must_command()
        ws["w1"].answer(peer, Ack(reply_to=cmd.msg_id, detail="r1"))
        assert run.result(10) == 1  # acked, but r1 never shows up on w0
        err = capsys.readouterr().err
        assert err.startswith("error: r1 did not reach w0 within 0.3 s") and "listed on w1" in err
        assert ctl("migrate", "bad id", "--to", "w0").result(10) == 2

        # drain --wait: w1 has no destination to move r1 to (w0 is taken below), so it waits for w1 to empty
        ws["w1"].result(cmd, "r1", outcome="aborted", reason="cancelled")
        assert ctl("drain", "w0").result(10) == 0
        capsys.readouterr()
        assert ctl("drain", "w1", "--wait", "0.3").result(10) == 1
        assert "still had requests" in capsys.readouterr().err
        run = ctl("drain", "w1", "--wait", "5")
        time.sleep(0.15)
        ws["w1"].load(90)
        assert run.result(10) == 0
        assert ctl_lines(capsys) == ["w1: draining", "w1: drained (no requests)"]


def test_a_drain_round_sends_a_request_where_its_prompt_is_cached():
    """The scheduler remembers a dispatched request's prompt hashes; its migration round asks the KV
    index which destination caches them (policy cache affinity), here the less free one of two
    similarly free instances."""
    from protocol import KvEvents
    from protocol.kv_hash import prompt_hashes, root_from_namespace

    core = SchedulerCore(SchedulerConfig())

    def handle(msg: Any) -> Any:
        return asyncio.run(core.handle(Received(msg, [], b"peer")))

    ns = 4242
    for w in ("w0", "w1", "w2"):
        assert isinstance(handle(reg(w, kv_namespace=ns)), RegisterReply)
    hashes = prompt_hashes(list(range(160)), 16, root_from_namespace(ns, ""))  # 10 blocks
    for w in ("w0", "w1", "w2"):
        handle(report(w, 1, free=90 if w != "w1" else 95, running=1))
    # w2 caches the prompt's first 8 blocks; w1 (freer) caches nothing.
    assert handle(KvEvents(worker_id="w2", seq=0, reset=True, stored=hashes[:8])) is None
    for w in ("w0", "w1"):
        assert handle(KvEvents(worker_id=w, seq=0, reset=True)) is None
    reply = handle(DispatchRequest(request_id="r", frontend_id="f", num_prompt_tokens=160, block_hashes=hashes,
                                   kv_namespace=ns, kv_block_size=16, exclude_workers=["w1", "w2"]))
    assert isinstance(reply, DispatchReply)
    src = reply.worker_id
    assert src == "w0"
    handle(report(src, 2, free=80, running=1, requests=(("r", 10),)))
    handle(DrainInstance(worker_id=src))
    (plan,) = core.migrator.plan()
    assert plan.request_id == "r"
    assert plan.dst == "w2"  # w1 is freer, w2 nearly as free and caches 8 of its 10 blocks
    core.prefixes.forget("r")  # a request the scheduler no longer remembers: to the freest
    (plan,) = core.migrator.plan()
    assert plan.dst == "w1"
