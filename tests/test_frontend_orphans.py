"""A worker the frontend declared lost can come back (a network partition shorter than its
[worker] frontend_timeout_s: tests/test_e2e_multihost.py) still running a request that was
resumed elsewhere, the abort sent on resumption having reached it past its deadline. Its tokens
for that request make the frontend abort it there (at most once per abort_timeout_s), while the
stream runs and after it ended; nobody else is sent an abort."""

from __future__ import annotations

import asyncio

import pytest

from protocol.payloads import SamplingParams
from protocol.to_frontend import TokenBatch
from services.config import load_config
from services.frontend.router import Router
from services.frontend.streams import RequestStream

LOST, OWNER = ("w0", "tcp://127.0.0.1:1"), ("w1", "tcp://127.0.0.1:2")  # nothing is connected: both patched


@pytest.fixture
async def router(monkeypatch):
    """A stream taken from lost w0 (its resumption's abort sent, and lost) that goes on at w1."""
    r = Router(load_config(env={}))
    aborts: list[tuple[str, str, str]] = []

    async def send_abort(request_id: str, address: str, reason: str, quiet: bool = False) -> None:
        aborts.append((request_id, address, reason))

    async def start(stream: RequestStream, prompt: list[int], sampling: SamplingParams, first_index: int,
                    exclude: set[str]) -> None:
        stream.restart_at(*OWNER)

    monkeypatch.setattr(r.links, "send_abort", send_abort)
    monkeypatch.setattr(r.resumer, "_send_abort", send_abort)
    monkeypatch.setattr(r.resumer, "_start", start)
    s = RequestStream("req-1", *LOST, num_prompt_tokens=2, prompt_ids=[1, 2], sampling=SamplingParams(max_tokens=9))
    r.streams[s.request_id] = s
    r.worker_lost(*LOST, "no answer to pings")
    await settle(r)
    assert (s.worker_id, s.dead, aborts) == ("w1", {"w0"}, [("req-1", LOST[1], "resumed on another worker")])
    aborts.clear()
    yield r, s, aborts
    await settle(r)


def batch(worker: str, first: int, finished: bool = False) -> TokenBatch:
    return TokenBatch(request_id="req-1", first_index=first, token_ids=[7], worker_id=worker,
                      finish_reason="length" if finished else None)


async def settle(r: Router) -> None:
    while r._bg:  # the router's background tasks (aborts, resumptions)
        await asyncio.gather(*r._bg)


async def test_tokens_from_the_lost_worker_abort_it_there_once_per_abort_timeout(router):
    r, s, aborts = router
    r._on_batch(batch("w1", 0))  # the owner's: nothing to abort
    r._on_batch(batch("w0", 0))  # the lost worker is back and still runs it
    r._on_batch(batch("w0", 1))
    await settle(r)
    assert aborts == [("req-1", LOST[1], "resumed on another worker")]
    assert s.output == [7]  # its tokens do not count
    r._orphan_aborts[("req-1", "w0")] -= r.fcfg.abort_timeout_s  # that abort got lost too
    r._on_batch(batch("w0", 2))
    r._on_batch(batch("w0", 3, finished=True))  # a final batch: it let go by itself
    await settle(r)
    assert len(aborts) == 2


async def test_after_the_stream_ended_only_the_lost_worker_is_told(router):
    r, _, aborts = router
    r._on_batch(batch("w1", 0, finished=True))
    r.finish("req-1")
    r._on_batch(batch("w1", 1))  # nothing the owner sends after its end is aborted
    r._on_batch(batch("w2", 0))  # nor a worker the request was never taken from
    r._on_batch(batch("w0", 5))
    await settle(r)
    assert aborts == [("req-1", LOST[1], "resumed on another worker")]
