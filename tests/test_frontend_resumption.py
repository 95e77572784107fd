"""The frontend's resumption and worker-liveness parts on hand-built streams, without sockets:
what a resumed request is started with, its limits, and which workers count as lost."""

from __future__ import annotations

import asyncio
from typing import Any

from protocol.payloads import SamplingParams
from protocol.to_frontend import TokenBatch
from services.config import FrontendConfig
from services.frontend.errors import RouteError
from services.frontend.liveness import WorkerLiveness
from services.frontend.resumption import Resumer
from services.frontend.streams import RequestStream

WAIT_S = 10.0


class Harness:
    """A Resumer over one dict of streams; `start` records its calls (or refuses with `refuse`)."""

    def __init__(self, **cfg: Any) -> None:
        self.streams: dict[str, RequestStream] = {}
        self.started: list[tuple[list[int], int, int, set[str]]] = []
        self.aborts: list[tuple[str, str, bool]] = []
        self.outcomes: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.refuse: RouteError | None = None
        self.resumer = Resumer(FrontendConfig(**cfg), self.streams, self.start, self.send_abort, self.spawn,
                               self.outcomes.append)

    async def start(self, stream: RequestStream, prompt: list[int], sampling: SamplingParams, first_index: int,
                    exclude: set[str]) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.started.append((prompt, sampling.max_tokens, first_index, exclude))
        stream.restart_at("w1", "tcp://127.0.0.1:2")

    async def send_abort(self, request_id: str, address: str, reason: str, quiet: bool = False) -> None:
        self.aborts.append((request_id, address, quiet))

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def settle(self) -> None:
        async with asyncio.timeout(WAIT_S):
            while self.tasks:
                await asyncio.wait(set(self.tasks))

    def stream(self, delivered: list[int], max_tokens: int = 10) -> RequestStream:
        s = RequestStream("r", "w0", "tcp://127.0.0.1:1", num_prompt_tokens=2, prompt_ids=[1, 2],
                          sampling=SamplingParams(max_tokens=max_tokens), on_lost=self.resumer.owner_let_go)
        s.accept(TokenBatch(request_id="r", first_index=0, token_ids=delivered, worker_id="w0"))
        self.streams["r"] = s
        return s


async def test_a_resumed_request_is_prompt_plus_delivered_tokens_elsewhere() -> None:
    h = Harness()
    s = h.stream([5, 6])
    assert h.resumer.resume(s, "w0 lost") and s.resuming
    await h.settle()
    assert h.started == [([1, 2, 5, 6], 8, 2, {"w0"})]
    assert h.aborts == [("r", "tcp://127.0.0.1:1", True)]  # a false alarm must not leave a copy there
    assert (s.worker_id, s.resumes, s.resuming, h.outcomes) == ("w1", 1, False, ["resumed"])
    s.accept(TokenBatch(request_id="r", first_index=2, token_ids=[9], worker_id="w0"))  # the old owner's
    s.accept(TokenBatch(request_id="r", first_index=2, token_ids=[7], worker_id="w1"))
    assert s.output == [5, 6, 7]


async def test_an_owner_that_lets_go_is_not_sent_an_abort() -> None:
    h = Harness()
    s = h.stream([5])
    s.accept(TokenBatch(request_id="r", first_index=1, token_ids=[], worker_id="w0", finish_reason="error",
                        error="worker stopping"))
    await h.settle()
    assert not s.finished and h.started == [([1, 2, 5], 9, 1, {"w0"})] and h.aborts == []


async def test_resumptions_are_bounded_and_a_failed_one_ends_the_stream_with_an_error() -> None:
    h = Harness(max_resumes=1)
    s = h.stream([5])
    h.resumer.resume(s, "first")
    await h.settle()
    h.resumer.resume(s, "second")
    await h.settle()
    ev = s.queue.get_nowait(), s.queue.get_nowait()
    assert ev[1].finish_reason == "error" and "max_resumes" in (ev[1].error or "")
    assert h.outcomes == ["resumed", "failed"]
    h2 = Harness()
    s2 = h2.stream([5])
    h2.refuse = RouteError("unavailable", "no worker")
    h2.resumer.resume(s2, "lost")
    await h2.settle()
    assert s2.finished and h2.outcomes == ["failed"]


async def test_a_request_that_delivered_every_token_just_ends() -> None:
    h = Harness()
    s = h.stream([5, 6, 7], max_tokens=3)
    h.resumer.resume(s, "lost before the final batch")
    await h.settle()
    assert h.started == [] and s.finished
    assert [e.finish_reason for e in (s.queue.get_nowait(), s.queue.get_nowait())] == [None, "length"]


async def test_a_gap_that_stays_open_resumes_and_a_fresh_one_does_not() -> None:
    h = Harness(gap_timeout_s=2.0)
    s = h.stream([5])
    s.accept(TokenBatch(request_id="r", first_index=3, token_ids=[8], worker_id="w0"))  # index 1-2 missing
    h.resumer.check_gaps(s.progressed + 1.0)
    assert not s.resuming
    h.resumer.check_gaps(s.progressed + 3.0)
    await h.settle()
    assert h.started == [([1, 2, 5], 9, 1, {"w0"})] and not s.ahead


async def test_liveness_reports_a_worker_that_answers_no_ping_and_forgets_untargeted_ones() -> None:
    spawned: list[Any] = []
    live = WorkerLiveness(None, "fe", "inc", timeout_s=3.0, spawn=spawned.append)  # type: ignore[arg-type]
    targets = {"tcp://a": "wa", "tcp://b": "wb"}
    assert live.tick(targets, now=100.0) == [] and len(spawned) == 2  # one ping each
    live.health["tcp://a"].last_pong = 102.0
    for h in live.health.values():
        h.pinging = 0
    assert live.tick(targets, now=104.0) == [("wb", "tcp://b", 4.0)]
    assert live.tick({"tcp://a": "wa"}, now=104.5) == [] and live.last_pong("tcp://b") is None
    for coro in spawned:
        coro.close()


async def test_an_unanswered_ping_is_followed_by_more_and_tokens_count_as_an_answer() -> None:
    spawned: list[Any] = []
    live = WorkerLiveness(None, "fe", "inc", timeout_s=3.0, spawn=spawned.append)  # type: ignore[arg-type]
    targets = {"tcp://a": "wa"}
    live.tick(targets, now=100.0)
    live.tick(targets, now=100.5)
    assert len(spawned) == 1  # the first Ping has had no time to be answered
    live.tick(targets, now=101.0)
    live.tick(targets, now=102.0)
    live.tick(targets, now=102.5)
    assert len(spawned) == 3 == live.health["tcp://a"].pinging  # one more per second, at most three
    live.heard("tcp://a", now=102.8)  # its tokens arrived: it runs, whatever became of the Pings
    assert live.tick(targets, now=105.0) == []
    assert [(w, a, round(t, 6)) for w, a, t in live.tick(targets, now=106.0)] == [("wa", "tcp://a", 3.2)]
    live.heard("tcp://unwatched", now=106.0)  # tokens from an address not watched: nothing to update
    assert live.last_pong("tcp://unwatched") is None
    for coro in spawned:
        coro.close()


async def test_a_ping_loss_spares_requests_handed_to_the_worker_after_it_fell_silent() -> None:
    # w0 was killed and came back under its id and address; the scheduler sent it a new request
    # before this frontend's pings (still timing the old incarnation's silence) gave up on it.
    import time

    h = Harness()
    old = h.stream([5])
    silent_since = time.monotonic()
    new = RequestStream("n", "w0", "tcp://127.0.0.1:1", num_prompt_tokens=2, prompt_ids=[1, 2],
                        sampling=SamplingParams(max_tokens=4), on_lost=h.resumer.owner_let_go)
    new.assigned_at = silent_since + 1.0
    h.streams["n"] = new
    assert h.resumer.resume_all("w0", "tcp://127.0.0.1:1", "no answer to pings", silent_since=silent_since) == 1
    await h.settle()
    assert old.worker_id == "w1" and new.worker_id == "w0" and not new.resuming
    # Without that time (the scheduler declared w0 dead), every request of w0 goes.
    assert h.resumer.resume_all("w0", "tcp://127.0.0.1:1", "declared dead") == 1
    await h.settle()
    assert new.worker_id == "w1"
