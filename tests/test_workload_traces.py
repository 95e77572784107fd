"""Trace generation (arrival processes, length distributions, priorities) and JSONL files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workload import traces
from workload.traces import LENGTH_CAP, LengthDist, TraceError, TraceRequest


def gaps(trace: list[TraceRequest]) -> np.ndarray:
    return np.diff([r.arrival_s for r in trace])


@pytest.mark.parametrize("cv", [1.0, 2.0, 4.0])
def test_arrivals_have_the_rate_and_cv(cv):
    t = traces.generate(20000, rate=10.0, cv=cv, trace="fixed:8-fixed:8", seed=3)
    g = gaps(t)
    assert t[0].arrival_s == 0.0 and (g >= 0).all()
    assert g.mean() == pytest.approx(0.1, rel=0.05 * cv)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.1)


@pytest.mark.parametrize("mean", [128, 256, 512])
def test_zipf_lengths_have_the_mean_a_cap_and_a_heavy_tail(mean):
    rng = np.random.default_rng(1)
    x = np.array(LengthDist("zipf", mean, LENGTH_CAP).sample(50000, rng))
    assert x.mean() == pytest.approx(mean, rel=0.08)
    assert x.min() >= 1 and x.max() <= LENGTH_CAP
    assert np.median(x) < mean / 2  # power law: most requests short, a long tail
    assert np.percentile(x, 99.9) > 8 * mean


def test_named_pairs_fixed_and_uniform_lengths():
    for name in traces.NAMED_TRACES:
        i, o = name.split("-")
        t = traces.generate(20000, 5.0, trace=name, seed=0)
        assert np.mean([r.input_len for r in t]) == pytest.approx(int(i), rel=0.1)
        assert np.mean([r.output_len for r in t]) == pytest.approx(int(o), rel=0.1)
    t = traces.generate(500, 5.0, trace="fixed:100-uniform:10:20", seed=0)
    assert {r.input_len for r in t} == {100}
    assert {r.output_len for r in t} == set(range(10, 21))
    assert traces.parse_length("300") == LengthDist("zipf", 300, LENGTH_CAP)
    assert traces.parse_length("zipf:64:1000").name == "zipf:64:1000"


def test_high_priority_fraction():
    t = traces.generate(10000, 5.0, high_priority_fraction=0.1, seed=0)
    share = sum(r.priority == traces.HIGH_PRIORITY for r in t) / len(t)
    assert share == pytest.approx(0.1, abs=0.01)
    assert {r.priority for r in t} == {0, traces.HIGH_PRIORITY}


def test_deterministic_and_common_requests_across_rates():
    a = traces.generate(300, 5.0, 2.0, "256-512", 0.1, seed=7)
    assert a == traces.generate(300, 5.0, 2.0, "256-512", 0.1, seed=7)
    assert a != traces.generate(300, 5.0, 2.0, "256-512", 0.1, seed=8)
    b = traces.generate(300, 9.0, 4.0, "256-512", 0.1, seed=7)  # other rate/CV: the same requests
    assert [(r.input_len, r.output_len, r.priority) for r in a] == [(r.input_len, r.output_len, r.priority) for r in b]


@pytest.mark.parametrize("bad", ["256", "a-b", "fixed:0-8", "uniform:9:3-8", "zipf-8", "gauss:3-8", "1-2-3"])
def test_bad_trace_names(bad):
    with pytest.raises(TraceError):
        traces.parse_trace_name(bad)


def test_bad_generator_arguments():
    for kw in (dict(rate=0), dict(rate=float("nan")), dict(cv=0), dict(high_priority_fraction=1.5)):
        with pytest.raises(TraceError):
            traces.generate(10, **{"rate": 1.0, **kw})


def test_jsonl_round_trip(tmp_path):
    t = traces.generate(50, 3.0, 4.0, "128-512", 0.2, seed=1)
    path = tmp_path / "t.jsonl"
    traces.save_jsonl(t, path)
    assert traces.load_jsonl(path) == t
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"arrival_s", "input_len", "output_len", "priority"}


def test_jsonl_priority_is_optional_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "input_len": 5, "output_len": 2}\n\n{"arrival_s": 1.5, "input_len": 1, '
                    '"output_len": 1, "priority": -1}\n')
    assert traces.load_jsonl(path) == [TraceRequest(0.0, 5, 2, 0), TraceRequest(1.5, 1, 1, -1)]


@pytest.mark.parametrize("line, msg", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"arrival_s": 0, "input_len": 5}', "missing 'output_len'"),
    ('{"arrival_s": 0, "input_len": 5, "output_len": 2, "prio": 1}', "unknown key"),
    ('{"arrival_s": -1, "input_len": 5, "output_len": 2}', "arrival_s"),
    ('{"arrival_s": "0", "input_len": 5, "output_len": 2}', "arrival_s"),
    ('{"arrival_s": 0, "input_len": 0, "output_len": 2}', "input_len"),
    ('{"arrival_s": 0, "input_len": 2.5, "output_len": 2}', "input_len"),
    ('{"arrival_s": 0, "input_len": 5, "output_len": true}', "output_len"),
    ('{"arrival_s": 0, "input_len": 5, "output_len": 2, "priority": "high"}', "priority"),
])
def test_jsonl_bad_lines_name_the_line(tmp_path, line, msg):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "input_len": 5, "output_len": 2}\n' + line + "\n")
    with pytest.raises(TraceError, match=msg) as e:
        traces.load_jsonl(path)
    assert f"{path}:2" in str(e.value)


def test_jsonl_unsorted_empty_and_missing_files(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 2, "input_len": 5, "output_len": 2}\n{"arrival_s": 1, "input_len": 5, "output_len": 2}\n')
    with pytest.raises(TraceError, match="before the previous"):
        traces.load_jsonl(path)
    path.write_text("\n")
    with pytest.raises(TraceError, match="no request"):
        traces.load_jsonl(path)
    with pytest.raises(TraceError, match="cannot read"):
        traces.load_jsonl(tmp_path / "missing.jsonl")
