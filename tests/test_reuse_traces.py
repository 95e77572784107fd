"""Traces with KV reuse (workload/reuse.py) and their JSONL form; the simulator on them."""

from __future__ import annotations

import json

import pytest

from workload.reuse import answer_segment, generate_reuse, multi_turn, prompt_tokens, segment_tokens, system_prompt
from workload.traces import TraceError, TraceRequest, generate, load_jsonl, save_jsonl


def test_a_turn_s_prompt_extends_the_previous_turn_s_prompt_and_its_answer():
    trace = multi_turn(3, rate=1.0, turns=3, system_len=50, user_len=10, answer_len=20, think_s=5.0, seed=1)
    assert len(trace) == 9 and [r.arrival_s for r in trace] == sorted(r.arrival_s for r in trace)
    by_conv: dict[int, list[TraceRequest]] = {}
    for r in trace:
        by_conv.setdefault(r.segments[0][0], []).append(r)
    assert len(by_conv) == 3  # each conversation its own system segment
    for turns in by_conv.values():
        for prev, nxt in zip(turns, turns[1:]):
            assert nxt.segments[:len(prev.segments)] == prev.segments  # the whole history again
            key, n = nxt.segments[len(prev.segments)]  # then the answer, then a new message
            assert n == 20 and trace[answer_index(key)] is prev  # the answer is prev's output
            assert nxt.input_len == prev.input_len + 20 + 10
            assert nxt.arrival_s - prev.arrival_s >= 5.0  # a think time after the previous turn
        for r in turns:
            assert sum(n for _, n in r.segments) == r.input_len
    assert multi_turn(3, 1.0, seed=1) == multi_turn(3, 1.0, seed=1)  # deterministic


def answer_index(key: int) -> int:
    assert key < 0 and answer_segment(-key - 1) == key
    return -key - 1


def test_conversations_of_an_application_share_its_system_prompt_and_answers_resolve():
    trace = multi_turn(12, rate=2.0, turns=2, groups=2, system_len=40, user_len=8, answer_len=16, seed=4)
    assert {r.segments[0] for r in trace} == {(1, 40), (2, 40)}  # two applications' system prompts
    assert len({r.segments[1][0] for r in trace}) == 12  # each conversation's own first message
    # Answer segments resolve through the callback (a replay without answers makes them up).
    second = next(r for r in trace if len(r.segments) == 4)
    j = answer_index(second.segments[2][0])
    first = trace[j]
    got = prompt_tokens(second.segments, 1000, lambda i, n: [7] * n if i == j else [])
    assert got[:48] == prompt_tokens(first.segments, 1000) and got[48:64] == [7] * 16
    assert len(prompt_tokens(second.segments, 1000)) == second.input_len


def test_system_prompt_groups_share_a_prefix_and_nothing_else():
    trace = system_prompt(40, rate=5.0, groups=3, prefix_len=64, suffix_len=8, seed=2)
    assert {r.segments[0] for r in trace} <= {(1, 64), (2, 64), (3, 64)}
    assert len({r.segments[1][0] for r in trace}) == 40  # private suffixes
    a, b = trace[0], next(r for r in trace[1:] if r.segments[0] == trace[0].segments[0])
    ta, tb = prompt_tokens(a.segments, 32000), prompt_tokens(b.segments, 32000)
    assert ta[:64] == tb[:64] and ta[64:] != tb[64:]
    assert segment_tokens(5, 10, 100) == segment_tokens(5, 10, 100) != segment_tokens(6, 10, 100)
    assert all(1 <= t < 100 for t in segment_tokens(9, 500, 100))
    with pytest.raises(TraceError):
        generate_reuse("nope", 10, 1.0)


def test_segments_round_trip_through_jsonl_and_bad_ones_are_refused(tmp_path):
    f = tmp_path / "t.jsonl"
    for trace in (generate_reuse("multi-turn", 8, 2.0), generate_reuse("system-prompt", 8, 2.0)):
        save_jsonl(trace, f)
        assert load_jsonl(f) == trace
    save_jsonl(generate(2, 1.0), f)
    assert all("segments" not in json.loads(ln) for ln in f.read_text().splitlines())
    line = {"arrival_s": 0, "input_len": 10, "output_len": 4}
    for bad in ({"segments": [[1, 5]]},  # lengths do not add up to input_len (10)
                {"segments": [[1, 0], [2, 10]]}, {"segments": [[-1, 10]]}, {"segments": "x"},
                {"segments": [[1, 10, 3]]}):
        f.write_text(json.dumps({**line, **bad}) + "\n")
        with pytest.raises(TraceError, match="segment"):
            load_jsonl(f)
    # An answer segment names an earlier request and at most its output (4 tokens here).
    for bad, why in (([[1, 6], [-1, 4]], None), ([[1, 5], [-1, 5]], "at least 5"), ([[1, 6], [-3, 4]], "request 2")):
        f.write_text(json.dumps(line) + "\n" + json.dumps({**line, "segments": bad}) + "\n")
        if why is None:
            assert load_jsonl(f)[1].segments == ((1, 6), (-1, 4))
        else:
            with pytest.raises(TraceError, match=why):
                load_jsonl(f)


def test_the_simulator_reuses_prefixes_and_cache_aware_dispatch_finds_them():
    from policy import named_policy
    from simulator.cluster import simulate
    from simulator.config import SimConfig

    trace = generate_reuse("system-prompt", 60, 4.0, seed=3)
    got = {p: simulate(trace, named_policy(p), SimConfig(instances=3)).summary["prefix"]
           for p in ("rr", "prefix", "kvferry")}
    for p in got.values():
        assert 0 < p["hit_rate"] <= 1 and 0 < p["oracle_hit_rate"] <= 1
    assert got["rr"]["dispatch_hit_rate"] == 0  # rr never consults the index
    for p in ("prefix", "kvferry"):
        assert got[p]["hit_rate"] >= 0.9 * got[p]["oracle_hit_rate"]
        assert got[p]["hit_rate"] > got["rr"]["hit_rate"]
    # A trace without reuse: no index, no prefix section (the paper's results are unchanged).
    assert "prefix" not in simulate(generate(20, 2.0), named_policy("kvferry"), SimConfig(instances=2)).summary


def test_the_next_turn_reuses_the_previous_turn_s_answer_in_the_simulator():
    from policy import named_policy
    from simulator.cluster import simulate
    from simulator.config import SimConfig

    # Turn 1: 64 + 16 = 80 prompt tokens, 32 generated; turn 2: those 112 tokens + 16 new ones.
    trace = multi_turn(1, 1.0, turns=2, system_len=64, user_len=16, answer_len=32, think_s=30.0, seed=5)
    p = simulate(trace, named_policy("kvferry"), SimConfig(instances=1)).summary["prefix"]
    # Turn 2 finds 111 tokens computed (the last answer token never is): 6 full blocks, 96 tokens,
    # past the 80 of turn 1's prompt, because its answer is what the engine generated.
    assert p["hit_rate"] == pytest.approx(96 / (80 + 128))
