"""The sim engine: same scheduler and block accounting as the real one, no model. Its tokens depend only on
(request id, output index), its step time comes from the latency model, and one process can run dozens."""

from __future__ import annotations

import pytest

import engine.sim.executor as sim_executor
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.sim.executor import SimExecutor, sim_token
from engine.sim.latency import LLAMA7B_A10, PROFILES, SMOLLM2_CPU

VOCAB = LLAMA7B_A10.vocab_size


def sim(clock: str = "virtual", **cfg) -> LLMEngine:
    return LLMEngine.sim(LLAMA7B_A10, EngineConfig(**{"debug_checks": True, **cfg}), clock=clock)


def test_sim_token_is_a_pure_function_in_range():
    toks = [sim_token("req-1", i, VOCAB) for i in range(200)]
    assert toks == [sim_token("req-1", i, VOCAB) for i in range(200)]
    assert all(0 <= t < VOCAB for t in toks)
    assert len(set(toks)) > 150  # varied, not a constant
    assert toks != [sim_token("req-2", i, VOCAB) for i in range(200)]


def test_tokens_do_not_depend_on_batch_composition(drain):
    """The same request alone, in a crowd, chunked, or preempted emits the same tokens."""
    def run(eng: LLMEngine, neighbours: int) -> list[int]:
        eng.add_request("x", list(range(1, 41)), SamplingParams(max_tokens=30))
        for i in range(neighbours):
            eng.add_request(f"n{i}", list(range(1, 5 + 3 * i)), SamplingParams(max_tokens=10 + i))
        return drain(eng).tokens["x"]

    alone = run(sim(), 0)
    assert alone == [sim_token("x", i, VOCAB) for i in range(30)]
    assert run(sim(max_num_seqs=3), 8) == alone
    assert run(sim(max_num_batched_tokens=16), 4) == alone
    tight = sim(block_size=4, num_blocks=24, watermark=0.0)
    assert run(tight, 3) == alone
    assert tight.scheduler.num_preemptions > 0


def test_virtual_clock_reports_the_latency_model_without_sleeping(monkeypatch):
    """In virtual mode each step's time is latency.step_seconds(batch, prefill tokens, context tokens)
    and nothing sleeps; in real mode the executor sleeps exactly that long."""
    slept: list[float] = []
    monkeypatch.setattr(sim_executor.time, "sleep", slept.append)
    eng = sim()
    eng.add_request("a", list(range(100)), SamplingParams(max_tokens=5))
    eng.step()  # prefill of 100 tokens
    assert eng.executor.last_step_seconds == pytest.approx(LLAMA7B_A10.step_seconds(1, 100, 100, 100 * 50))
    # a 100-token prefill: 100 x 50 query-key pairs of causal attention (13 ns each)
    assert eng.executor.last_step_seconds == pytest.approx((27.0 + 0.3 + 100 * 0.22 + 100 * 0.003 + 5000 * 13e-6) / 1000)
    eng.add_request("b", list(range(200, 230)), SamplingParams(max_tokens=5))  # no prefix in common with a
    eng.step()  # a decodes (context 101), b prefills 30
    assert eng.executor.last_step_seconds == pytest.approx(LLAMA7B_A10.step_seconds(2, 30, 101 + 30, 30 * 15))
    eng.step()  # two decodes: contexts 102 and 31
    assert eng.executor.last_step_seconds == pytest.approx(LLAMA7B_A10.step_seconds(2, 0, 102 + 31))
    assert slept == []

    real = LLMEngine.sim(SMOLLM2_CPU, EngineConfig(), clock="real")
    real.add_request("a", list(range(10)), SamplingParams(max_tokens=2))
    real.step()
    assert slept == [pytest.approx(SMOLLM2_CPU.step_seconds(1, 10, 10))]
    assert real.executor.last_step_seconds == slept[0]


def test_latency_profiles_and_bad_clock():
    assert PROFILES["llama7b-a10"] is LLAMA7B_A10 and PROFILES["smollm2-cpu"] is SMOLLM2_CPU
    assert LLAMA7B_A10.to_dict()["kv_capacity_tokens"] == 12672
    eng = LLMEngine.sim(LLAMA7B_A10, EngineConfig(block_size=16), clock="virtual")
    assert eng.stats().num_blocks == 12672 // 16  # pool sized from the profile's KV capacity
    with pytest.raises(ValueError, match="clock"):
        SimExecutor(LLAMA7B_A10, 16, clock="wall")


def test_sim_request_migrates_with_the_same_tokens(drain, make_streams):
    """The migration API works on sim engines (blocks carry no data): the stream continues unchanged."""
    a, b = sim(block_size=8, num_blocks=64), sim(block_size=8, num_blocks=64)
    streams = make_streams()
    b.add_request("b-own", list(range(50)), SamplingParams(max_tokens=40))
    streams.feed(b.step())
    a.add_request("m", list(range(20)), SamplingParams(max_tokens=25))
    for _ in range(6):
        streams.feed(a.step())
    state = a.detach_request("m")
    table = a.block_table("m")
    dst = b.reserve("k", len(table))
    assert dst != table
    b.write_blocks(dst, a.read_blocks(table))
    b.commit_request(state, "k")
    a.release("m")
    drain(a, streams)
    drain(b, streams)
    assert streams.tokens["m"] == [sim_token("m", i, VOCAB) for i in range(25)]
    assert a.blocks.num_used == 0 and b.blocks.num_used == 0


def test_one_process_steps_64_sim_engines(make_streams):
    """64 sim instances, 4 requests each, stepped round-robin by one thread: all complete exactly."""
    engines = [LLMEngine.sim(LLAMA7B_A10, EngineConfig(block_size=16, num_blocks=64), clock="virtual")
               for _ in range(64)]
    streams = make_streams()
    want = {}
    for e, eng in enumerate(engines):
        for r in range(4):
            rid = f"e{e}-r{r}"
            eng.add_request(rid, list(range(1, 10 + 7 * r)), SamplingParams(max_tokens=8 + r))
            want[rid] = [sim_token(rid, i, VOCAB) for i in range(8 + r)]
    virtual_time = [0.0] * len(engines)
    for _ in range(100):
        busy = [i for i, eng in enumerate(engines) if eng.has_unfinished_requests()]
        if not busy:
            break
        for i in busy:
            streams.feed(engines[i].step())
            virtual_time[i] += engines[i].executor.last_step_seconds
    assert streams.tokens == want
    for eng in engines:
        eng.check_integrity()
        assert eng.blocks.num_used == 0
    assert all(t > 0 for t in virtual_time)
    assert len(set(virtual_time)) == 1  # identical workloads take identical virtual time
