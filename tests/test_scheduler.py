"""The continuous-batching scheduler, driven through the sim engine (LLaMA-7B/A10 latency, virtual clock).

The sim engine emits token `sim_token(request_id, i)` as output i of a request wherever and however it
is scheduled, so every test can also check each request's exact output.
"""

from __future__ import annotations

import random

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.request import FinishReason
from engine.sim.executor import sim_token
from engine.sim.latency import LLAMA7B_A10

VOCAB = LLAMA7B_A10.vocab_size


def make(**cfg) -> LLMEngine:
    cfg.setdefault("debug_checks", True)  # block integrity checked after every step
    return LLMEngine.sim(LLAMA7B_A10, EngineConfig(**cfg), clock="virtual")


def expected(rid: str, n: int) -> list[int]:
    return [sim_token(rid, i, VOCAB) for i in range(n)]


def record(engine: LLMEngine) -> list[list[tuple[str, int, int]]]:
    """Log (request id, start, num_new_tokens) of every scheduled request, one list per executed step."""
    log: list[list[tuple[str, int, int]]] = []
    inner = engine.executor.execute

    def execute(sched, table):  # noqa: ANN001, ANN202
        log.append([(s.request.request_id, s.start, s.num_new_tokens) for s in sched.scheduled])
        return inner(sched, table)

    engine.executor.execute = execute
    return log


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + i) % VOCAB for i in range(n)]


def assert_idle_and_clean(engine: LLMEngine) -> None:
    engine.check_integrity()
    assert not engine.has_unfinished_requests()
    assert engine.blocks.num_used == 0
    st = engine.stats()
    assert st.num_free_blocks == st.num_blocks and st.num_running == 0 and st.num_waiting == 0


def test_continuous_batching_admits_new_requests_while_others_decode(drain, make_streams):
    """A request that arrives mid-decode is prefilled in the very next step, in the same batch as the decode."""
    eng = make(block_size=16, num_blocks=100)
    log = record(eng)
    streams = make_streams()
    eng.add_request("a", prompt(10), SamplingParams(max_tokens=30))
    for _ in range(3):
        streams.feed(eng.step())
    assert log[0] == [("a", 0, 10)] and log[1] == [("a", 10, 1)]
    eng.add_request("b", prompt(20, 7), SamplingParams(max_tokens=5))
    outs = eng.step()
    streams.feed(outs)
    assert sorted(log[-1]) == [("a", 12, 1), ("b", 0, 20)]
    assert {o.request_id for o in outs} == {"a", "b"}  # b sampled its first token in its prefill step
    assert eng.stats().num_running == 2
    drain(eng, streams)
    assert streams.tokens == {"a": expected("a", 30), "b": expected("b", 5)}
    assert streams.finish == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}
    # b finished long before a: the batch shrank and a kept decoding alone
    assert log[-1] == [("a", 10 + 28, 1)]
    assert_idle_and_clean(eng)


def test_max_num_seqs_caps_the_batch(drain, make_streams):
    """Never more than max_num_seqs requests in a step; the rest wait and are admitted as others finish."""
    eng = make(block_size=16, num_blocks=200, max_num_seqs=3)
    log = record(eng)
    for i in range(7):
        eng.add_request(f"r{i}", prompt(5 + i), SamplingParams(max_tokens=4 + i))
    streams = make_streams()
    while eng.has_unfinished_requests():
        streams.feed(eng.step())
        st = eng.stats()
        assert st.num_running <= 3
    assert max(len(step) for step in log) == 3
    assert all(len(step) <= 3 for step in log)
    assert streams.tokens == {f"r{i}": expected(f"r{i}", 4 + i) for i in range(7)}
    assert_idle_and_clean(eng)


def test_max_num_batched_tokens_caps_every_step(drain):
    """The tokens of one step (decodes plus prefill chunks) never exceed max_num_batched_tokens."""
    eng = make(block_size=8, num_blocks=200, max_num_batched_tokens=50)
    log = record(eng)
    for i, n in enumerate((30, 30, 45, 12, 49)):
        eng.add_request(f"r{i}", prompt(n, i), SamplingParams(max_tokens=6))
    streams = drain(eng)
    assert all(sum(n for _, _, n in step) <= 50 for step in log)
    assert max(sum(n for _, _, n in step) for step in log) == 50  # the budget is used, not just respected
    assert streams.tokens == {f"r{i}": expected(f"r{i}", 6) for i in range(5)}
    assert_idle_and_clean(eng)


def test_long_prompt_is_prefilled_in_chunks(drain, make_streams):
    """A prompt longer than the token budget is fed in budget-sized chunks; it samples only after the last."""
    eng = make(block_size=16, num_blocks=100, max_num_batched_tokens=32)
    log = record(eng)
    streams = make_streams()
    eng.add_request("long", prompt(100), SamplingParams(max_tokens=3))
    for _ in range(3):
        assert eng.step() == []  # mid-prefill: no token yet
    streams.feed(eng.step())
    assert streams.tokens == {"long": expected("long", 1)}
    drain(eng, streams)
    assert log == [[("long", 0, 32)], [("long", 32, 32)], [("long", 64, 32)], [("long", 96, 4)],
                   [("long", 100, 1)], [("long", 101, 1)]]
    assert streams.tokens["long"] == expected("long", 3)
    assert_idle_and_clean(eng)


def test_chunked_prefill_shares_steps_with_decodes(drain, make_streams):
    """While a long prompt is chunked, a running request keeps decoding in every step (decodes go first)."""
    eng = make(block_size=16, num_blocks=100, max_num_batched_tokens=16)
    log = record(eng)
    streams = make_streams()
    eng.add_request("d", prompt(4), SamplingParams(max_tokens=20))
    streams.feed(eng.step())
    eng.add_request("p", prompt(60, 3), SamplingParams(max_tokens=2))
    drain(eng, streams)
    chunk_steps = [s for s in log[1:] if any(r == "p" and n > 1 for r, _, n in s)]
    assert len(chunk_steps) == 4  # 60 tokens at 15 per step
    for s in chunk_steps:
        assert ("d", s[0][1], 1) == s[0] and s[1][0] == "p" and s[1][2] == 15
    assert streams.tokens == {"d": expected("d", 20), "p": expected("p", 2)}
    assert_idle_and_clean(eng)


def _preemption_run(priorities: dict[str, int]) -> tuple[LLMEngine, dict, list, list[str]]:
    """Three 8-token prompts that want 24 tokens (6 blocks of 4) each, in a pool of 12 blocks."""
    eng = make(block_size=4, num_blocks=12, watermark=0.0)
    log = record(eng)
    reqs = {rid: eng.add_request(rid, prompt(8, i), SamplingParams(max_tokens=16), priority=prio)
            for i, (rid, prio) in enumerate(priorities.items())}
    order: list[str] = []  # request ids in the order they were preempted
    inner = eng.scheduler._preempt

    def preempt(req):  # noqa: ANN001, ANN202
        order.append(req.request_id)
        inner(req)

    eng.scheduler._preempt = preempt
    return eng, reqs, log, order


def test_preemption_by_recompute_evicts_latest_arrival_and_it_still_completes(drain):
    """Out of blocks: the most recently arrived request (equal priorities) loses its KV, is requeued,
    recomputes prompt + output in one prefill, and still produces exactly its max_tokens tokens."""
    eng, reqs, log, order = _preemption_run({"r0": 0, "r1": 0, "r2": 0})
    streams = drain(eng)
    assert eng.scheduler.num_preemptions > 0 and eng.stats().num_preemptions == eng.scheduler.num_preemptions
    assert order[0] == "r2"
    # the recompute prefill of r2 covers its prompt and the outputs it had produced
    recomputes = [(start, n) for step in log for rid, start, n in step if rid == "r2" and start == 0]
    assert len(recomputes) == 1 + reqs["r2"].num_preemptions
    assert all(n > 8 for _, n in recomputes[1:])
    assert streams.tokens == {rid: expected(rid, 16) for rid in reqs}
    assert all(reason is FinishReason.LENGTH for reason in streams.finish.values())
    assert_idle_and_clean(eng)


def test_preemption_evicts_lowest_priority_first(drain):
    """Priority beats arrival: the earliest request, with the lowest priority (highest number), goes first."""
    eng, reqs, _, order = _preemption_run({"low": 1, "hi1": 0, "hi2": 0})
    streams = drain(eng)
    assert order[0] == "low"
    assert streams.tokens == {rid: expected(rid, 16) for rid in reqs}
    assert_idle_and_clean(eng)


def test_waiting_high_priority_request_is_served_first(drain):
    """Among waiting requests, a lower priority number is admitted first, whatever the arrival order."""
    eng = make(block_size=16, num_blocks=100, max_num_seqs=1)
    log = record(eng)
    for rid, prio in (("l1", 5), ("l2", 5), ("h", 0), ("m", 2)):
        eng.add_request(rid, prompt(6), SamplingParams(max_tokens=3), priority=prio)
    streams = drain(eng)
    first_seen = list(dict.fromkeys(rid for step in log for rid, _, _ in step))
    assert first_seen == ["h", "m", "l1", "l2"]
    assert list(streams.finish) == ["h", "m", "l1", "l2"]
    assert_idle_and_clean(eng)


def test_high_priority_arrival_preempts_a_running_low_priority_request(drain, make_streams):
    """With the batch full, an arriving higher-priority request takes the place of the latest low-priority
    one (preempted by recompute); everyone still gets exactly their tokens."""
    eng = make(block_size=16, num_blocks=100, max_num_seqs=2)
    streams = make_streams()
    eng.add_request("l1", prompt(6), SamplingParams(max_tokens=30), priority=5)
    eng.add_request("l2", prompt(6, 9), SamplingParams(max_tokens=30), priority=5)
    for _ in range(5):
        streams.feed(eng.step())
    h = eng.add_request("h", prompt(6, 20), SamplingParams(max_tokens=5), priority=0)
    for _ in range(2):
        streams.feed(eng.step())
    assert eng.scheduler.num_preemptions == 1
    assert {r.request_id for r in eng.scheduler.running} == {"l1", "h"}
    assert h.num_output_tokens >= 1
    drain(eng, streams)
    assert list(streams.finish)[0] == "h"
    assert streams.tokens == {"l1": expected("l1", 30), "l2": expected("l2", 30), "h": expected("h", 5)}
    assert_idle_and_clean(eng)


def test_request_larger_than_the_pool_ends_with_an_error_not_a_hang(drain):
    """A prompt that fits but whose output outgrows the whole cache finishes (LENGTH, with an error)."""
    eng = make(block_size=4, num_blocks=10, watermark=0.0)
    eng.add_request("big", prompt(8), SamplingParams(max_tokens=100))
    eng.add_request("ok", prompt(4), SamplingParams(max_tokens=3))
    streams = drain(eng)
    assert streams.tokens["ok"] == expected("ok", 3)
    assert streams.finish["big"] is FinishReason.LENGTH
    assert "KV cache" in streams.errors["big"]
    assert streams.tokens["big"] == expected("big", len(streams.tokens["big"]))
    assert_idle_and_clean(eng)


def test_abort_frees_blocks_of_running_and_waiting_requests(drain):
    """abort_request ends a request wherever it is and returns its blocks; unknown ids give None."""
    eng = make(block_size=4, num_blocks=50, max_num_seqs=1)
    eng.add_request("run", prompt(10), SamplingParams(max_tokens=50))
    eng.add_request("wait", prompt(10), SamplingParams(max_tokens=50))
    eng.add_request("other", prompt(3), SamplingParams(max_tokens=2))
    eng.step()
    assert eng.blocks.num_owned("run") == 3 and eng.blocks.num_owned("wait") == 0
    out = eng.abort_request("run")
    assert out.finished and out.finish_reason is FinishReason.ABORT and out.first_index == 1
    assert eng.abort_request("wait").finish_reason is FinishReason.ABORT
    assert eng.abort_request("run") is None and eng.abort_request("never") is None
    eng.check_integrity()
    assert eng.blocks.num_used == 0
    streams = drain(eng)
    assert streams.tokens == {"other": expected("other", 2)}
    assert_idle_and_clean(eng)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_keeps_integrity_and_exact_outputs(seed, make_streams):
    """Random arrivals, lengths and priorities in a tight pool with a small token budget: the integrity
    check holds after every step, every request gets exactly its tokens, and all blocks come back."""
    rng = random.Random(seed)
    eng = make(block_size=4, num_blocks=40, watermark=0.05, max_num_seqs=6, max_num_batched_tokens=48)
    streams = make_streams()
    want: dict[str, int] = {}
    pending = [(rng.randrange(60), f"q{i}", rng.randint(1, 60), rng.randint(1, 40), rng.randint(0, 2))
               for i in range(40)]
    pending.sort()
    step = 0
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, plen, mt, prio = pending.pop(0)
            eng.add_request(rid, prompt(plen, rng.randrange(VOCAB)), SamplingParams(max_tokens=mt), priority=prio)
            want[rid] = mt
        streams.feed(eng.step())
        step += 1
        assert step < 5000
    assert eng.scheduler.num_preemptions > 0
    assert streams.tokens == {rid: expected(rid, n) for rid, n in want.items()}
    assert_idle_and_clean(eng)


def test_stop_token_ends_a_request(drain):
    """A sampled stop token finishes the request (STOP) with that token as its last output."""
    eng = make(block_size=16, num_blocks=50)
    stop = sim_token("s", 5, VOCAB)
    eng.add_request("s", prompt(4), SamplingParams(max_tokens=50, stop_token_ids=(stop,)))
    streams = drain(eng)
    assert streams.tokens["s"] == expected("s", 6)
    assert streams.finish["s"] is FinishReason.STOP
    assert_idle_and_clean(eng)


def test_stats_snapshot_describes_the_load():
    """stats() is the policy's view: block counts, queue lengths, head-of-line need, per-request usage."""
    eng = make(block_size=4, num_blocks=40, max_num_seqs=1)
    eng.add_request("run", prompt(10), SamplingParams(max_tokens=5), priority=1)
    eng.add_request("wait", prompt(13), SamplingParams(max_tokens=5), priority=2)
    eng.step()
    st = eng.stats(per_request=True)
    assert (st.num_blocks, st.block_size, st.num_running, st.num_waiting) == (40, 4, 1, 1)
    assert st.num_free_blocks == 40 - 3 and st.head_of_line_blocks == 4
    loads = {r.request_id: r for r in st.requests}
    assert (loads["run"].status, loads["run"].num_tokens, loads["run"].num_blocks, loads["run"].priority) == \
        ("running", 11, 3, 1)
    assert (loads["wait"].status, loads["wait"].num_blocks) == ("waiting", 0)


def test_a_long_prompt_waits_until_all_of_it_fits_instead_of_thrashing(drain):
    # 20 blocks of 16 tokens: a decoding request holds 10 of them; a 200-token prompt (13 blocks)
    # could start its first 64-token chunk (4 blocks) but not finish: it must wait, not be admitted
    # and preempted over and over.
    engine = make(num_blocks=20, max_num_batched_tokens=64)
    engine.add_request("holder", prompt(150), SamplingParams(max_tokens=60, ignore_eos=True))
    engine.step()
    engine.add_request("long", prompt(200, start=3), SamplingParams(max_tokens=4, ignore_eos=True))
    drain(engine)
    assert engine.requests == {}
    assert engine.scheduler.num_preemptions <= 1
    assert_idle_and_clean(engine)
