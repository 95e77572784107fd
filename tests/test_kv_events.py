"""KV events from the engine through the worker to the scheduler's prefix index, and cache-aware
dispatch on it (design §4): the worker's batching and numbering (services/worker/kv_events.py),
the engine's queued prefill, the scheduler's index as soft state (services/scheduler/kv_index.py
and its handlers), the frontend's prompt hashes, and a real scheduler process fed raw ZeroMQ.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
import zmq

from engine.block_manager import KvEventBatch
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.interface import KvEventSource, kv_event_source
from engine.request import SamplingParams
from engine.sim.latency import INSTANT
from protocol import (
    PROTOCOL_VERSION,
    Deregister,
    DispatchReply,
    DispatchRequest,
    ErrorReply,
    KvEvents,
    LoadReport,
    RegisterReply,
    ResyncKvEvents,
    StatusReply,
    StatusRequest,
    encode,
)
from protocol.codec import decode
from protocol.errors import ValidationError
from protocol.fields import MAX_BLOCK_HASHES, MAX_KV_EVENT_HASHES
from protocol.kv_hash import prompt_hashes, root_from_namespace
from protocol.sockets import Received
from services.config import SchedulerConfig
from services.frontend.prompt_hashes import PromptHasher, PromptHashes
from services.scheduler.handlers import SchedulerCore
from services.scheduler.kv_index import RESYNC_RETRY_S, KvIndex
from services.worker.kv_events import KvEventPublisher
from tests.test_scheduler_service import Client, FakeWorker, Scheduler, free_port, reg, report
from testkit.wait import wait_until

NS = 0x1234_5678_9ABC_DEF0  # a namespace the fake workers announce
BS = 16


def events(wid: str, seq: int, stored: list[int] = (), removed: list[int] = (), reset: bool = False) -> KvEvents:
    return KvEvents(worker_id=wid, seq=seq, reset=reset, stored=list(stored), removed=list(removed))


# ---- worker: batches into messages ------------------------------------------------------------------

def test_publisher_numbers_and_splits_batches_and_only_the_first_part_of_a_reset_resets():
    pub = KvEventPublisher("w0", enabled=True, max_hashes=3)
    assert pub.take_resync() and not pub.take_resync()  # the first batch is a reset
    assert pub.messages(KvEventBatch()) == [] and pub.messages(None) == []
    msgs = pub.messages(KvEventBatch(stored=list(range(7)), reset=True))
    assert [(m.seq, m.reset, m.stored) for m in msgs] == [(0, True, [0, 1, 2]), (1, False, [3, 4, 5]),
                                                          (2, False, [6])]
    msgs = pub.messages(KvEventBatch(stored=[9], removed=[1, 2, 3, 4]))
    assert [(m.seq, m.reset, m.stored, m.removed) for m in msgs] == [(3, False, [9], [1, 2, 3]), (4, False, [], [4])]
    pub.request_resync("registered")
    assert pub.take_resync()
    off = KvEventPublisher("w1", enabled=False)
    assert not off.take_resync()  # an engine without events never resyncs
    big = KvEventPublisher("w2", enabled=True).messages(KvEventBatch(stored=list(range(MAX_KV_EVENT_HASHES + 1))))
    assert [len(m.stored) for m in big] == [MAX_KV_EVENT_HASHES, 1]
    for m in big:
        assert decode(encode(m), KvEvents) == m  # each part is a valid message


def test_engines_with_a_prefix_cache_are_kv_event_sources_and_a_resync_resends_the_whole_cache():
    eng = LLMEngine.sim(INSTANT, EngineConfig(num_blocks=64, block_size=BS))
    assert isinstance(eng, KvEventSource) and kv_event_source(eng) is eng and eng.kv_namespace
    off = LLMEngine.sim(INSTANT, EngineConfig(num_blocks=64, block_size=BS, prefix_caching=False))
    assert kv_event_source(off) is None and off.kv_namespace == 0
    assert kv_event_source(object()) is None  # e.g. the vLLM engine: no events, namespace 0
    eng.enable_kv_events()
    assert eng.take_kv_events().reset
    prompt = list(range(1, 50))  # 3 full blocks
    eng.add_request("a", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    want = prompt_hashes(prompt, BS, root_from_namespace(eng.kv_namespace))
    batch = eng.take_kv_events()
    assert not batch.reset and set(want) <= set(batch.stored)
    assert not eng.take_kv_events()  # nothing new
    again = eng.take_kv_events(resync=True)
    assert again.reset and set(want) <= set(again.stored) and not again.removed


def test_queued_prefill_counts_waiting_prompts_and_unfinished_chunked_prefills():
    eng = LLMEngine.sim(INSTANT, EngineConfig(num_blocks=256, block_size=BS, max_num_batched_tokens=64,
                                               max_num_seqs=1))
    eng.add_request("long", list(range(1, 201)), SamplingParams(max_tokens=4, ignore_eos=True))
    eng.add_request("next", list(range(1, 31)), SamplingParams(max_tokens=4, ignore_eos=True))
    assert eng.stats().queued_prefill_tokens == 230
    eng.step()  # 64 of long's 200 prompt tokens; next waits (one sequence at a time)
    assert eng.stats().queued_prefill_tokens == 136 + 30
    while eng.scheduler.running and eng.scheduler.running[0].num_computed_tokens < 200:
        eng.step()
    assert eng.stats().queued_prefill_tokens == 30  # long decodes: its one pending token is no prefill
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.stats().queued_prefill_tokens == 0


# ---- scheduler: the index as soft state ---------------------------------------------------------------

def test_index_applies_events_in_order_and_a_gap_clears_and_asks_for_a_resync():
    kv = KvIndex()
    kv.register("w0", NS, BS, now=0.0)
    assert kv.apply(events("w0", 0, [1, 2]), now=0.1) is None  # not a reset: dropped, the reset is on its way
    assert kv.entries("w0") == 0 and kv.dropped == 1 and kv.resyncs == 0
    assert kv.apply(events("w0", 0, [1, 2, 3], reset=True), now=0.2) is None
    assert kv.apply(events("w0", 1, [4], removed=[3]), now=0.3) is None
    assert kv.match([1, 2, 3], NS, BS) == {"w0": 2} and kv.match([1, 2, 4], NS, BS) == {"w0": 3}
    assert kv.match([1, 2], NS, 32) == {} and kv.match([1, 2], NS + 1, BS) == {}  # other hashing: no match
    reason = kv.apply(events("w0", 3, [5]), now=0.4)  # seq 2 never came
    assert reason is not None and "expected seq 2" in reason and kv.resyncs == 1
    assert kv.entries("w0") == 0 and kv.match([1], NS, BS) == {}
    assert kv.apply(events("w0", 4, [6]), now=0.5) is None  # asked lately: not again
    assert kv.apply(events("w0", 5, [6]), now=0.5 + RESYNC_RETRY_S) == "awaiting a reset"  # the ask got lost?
    assert kv.apply(events("w0", 9, [1, 7], reset=True), now=2.0) is None  # a reset: back in sync
    assert kv.apply(events("w0", 10, [8]), now=2.1) is None and kv.entries("w0") == 3
    assert kv.invalid("w0", now=2.2) == "a malformed KvEvents" and kv.entries("w0") == 0
    assert kv.applied == 4 and kv.dropped == 5
    kv.register("w0", NS, BS, now=3.0)  # registering again: forgotten, a reset expected
    assert kv.apply(events("w0", 0, [1], reset=True), now=3.1) is None and kv.match([1], NS, BS) == {"w0": 1}
    kv.forget("w0")
    assert kv.entries("w0") == 0 and kv.apply(events("w0", 1, [2]), now=3.2) is None and kv.entries("w0") == 0


def test_index_cap_holds_under_a_flood_of_distinct_hashes():
    kv = KvIndex(max_entries_per_instance=1000)
    kv.register("w0", NS, BS, now=0.0)
    kv.apply(events("w0", 0, reset=True), now=0.0)
    for seq in range(1, 51):
        kv.apply(events("w0", seq, range(seq * 4096, (seq + 1) * 4096)), now=0.0)
    assert kv.entries("w0") == 1000 and kv.index.num_entries() == 1000 and kv.applied == 51


def test_cluster_hashing_is_that_of_most_workers():
    kv = KvIndex()
    assert kv.hashing() == (0, 0)
    kv.register("a", NS, BS, 0.0)
    kv.register("b", NS + 1, 32, 0.0)
    kv.register("c", NS + 1, 32, 0.0)
    kv.register("d", 0, BS, 0.0)  # no prefix caching: not counted
    assert kv.hashing() == (NS + 1, 32)
    kv.forget("b")
    kv.forget("c")
    assert kv.hashing() == (NS, BS)


class Core:
    """A SchedulerCore fed by hand (its clock set by the test)."""

    def __init__(self, **settings: Any) -> None:
        self.now = 0.0
        self.core = SchedulerCore(SchedulerConfig(**settings), clock=lambda: self.now)

    def handle(self, msg: Any, peer: bytes = b"peer") -> Any:
        return asyncio.run(self.core.handle(Received(msg, [], peer)))

    def dispatch(self, rid: str, tokens: int, hashes: list[int]) -> DispatchReply:
        reply = self.handle(DispatchRequest(request_id=rid, num_prompt_tokens=tokens, frontend_id="fe",
                                            block_hashes=hashes, kv_namespace=NS, kv_block_size=BS))
        assert isinstance(reply, DispatchReply), reply
        return reply


def test_dispatch_goes_to_the_instance_holding_the_prefix():
    c = Core(policy="kvferry")
    for w in ("w0", "w1"):
        assert isinstance(c.handle(reg(w, 1000, kv_namespace=NS), peer=w.encode()), RegisterReply)
        assert c.handle(report(w, 1, free=900, total=1000)) is None
    prompt = list(range(40))  # hashes of 40 blocks, 640 tokens
    assert c.dispatch("cold", 650, prompt).worker_id == "w0"  # nothing cached: the freest, lowest id
    assert c.core.dispatch_hits["cold"] == 0
    assert c.handle(events("w1", 0, prompt, reset=True)) is None
    hot = c.dispatch("hot", 650, prompt)
    assert hot.worker_id == "w1" and c.core.dispatch_hits["hot"] == 640
    assert (hot.kv_namespace, hot.kv_block_size) == (NS, BS)
    other_salt = c.dispatch("salted", 650, [h + 1000 for h in prompt])  # another salt: other hashes
    assert c.core.dispatch_hits["salted"] == 0 and other_salt.worker_id in ("w0", "w1")
    no_hashes = c.handle(DispatchRequest(request_id="plain", num_prompt_tokens=650, frontend_id="fe"))
    assert isinstance(no_hashes, DispatchReply) and "plain" not in c.core.dispatch_hits
    st = c.handle(StatusRequest())
    assert {i.worker_id: i.indexed_blocks for i in st.instances} == {"w0": 0, "w1": 40}
    c.handle(Deregister(worker_id="w1"))
    assert c.core.kv.entries("w1") == 0
    assert c.dispatch("after", 650, prompt).worker_id == "w0"


def test_handlers_resync_on_a_gap_or_a_malformed_message_and_answer_unknown_workers():
    c = Core(heartbeat_timeout_ms=2000)
    c.handle(reg("w0", kv_namespace=NS), peer=b"w0")
    assert c.handle(events("w0", 0, [1, 2], reset=True)) is None
    resync = c.handle(events("w0", 2, [3]))
    assert isinstance(resync, ResyncKvEvents) and "expected seq 1" in resync.reason
    assert c.core.kv.entries("w0") == 0
    c.handle(events("w0", 3, [1], reset=True))
    bad = ValidationError("invalid KvEvents: ...")
    bad.msg_type, bad.peer = "KvEvents", b"w0"
    assert isinstance(c.core.on_invalid(bad), ResyncKvEvents) and c.core.kv.entries("w0") == 0
    other = ValidationError("invalid LoadReport: ...")
    other.msg_type, other.peer = "LoadReport", b"w0"
    assert c.core.on_invalid(other) is None
    unreadable = ValidationError("not a message envelope")  # no type: it may have been a KvEvents
    unreadable.peer = b"w0"
    c.handle(events("w0", 4, [1], reset=True))
    assert isinstance(c.core.on_invalid(unreadable), ResyncKvEvents) and c.core.kv.entries("w0") == 0
    bad.peer = b"stranger"
    assert c.core.on_invalid(bad) is None
    nf = c.handle(events("ghost", 0, [1], reset=True))
    assert isinstance(nf, ErrorReply) and nf.code == "not_found"
    c.handle(events("w0", 5, [5], reset=True))
    c.now = 5.0  # silent past the heartbeat timeout: dead, its entries gone
    assert [r.worker_id for r in c.core.sweep()] == ["w0"] and c.core.kv.entries("w0") == 0
    assert isinstance(c.handle(events("w0", 6, [6])), ErrorReply)


def test_cached_blocks_reach_the_status():
    c = Core()
    c.handle(reg("w0", kv_namespace=NS), peer=b"w0")
    c.handle(LoadReport(worker_id="w0", seq=1, total_blocks=100, free_blocks=100, num_running=0, num_waiting=0,
                        num_cached_blocks=12, queued_prefill_tokens=300))
    (inst,) = c.handle(StatusRequest()).instances
    assert inst.cached_blocks == 12 and c.core.registry.get("w0").snapshot.queued_prefill_tokens == 300

    from cli.ctl import format_status

    text = format_status(c.handle(StatusRequest()))
    assert "CACHED/INDEXED" in text and " 12/0 " in text


# ---- frontend: the prompt's hashes ----------------------------------------------------------------

def test_frontend_hashes_once_the_cluster_hashing_is_known_and_extends_them_on_resume():
    h = PromptHasher()
    prompt = list(range(100))
    assert h.hashes(PromptHashes(), prompt).hashes == []  # unknown yet: none
    h.learn(NS, BS)
    first = h.hashes(PromptHashes(), prompt, "tenant")
    assert first.hashes == prompt_hashes(prompt, BS, root_from_namespace(NS, "tenant")) and len(first.hashes) == 6
    resumed = h.hashes(first, prompt + list(range(40)), "tenant")
    assert resumed.hashes == prompt_hashes(prompt + list(range(40)), BS, root_from_namespace(NS, "tenant"))
    h.learn(NS + 1, 32)  # the cluster changed: start over with its parameters
    assert h.hashes(resumed, prompt).hashes == prompt_hashes(prompt, 32, root_from_namespace(NS + 1))
    assert len(h.hashes(PromptHashes(), [1] * (32 * MAX_BLOCK_HASHES + 64)).hashes) == MAX_BLOCK_HASHES
    h.learn(0, 0)
    assert h.hashes(resumed, prompt).hashes == []


# ---- a real scheduler process, raw ZeroMQ ---------------------------------------------------------------

@pytest.mark.e2e  # a scheduler process
def test_scheduler_process_drops_malformed_kv_events_asks_for_a_resync_and_keeps_serving():
    sched = Scheduler(free_port())
    zctx = zmq.Context()
    try:
        w0, w1 = (FakeWorker(zctx, sched.endpoint, w, blocks=1000) for w in ("w0", "w1"))
        fe = Client(zctx, sched.endpoint)
        for w in (w0, w1):
            assert isinstance(w.ask(reg(w.wid, 1000, kv_namespace=NS)), RegisterReply)
            w.report(free=900)
        prompt = [(1 << 64) - 1 - i for i in range(20)]  # the top of the uint64 range travels too
        w1.send(events("w1", 0, prompt, reset=True))

        def indexed(wid: str) -> int:
            st = fe.ask(StatusRequest())
            assert isinstance(st, StatusReply)
            return next(i.indexed_blocks for i in st.instances if i.worker_id == wid)

        assert wait_until(lambda: indexed("w1") == 20, 10.0)
        d = fe.ask(DispatchRequest(request_id="r", num_prompt_tokens=330, frontend_id="fe", block_hashes=prompt,
                                   kv_namespace=NS, kv_block_size=BS))
        assert isinstance(d, DispatchReply) and d.worker_id == "w1" and (d.kv_namespace, d.kv_block_size) == (NS, BS)
        got: list[Any] = []
        for body in ({"worker_id": "w1", "seq": 1, "stored": [-1]},  # out of range
                     {"worker_id": "w1", "seq": 1, "stored": list(range(MAX_KV_EVENT_HASHES + 1))},  # too long
                     {"worker_id": "w1", "seq": "one"}):  # wrong type
            w1.send_raw(msgpack.packb([PROTOCOL_VERSION, "KvEvents", body]))
            got.append(w1.recv(10.0))
            while not isinstance(got[-1], ErrorReply):
                got.append(w1.recv(10.0))
            assert got[-1].code == "invalid", got
        got.append(w1.poll_msg(0.5))  # the last one's resync, if asked again (once a second at most)
        resyncs = [m for m in got if isinstance(m, ResyncKvEvents)]
        assert 1 <= len(resyncs) <= 3 and all(isinstance(m, (ErrorReply, ResyncKvEvents)) for m in got if m)
        assert indexed("w1") == 0  # cleared: unknown until its reset
        d = fe.ask(DispatchRequest(request_id="r2", num_prompt_tokens=330, frontend_id="fe", block_hashes=prompt,
                                   kv_namespace=NS, kv_block_size=BS))
        assert isinstance(d, DispatchReply)  # still serving; w1's prefix is unknown until its reset
        w1.send(events("w1", 1, prompt, reset=True))
        assert wait_until(lambda: indexed("w1") == 20, 10.0)
        w1.send(events("w1", 5, [7]))  # a gap: cleared, resync asked
        resync = w1.recv(10.0)
        while isinstance(resync, ResyncKvEvents) and "expected seq 2" not in resync.reason:
            resync = w1.recv(10.0)  # a late ask from the malformed ones
        assert isinstance(resync, ResyncKvEvents) and "expected seq 2" in resync.reason
        assert indexed("w1") == 0
    finally:
        zctx.destroy(linger=0)
        sched.kill()
