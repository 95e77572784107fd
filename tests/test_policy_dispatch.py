"""Dispatch policies over load snapshots: pure functions, no I/O."""

import math

import pytest

from policy import DispatchState, InstanceLoad, dispatch, freeness, virtual_usage


def inst(iid: str, free: int, running: int, total: int = 100, **kw) -> InstanceLoad:
    return InstanceLoad(iid, total_blocks=total, free_blocks=free, num_running=running, num_waiting=0, **kw)


def test_freeness_formula_and_head_of_line_demand():
    a = inst("a", free=60, running=4)
    assert freeness(a) == (100 - 40) / 4
    blocked = InstanceLoad("b", 100, free_blocks=60, num_running=4, num_waiting=3, head_of_line_blocks=50)
    assert virtual_usage(blocked) == 90
    assert freeness(blocked) == pytest.approx(10 / 4)
    assert freeness(inst("idle", free=100, running=0)) == 100  # batch size is at least 1


def test_draining_or_dead_instance_is_infinitely_loaded():
    assert freeness(inst("d", 100, 0, draining=True)) == -math.inf
    assert freeness(inst("x", 100, 0, alive=False)) == -math.inf


def test_load_dispatch_picks_the_freest_and_spreads_a_burst():
    insts = [inst("a", free=90, running=1), inst("b", free=50, running=1)]
    state = DispatchState()
    first = [dispatch("load", insts, state, demand_blocks=20) for _ in range(4)]
    assert first[0] == "a"
    assert "b" in first  # counting dispatches since the last report moves later ones away
    state.on_report("a")
    assert state.since_report.get("a") is None


def test_rr_cycles_over_eligible_instances_only():
    insts = [inst("a", 10, 1), inst("b", 10, 1, draining=True), inst("c", 10, 1)]
    state = DispatchState()
    assert [dispatch("rr", insts, state) for _ in range(4)] == ["a", "c", "a", "c"]


def test_no_instance_or_unknown_policy():
    assert dispatch("load", [inst("a", 10, 1, alive=False)], DispatchState()) is None
    full = InstanceLoad("f", 100, 100, num_running=8, num_waiting=0, max_running=8)
    assert dispatch("load", [full], DispatchState()) is None
    with pytest.raises(ValueError, match="unknown policy"):
        dispatch("nope", [inst("a", 10, 1)], DispatchState())


def test_ties_go_to_lowest_id():
    insts = [inst("b", 50, 1), inst("a", 50, 1)]
    assert dispatch("load", insts, DispatchState()) == "a"
