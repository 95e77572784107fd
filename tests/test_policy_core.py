"""The policy's priority headroom, load-balancing migration plan and scaling decisions (pure)."""

from __future__ import annotations

import math

import pytest

from policy import (
    DispatchState,
    InstanceLoad,
    RequestLoad,
    average_freeness,
    dispatch,
    freeness,
    named_policy,
    plan_migrations,
    scaling_decision,
    virtual_usage,
)

KV = named_policy("kvferry")
NOPRI = named_policy("kvferry-nopri")


def inst(iid: str, total: int, used: int, reqs: list[tuple[int, int]] = (), waiting: int = 0, hol: int = 0,
         draining: bool = False) -> InstanceLoad:
    """reqs: (priority, blocks) of running requests."""
    rs = tuple(RequestLoad(f"{iid}-r{k}", p, b, b * 16) for k, (p, b) in enumerate(reqs))
    return InstanceLoad(iid, total, total - used, num_running=len(rs), num_waiting=waiting, head_of_line_blocks=hol,
                        requests=rs, draining=draining)


def test_high_priority_headroom_makes_its_instance_look_loaded():
    a = inst("a", 100, 20, [(0, 10), (-1, 10)])
    assert virtual_usage(a, cfg=KV) == 20 + 30  # physical + 30 % of 100 blocks
    assert virtual_usage(a, cfg=NOPRI) == 20
    assert freeness(a, cfg=KV) == pytest.approx((100 - 50) / 2)
    # judged by high-priority load only: one high request of 10 blocks + the headroom
    assert freeness(a, cfg=KV, high=True) == pytest.approx((100 - 40) / 1)
    assert virtual_usage(inst("d", 100, 0, draining=True), cfg=KV) == math.inf


def test_high_priority_dispatch_ignores_normal_load_and_normal_avoids_headroom():
    busy_normal = inst("a", 100, 60, [(0, 30), (0, 30)])  # much normal load, no high-priority request
    has_high = inst("b", 100, 40, [(-1, 40)])
    insts = [busy_normal, has_high]
    # normal request: F_a = (100-60)/2 = 20; b counts its 30 blocks of headroom: F_b = (100-70)/1 = 30
    assert dispatch(KV, insts, DispatchState(), 1, priority=0) == "b"
    # a second high-priority request goes where high-priority load is lowest: a (none there)
    assert dispatch(KV, insts, DispatchState(), 1, priority=-1) == "a"
    # without headroom, by overall load: b (F=60) over a (F=20)
    assert dispatch(NOPRI, insts, DispatchState(), 1, priority=-1) == "b"


def test_load_balancing_moves_lowest_priority_shortest_from_the_most_loaded_to_the_freest():
    hot = inst("hot", 100, 98, [(0, 40), (0, 30), (1, 28)])  # F = 2/3 < 3
    warm = inst("warm", 100, 50, [(0, 50)])  # F = 50
    cold = inst("cold", 100, 0)  # F = 100
    plans = plan_migrations([hot, warm, cold], cfg=KV)
    assert [(p.src, p.dst, p.request_id, p.reason) for p in plans] == [("hot", "cold", "hot-r2", "load")]
    # a policy without migration only drains
    assert plan_migrations([hot, warm, cold], cfg=named_policy("load")) == []
    # a blocked queue makes a source even with fair freeness
    queued = inst("q", 100, 40, [(0, 20), (0, 20)], waiting=1, hol=70)  # 70 > 60 free: blocked
    assert [p.src for p in plan_migrations([queued, cold], cfg=KV)] == ["q"]
    fits = inst("f", 100, 40, [(0, 20), (0, 20)], waiting=1, hol=10)  # just arrived, fits: not a source
    assert plan_migrations([fits, cold], cfg=KV) == []
    # no destination above the threshold: nothing moves
    assert plan_migrations([hot, inst("meh", 100, 80, [(0, 80)])], cfg=KV) == []


def test_scaling_keeps_average_freeness_between_thresholds():
    cfg = KV.replace(min_instances=1, max_instances=3, scale_up_below=10, scale_down_above=60, scale_interval_s=5)
    loaded = [inst("a", 100, 95, [(0, 45), (0, 50)]), inst("b", 100, 90, [(0, 90)])]
    assert average_freeness(loaded, cfg) == pytest.approx((2.5 + 10) / 2)
    up = scaling_decision(loaded, cfg, now_s=100)
    assert up is not None and up.kind == "up"
    assert scaling_decision(loaded, cfg, now_s=100, last_action_s=98) is None  # too soon
    assert scaling_decision(loaded, cfg, now_s=100, starting=1) is None  # one is already starting
    idle = [inst("a", 100, 10, [(0, 10)]), inst("b", 100, 0), inst("c", 100, 20, [(0, 10), (0, 10)])]
    down = scaling_decision(idle, cfg, now_s=100)
    assert down is not None and down.kind == "down" and down.instance_id == "b"
    assert scaling_decision(idle[:1], cfg, now_s=100) is None  # at min_instances
    draining = [*idle[:2], inst("c", 100, 20, [(0, 20)], draining=True)]
    assert scaling_decision(draining, cfg, now_s=100) is None  # one drain at a time


def test_an_instance_that_just_joined_is_not_drained_for_being_empty():
    # Two busy instances and b, started for them, serving for 1 s: its F = M lifts the average
    # over scale_down_above, but the decision waits until b has served for a whole interval.
    cfg = KV.replace(min_instances=1, max_instances=3, scale_up_below=10, scale_down_above=60, scale_interval_s=5)
    joined = [inst("a", 100, 55, [(0, 55)]), inst("b", 100, 0), inst("c", 100, 55, [(0, 55)])]  # F 45, 100, 45
    assert average_freeness(joined, cfg) > 60
    assert scaling_decision(joined, cfg, now_s=100, last_action_s=80, last_joined_s=99) is None
    later = scaling_decision(joined, cfg, now_s=103.9, last_action_s=80, last_joined_s=99)
    assert later is None
    down = scaling_decision(joined, cfg, now_s=104, last_action_s=80, last_joined_s=99)
    assert down is not None and down.kind == "down"  # still idle an interval later: drained then
