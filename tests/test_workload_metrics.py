"""Metrics on synthetic records against hand-computed values (vllm bench serve's definitions)."""

from __future__ import annotations

import pytest

from workload.metrics import SLO, FragmentationMeter, RequestRecord, instance_seconds, paper_row, stats, summarize


def rec(rid, arrival, tokens, priority=0, loss=0.0, preemptions=0):
    """A request whose tokens arrived at the given times."""
    r = RequestRecord(rid, arrival, 10, len(tokens), priority, preemption_loss_s=loss, preemptions=preemptions)
    r.first_token_s, r.last_token_s, r.finish_s = tokens[0], tokens[-1], tokens[-1]
    r.output_tokens = len(tokens)
    r.itl = [b - a for a, b in zip(tokens, tokens[1:])]
    return r


def test_per_request_definitions():
    r = rec("a", 1.0, [1.5, 1.6, 1.8, 2.1])
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)  # (e2e - ttft) / (tokens - 1)
    assert rec("b", 0.0, [0.2]).tpot is None  # one token: no TPOT


def test_stats_percentiles_interpolate_like_numpy():
    s = stats([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s == {"mean": 4.0, "median": 3.0, "p90": pytest.approx(7.6), "p99": pytest.approx(9.76)}
    assert stats([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_summary_hand_computed():
    recs = [rec("a", 0.0, [1.0, 2.0, 3.0]),              # ttft 1, e2e 3, tpot 1, itl 1, 1
            rec("b", 1.0, [1.5, 1.7], loss=0.4, preemptions=1),  # ttft 0.5, e2e 0.7, tpot 0.2, itl 0.2
            rec("c", 2.0, [5.0])]                         # ttft 3, e2e 3, no tpot
    s = summarize(recs)
    assert s["completed"] == 3 and s["failed"] == 0
    assert s["duration_s"] == pytest.approx(5.0)  # first arrival 0 .. last finish 5
    assert s["request_throughput"] == pytest.approx(3 / 5)
    assert s["output_throughput"] == pytest.approx(6 / 5)
    assert s["total_token_throughput"] == pytest.approx(36 / 5)
    assert s["ttft"]["mean"] == pytest.approx(1.5) and s["ttft"]["median"] == pytest.approx(1.0)
    assert s["tpot"]["mean"] == pytest.approx(0.6)
    assert s["itl"]["mean"] == pytest.approx(2.2 / 3)
    assert s["e2e"]["mean"] == pytest.approx(6.7 / 3)
    assert s["preemptions"] == 1 and s["preemption_loss"] == {"mean": pytest.approx(0.4 / 3), "total": pytest.approx(0.4)}
    assert "classes" not in s and "goodput" not in s
    row = paper_row(s)
    assert row["ttft_mean"] == s["ttft"]["mean"] and row["decode_p99"] == s["tpot"]["p99"]


def test_goodput_counts_requests_meeting_every_slo():
    recs = [rec("a", 0.0, [1.0, 2.0, 3.0]), rec("b", 1.0, [1.5, 1.7]), rec("c", 2.0, [5.0])]
    s = summarize(recs, duration_s=10.0, slo=SLO(ttft_s=1.0, tpot_s=0.5))
    assert s["goodput"] == pytest.approx(0.1)  # only b: a's TPOT is 1 s, c's TTFT is 3 s
    assert s["slo"] == {"ttft_s": 1.0, "tpot_s": 0.5}
    assert SLO.parse(["ttft:500", "e2el:2000"]) == SLO(ttft_s=0.5, e2e_s=2.0)
    for bad in (["ttft"], ["ttft:-1"], ["itl:5"], ["tpot:x"]):
        with pytest.raises(ValueError):
            SLO.parse(bad)


def test_failed_requests_and_priority_classes():
    bad = RequestRecord("x", 0.0, 5, 5, error="boom")
    recs = [rec("h", 0.0, [0.1, 0.2], priority=-1), rec("n", 0.0, [1.0, 3.0]), bad]
    s = summarize(recs)
    assert s["requests"] == 3 and s["completed"] == 2 and s["failed"] == 1
    assert s["classes"]["high"]["ttft"]["mean"] == pytest.approx(0.1)
    assert s["classes"]["normal"]["ttft"]["mean"] == pytest.approx(1.0)
    assert s["classes"]["normal"]["failed"] == 1
    assert s["classes"]["high"]["duration_s"] == s["duration_s"]


def test_fragmentation_and_instance_seconds():
    f = FragmentationMeter()
    f.sample(50, 100, blocked=True)
    f.sample(10, 100, blocked=True)
    f.sample(90, 100, blocked=False)
    f.sample(80, 100, blocked=False)
    assert f.result() == {"free_share_while_blocked": pytest.approx(0.3), "blocked_time_share": 0.5}
    assert FragmentationMeter().result() == {"free_share_while_blocked": 0.0, "blocked_time_share": 0.0}
    assert instance_seconds([(0.0, 10.0), (5.0, 7.5), (3.0, 3.0)]) == pytest.approx(12.5)
