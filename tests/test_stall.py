"""A process that did not run for a while (services.stall) does not count that time as its peers'
silence: the frontend's Ping deadlines and the scheduler's heartbeat deadlines move by it."""

from __future__ import annotations

from typing import Any

from services.frontend.liveness import WorkerLiveness
from services.scheduler.registry import Registry
from services.stall import StallWatch
from tests.test_scheduler_service import reg


def test_stall_watch_reports_only_lateness_beyond_the_noise():
    w = StallWatch(interval_s=0.5, min_stall_s=1.0)
    assert w.late(10.0) == 0.0  # the first round has nothing to compare with
    assert w.late(10.5) == 0.0 and w.late(11.3) == 0.0  # on time, then 0.3 s late: noise
    assert w.late(15.3) == 3.5  # asked for 0.5 s, woke 4.0 s later
    assert w.late(15.8) == 0.0


async def test_a_stalled_frontend_does_not_declare_its_workers_lost():
    spawned: list[Any] = []
    live = WorkerLiveness(None, "fe", "inc", timeout_s=3.0, spawn=spawned.append)  # type: ignore[arg-type]
    targets = {"tcp://a": "wa"}
    assert live.tick(targets, now=100.0) == []
    live.health["tcp://a"].last_pong = 100.5
    live.health["tcp://a"].pinging = 0
    # the frontend's loop did not run from 100.5 to 107.0: the Pongs sent meanwhile wait unread
    live.excuse(6.0)
    assert live.tick(targets, now=107.0) == []
    # a worker that stays silent once the frontend runs again is still lost
    live.health["tcp://a"].pinging = 0
    assert live.tick(targets, now=110.0) == [("wa", "tcp://a", 3.5)]
    for coro in spawned:
        coro.close()


def test_a_stalled_scheduler_does_not_declare_its_workers_dead():
    r = Registry(timeout_s=1.0)
    r.register(reg("a"), b"a", now=0.0, now_ms=0)
    r.excuse_silence(4.0)  # the scheduler did not run from 0.0 to 4.0
    assert r.sweep(4.5) == [] and r.get("a").alive
    assert [d.worker_id for d in r.sweep(5.5)] == ["a"]  # silent for 1.5 s of its own time
