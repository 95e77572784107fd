"""The frontend's rule for requests that stream nothing and that no worker lists: it resumes one
only on the word of a report its owner made after the request went missing, so a worker stuck in a
long step (or paused) does not lose the requests it has not reported yet."""

from __future__ import annotations

import time

import pytest

from protocol.payloads import WorkerEndpoints
from protocol.to_frontend import InstanceStatus, RequestLocation, StatusReply
from services.config import load_config
from services.frontend.router import Router
from services.frontend.streams import RequestStream


class FakeScheduler:
    """Answers StatusRequest with what the test sets: the owner's report time and its requests."""

    def __init__(self) -> None:
        self.report_ms = 1_000
        self.listed: list[str] = []

    async def request(self, msg: object, timeout_s: float | None = None) -> StatusReply:
        ep = WorkerEndpoints(control="tcp://127.0.0.1:1", migration="tcp://127.0.0.1:2")
        return StatusReply(reply_to="x", scheduler_id="scheduler-0",
                           instances=[InstanceStatus(worker_id="worker-0", endpoints=ep,
                                                     last_report_ms=self.report_ms)],
                           requests=[RequestLocation(request_id=r, worker_id="worker-0") for r in self.listed])


@pytest.fixture
def setup(monkeypatch):
    r = Router(load_config(env={}, overrides={"frontend": {"unlisted_s": 0.0}}))
    sched = FakeScheduler()
    r.sched = sched  # type: ignore[assignment]
    resumed: list[tuple[str, str]] = []
    monkeypatch.setattr(r.resumer, "resume", lambda s, why: resumed.append((s.request_id, why)))
    s = RequestStream("req-1", "worker-0", "tcp://127.0.0.1:1")
    s.progressed = time.monotonic() - r.fcfg.silent_s - 1.0  # silent for longer than [frontend] silent_s
    r.streams[s.request_id] = s
    return r, sched, resumed


async def test_owner_without_a_newer_report_does_not_lose_the_request(setup):
    r, sched, resumed = setup
    for _ in range(3):  # the owner is stuck: its last report (before the request came) stays the last
        await r._find_silent()
    assert resumed == []


async def test_a_newer_report_without_the_request_resumes_it(setup):
    r, sched, resumed = setup
    await r._find_silent()
    assert resumed == []
    sched.report_ms += 50  # the owner reported again, and the request is not in it
    await r._find_silent()
    assert resumed == [("req-1", "listed on no live worker")]


async def test_a_newer_report_that_lists_the_request_keeps_it(setup):
    r, sched, resumed = setup
    await r._find_silent()
    sched.report_ms += 50
    sched.listed = ["req-1"]
    await r._find_silent()
    assert resumed == [] and "req-1" not in r.resumer._unlisted
