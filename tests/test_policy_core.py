"""The policy's priority load cap, load-balancing migration plan and scaling decisions (pure)."""

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

# Instances of 100 blocks here: a load cap of 70 blocks (1,120 tokens) keeps 30 blocks of headroom.
KV = named_policy("kvferry", priority_load_cap_tokens=70 * 16)
NOPRI = named_policy("kvferry-nopri", priority_load_cap_tokens=70 * 16)


def inst(iid: str, total: int, used: int, reqs: list[tuple[int, int]] = (), waiting: int = 0, hol: int = 0,
         draining: bool = False) -> InstanceLoad:
    """reqs: (priority, blocks) of running requests."""
    rs = tuple(RequestLoad(f"{iid}-r{k}", p, b, b * 16) for k, (p, b) in enumerate(reqs))
    return InstanceLoad(iid, total, total - used, num_running=len(rs), num_waiting=waiting, head_of_line_blocks=hol,
                        requests=rs, draining=draining)


def test_high_priority_headroom_makes_its_instance_look_loaded():
    a = inst("a", 100, 20, [(0, 10), (-1, 10)])
    assert virtual_usage(a, cfg=KV) == 20 + 30  # physical + all beyond the 70-block cap
    assert virtual_usage(a, cfg=NOPRI) == 20
    assert freeness(a, cfg=KV) == pytest.approx((100 - 50) / 2)
    # a high-priority request sees a's memory whole: it is kept for such requests
    assert freeness(a, cfg=KV, high=True) == pytest.approx((100 - 20) / 2)
    # and an instance without high-priority work as if it were capped
    b = inst("b", 100, 20, [(0, 20)])
    assert freeness(b, cfg=KV) == pytest.approx(80) and freeness(b, cfg=KV, high=True) == pytest.approx(50)
    assert freeness(b, cfg=NOPRI, high=True) == pytest.approx(80)
    # the cap is in tokens: with 32-token blocks, 1,120 tokens are 35 blocks
    wide = InstanceLoad("w", 100, 80, num_running=1, num_waiting=0, requests=(RequestLoad("h", -1, 20, 640),), block_size=32)
    assert virtual_usage(wide, cfg=KV) == 20 + 65
    assert virtual_usage(inst("d", 100, 0, draining=True), cfg=KV) == math.inf


def test_high_priority_requests_gather_where_the_cap_keeps_room_and_normal_ones_avoid_the_cap():
    busy_normal = inst("a", 100, 60, [(0, 30), (0, 30)])  # much normal load, no high-priority request
    has_high = inst("b", 100, 40, [(-1, 40)])
    insts = [busy_normal, has_high]
    # normal request: F_a = (100-60)/2 = 20; b counts its 30 blocks of headroom: F_b = (100-70)/1 = 30
    assert dispatch(KV, insts, DispatchState(), 1, priority=0) == "b"
    # a second high-priority request joins b (F = 60), kept light for them; a capped reads (70-60)/2 = 5
    assert dispatch(KV, insts, DispatchState(), 1, priority=-1) == "b"
    # once b is crowded with high-priority work, the next one opens the least loaded other instance
    full_high = inst("b", 100, 95, [(-1, 45), (-1, 50)])
    light = inst("c", 100, 10, [(0, 10)])
    assert dispatch(KV, [busy_normal, full_high, light], DispatchState(), 1, priority=-1) == "c"
    # without headroom, by overall load: b (F=60) over a (F=20)
    assert dispatch(NOPRI, insts, DispatchState(), 1, priority=-1) == "b"


def test_the_cap_migrates_normal_requests_off_not_the_high_priority_ones():
    capped = inst("p", 100, 90, [(-1, 20), (0, 40), (0, 30)])  # normal view: (100 - 90 - 30) / 3 < 0
    cold = inst("cold", 100, 0)
    plans = plan_migrations([capped, cold], cfg=KV)
    assert [(p.src, p.request_id) for p in plans] == [("p", "p-r2")]  # a normal one, the shortest
    only_high = inst("p", 100, 80, [(-1, 40), (-1, 40)])  # over the cap with high-priority work alone
    assert plan_migrations([only_high, cold], cfg=KV) == []
    jammed = inst("p", 100, 99, [(-1, 50), (-1, 49)])  # plain F = 0.5: overloaded whatever the cap
    assert [p.src for p in plan_migrations([jammed, cold], cfg=KV)] == ["p"]


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
    # pooled, as the paper's artifact: (200 - 185 blocks) over 3 running requests
    assert average_freeness(loaded, cfg) == pytest.approx(5.0)
    up = scaling_decision(loaded, cfg, now_s=100)
    assert up is not None and up.kind == "up"
    assert scaling_decision(loaded, cfg, now_s=100, last_action_s=98) is None  # too soon
    assert scaling_decision(loaded, cfg, now_s=100, starting=1) is None  # one is already starting
    idle = [inst("a", 100, 5, [(0, 5)]), inst("b", 100, 0), inst("c", 100, 10, [(0, 5), (0, 5)])]
    down = scaling_decision(idle, cfg, now_s=100)  # F 95, and (200 - 15) / 3 = 61.7 without b
    assert down is not None and down.kind == "down" and down.instance_id == "b"
    # free enough now (F 90), but not once b's memory is gone ((200 - 30) / 3 = 56.7): kept
    fuller = [inst("a", 100, 10, [(0, 10)]), inst("b", 100, 0), inst("c", 100, 20, [(0, 10), (0, 10)])]
    assert average_freeness(fuller, cfg) == pytest.approx(90.0)
    assert scaling_decision(fuller, cfg, now_s=100) is None
    assert scaling_decision(idle[:1], cfg, now_s=100) is None  # at min_instances
    draining = [*idle[:2], inst("c", 100, 20, [(0, 20)], draining=True)]
    assert scaling_decision(draining, cfg, now_s=100) is None  # one drain at a time


def test_an_instance_that_just_joined_is_not_drained_for_being_empty():
    # Two instances and b, started for them, serving for 1 s and still empty: the cluster reads over
    # scale_down_above, but the decision waits until b has served for a whole interval.
    cfg = KV.replace(min_instances=1, max_instances=3, scale_up_below=10, scale_down_above=60, scale_interval_s=5)
    joined = [inst("a", 100, 20, [(0, 20)]), inst("b", 100, 0), inst("c", 100, 20, [(0, 20)])]  # F 130; 80 without b
    assert average_freeness(joined, cfg) > 60
    assert scaling_decision(joined, cfg, now_s=100, last_action_s=80, last_joined_s=99) is None
    later = scaling_decision(joined, cfg, now_s=103.9, last_action_s=80, last_joined_s=99)
    assert later is None
    down = scaling_decision(joined, cfg, now_s=104, last_action_s=80, last_joined_s=99)
    assert down is not None and down.kind == "down"  # still idle an interval later: drained then


def test_a_cluster_short_of_room_takes_back_an_instance_it_is_retiring_before_starting_one():
    cfg = KV.replace(min_instances=1, max_instances=3, scale_up_below=10, scale_down_above=60, scale_interval_s=5)
    busy = [inst("a", 100, 95, [(0, 45), (0, 50)]), inst("b", 100, 30, [(0, 30)], draining=True)]
    act = scaling_decision(busy, cfg, now_s=100, retiring={"b"})
    assert act is not None and (act.kind, act.instance_id) == ("cancel", "b")
    # drained by an operator, not by the scaler: not the scaler's to take back; a new one starts
    act = scaling_decision(busy, cfg, now_s=100)
    assert act is not None and act.kind == "up"


def test_the_cluster_freeness_counts_queued_requests_and_their_demand():
    cfg = KV.replace(min_instances=1, max_instances=3, scale_up_below=10, scale_down_above=60)
    # a: 40 blocks held by 2 requests, 3 queued needing 480 prompt tokens (30 blocks); b: idle
    a = InstanceLoad("a", 100, 60, num_running=2, num_waiting=3, head_of_line_blocks=12, queued_prefill_tokens=480)
    b = InstanceLoad("b", 100, 100, num_running=0, num_waiting=0)
    assert average_freeness([a, b], cfg) == pytest.approx((200 - 40 - 30) / 5)
    # a report without queued tokens counts the head of the line's demand
    a2 = InstanceLoad("a", 100, 60, num_running=2, num_waiting=3, head_of_line_blocks=12)
    assert average_freeness([a2, b], cfg) == pytest.approx((200 - 40 - 12) / 5)
