"""Prefill/decode disaggregation: the pure policy (policy.pd) and the simulator running it.

Roles decide where new requests go and where prefilled ones decode; PD off ignores them; a
hand-off goes to the freest decode instance with room, then to a mixed one, else nowhere (the
request decodes where it is). Adaptive roles change one instance per interval, with hysteresis.
In the simulator, every request of a fixed P:D cluster is prefilled on a prefill instance and
decoded on a decode one, nothing is lost, every block comes back, and prefill stalls leave the
decode streams (P99 ITL far below colocated's on a prefill-heavy trace)."""

from __future__ import annotations

import pytest

from policy import DispatchState, InstanceLoad, dispatch, named_policy, plan_migrations
from policy.pd import RoleState, dispatch_candidates, handoff_target, role_changes

FIXED = named_policy("kvferry", pd_mode="fixed")
ADAPTIVE = named_policy("kvferry", pd_mode="adaptive", pd_role_interval_s=1.0)


def inst(iid: str, role: str, free: int = 500, running: int = 2, queued: int = 0, **kw) -> InstanceLoad:
    return InstanceLoad(iid, 1000, free, running, 0, role=role, queued_prefill_tokens=queued, **kw)


def test_new_requests_go_to_prefill_capable_instances_and_roles_are_ignored_with_pd_off():
    cluster = [inst("p0", "prefill", free=100), inst("d0", "decode", free=900), inst("d1", "decode", free=950)]
    assert [i.instance_id for i in dispatch_candidates(cluster, FIXED)] == ["p0"]
    assert dispatch(FIXED, cluster, DispatchState(), 4) == "p0"
    assert dispatch(named_policy("kvferry"), cluster, DispatchState(), 4) == "d1"  # pd off: the freest
    only_decode = [inst("d0", "decode"), inst("d1", "decode", free=800)]
    assert dispatch(FIXED, only_decode, DispatchState(), 4) == "d1"  # nothing else can serve


def test_a_hand_off_goes_to_the_freest_decode_instance_with_room_then_to_a_mixed_one():
    cluster = [inst("p0", "prefill"), inst("d0", "decode", free=300), inst("d1", "decode", free=600),
               inst("m0", "mixed", free=990)]
    assert handoff_target(cluster, FIXED, 100) == "d1"
    assert handoff_target(cluster, FIXED, 100, exclude={"d1"}) == "d0"
    assert handoff_target(cluster, FIXED, 700) == "m0"  # no decode instance has room for it
    assert handoff_target(cluster, FIXED, 995) is None  # it stays and decodes where it is
    draining = [inst("p0", "prefill"), inst("d0", "decode", draining=True)]
    assert handoff_target(draining, FIXED, 1) is None


def test_load_balancing_never_moves_work_onto_or_off_prefill_instances():
    busy = inst("p0", "prefill", free=5, running=8)
    cluster = [busy, inst("p1", "prefill", free=990, running=0), inst("d0", "decode", free=5, running=8),
               inst("d1", "decode", free=990, running=0)]
    plans = plan_migrations(cluster, cfg=FIXED)
    assert [(p.src, p.dst) for p in plans] == [("d0", "d1")]
    drain = [inst("p0", "prefill", draining=True), inst("p1", "prefill", free=990), inst("d0", "decode", free=900)]
    assert [(p.src, p.dst) for p in plan_migrations(drain, cfg=FIXED)] == [("p0", "d0")]


def test_adaptive_roles_lend_an_instance_under_pressure_and_take_it_back():
    state = RoleState({"p0": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"})
    backlog = [inst("p0", "prefill", queued=50_000), inst("d0", "decode", free=900), inst("d1", "decode", free=950),
               inst("d2", "decode", free=800)]
    assert role_changes(backlog, ADAPTIVE, state, 10.0) == [("d1", "mixed")]
    assert role_changes(backlog, ADAPTIVE, state, 10.5) == []  # one change per interval
    calm = [inst("p0", "prefill", queued=0), inst("d0", "decode", free=900), inst("d1", "mixed", free=950),
            inst("d2", "decode", free=800)]
    assert role_changes(calm, ADAPTIVE, state, 12.0) == [("d1", "decode")]
    assert role_changes(backlog, FIXED, RoleState({}), 100.0) == []  # fixed roles never change
    short = RoleState({"p0": "prefill", "p1": "prefill", "d0": "decode"})
    tight = [inst("p0", "prefill", queued=0, free=990, running=0), inst("p1", "prefill", queued=10, free=990,
                                                                      running=0), inst("d0", "decode", free=2, running=9)]
    assert role_changes(tight, ADAPTIVE, short, 5.0) == [("p0", "mixed")]


@pytest.fixture(scope="module")
def runs():
    from simulator.cluster import simulate
    from simulator.config import SimConfig
    from workload.traces import generate

    trace = generate(200, 1.0, 1.0, "fixed:2048-fixed:256", seed=3)
    colo = simulate(trace, named_policy("kvferry"), SimConfig(instances=4))
    pd = simulate(trace, FIXED, SimConfig(instances=4, prefill_instances=1, decode_instances=3))
    return trace, colo, pd


def test_the_simulator_hands_every_prefilled_request_to_a_decode_instance(runs):
    trace, colo, pd = runs
    s = pd.summary
    assert s["completed"] == len(trace) and s["failed"] == 0
    assert s["pd"]["started"] >= 0.95 * len(trace) and s["migration"]["committed"] >= s["pd"]["started"]
    assert all(r.output_tokens == r.output_len for r in pd.records)
    assert s["itl"]["p99"] < colo.summary["itl"]["p99"] / 3  # the prefills no longer stall the decodes


def test_a_prefill_engine_parks_each_request_once_its_first_token_is_out():
    """Parked: out of the batch with its blocks, visible to a migration (status waiting), taken by
    detach_request without a second detach; put back, it decodes on; aborted, it frees its blocks."""
    from engine import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine.from_model("tiny", EngineConfig(dtype="float32", num_blocks=64, debug_checks=True))
    eng.park_prefilled = True
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    for rid in ("a", "b", "one"):
        eng.add_request(rid, [1, 2, 3, 4, 5], sp if rid != "one" else SamplingParams(max_tokens=1))
    outs = eng.step()
    assert {o.request_id for o in outs} == {"a", "b", "one"} and all(o.first_index == 0 for o in outs)
    assert eng.parked == {"a", "b"} and not eng.scheduler.running  # "one" finished in its prefill
    assert eng.migration_view("a").status == "waiting" and eng.blocks.num_owned("a") > 0
    assert eng.step() == []  # parked requests take no step
    state = eng.detach_request("a")
    assert state.num_computed_tokens == 5 and "a" not in eng.parked and eng.is_detached("a")
    eng.reattach_request("a")
    eng.reattach_request("b")
    eng.park_prefilled = False
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.requests == {} and eng.blocks.num_used == 0
    eng.park_prefilled = True
    eng.add_request("c", [1, 2, 3], sp)
    eng.step()
    assert eng.parked == {"c"}
    eng.abort_request("c")
    assert not eng.parked and eng.blocks.num_used == 0
    eng.check_integrity()
