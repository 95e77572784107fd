"""The migration planner (policy.migration): pure functions over load snapshots."""

from __future__ import annotations

from policy import InstanceLoad, PlannedMigration, RequestLoad, migration_victim, plan_migrations
from policy.migration import compatible, migration_sources


def req(rid: str, priority: int = 0, blocks: int = 4, tokens: int | None = None, running: bool = True) -> RequestLoad:
    return RequestLoad(rid, priority, blocks, blocks * 16 if tokens is None else tokens, running)


def inst(iid: str, free: int = 100, total: int = 100, running: int = 0, draining: bool = False, alive: bool = True,
         requests: tuple[RequestLoad, ...] = (), **kw) -> InstanceLoad:
    return InstanceLoad(iid, total, free, running, 0, requests=requests, draining=draining, alive=alive, **kw)


def drained(iid: str, *requests: RequestLoad, **kw) -> InstanceLoad:
    used = sum(r.num_blocks for r in requests)
    return inst(iid, free=100 - used, running=sum(r.running for r in requests), draining=True, requests=requests, **kw)


def test_victim_is_lowest_priority_then_shortest_context():
    rs = [req("hi", priority=0, tokens=10), req("lo-long", priority=5, tokens=900),
          req("lo-short", priority=5, tokens=50), req("mid", priority=2, tokens=1)]
    assert migration_victim(rs).request_id == "lo-short"  # larger number = lower priority
    assert migration_victim(rs, exclude={"lo-short"}).request_id == "lo-long"
    assert migration_victim([req("q", priority=9, running=False), req("r")]).request_id == "r"  # queued: no KV to move
    assert migration_victim([req("q", running=False)]) is None
    assert migration_victim([req("b", tokens=5), req("a", tokens=5)]).request_id == "a"  # ties by id


def test_no_draining_instance_plans_nothing():
    assert plan_migrations([inst("a", free=1, running=9), inst("b")]) == []
    assert plan_migrations([]) == []


def test_drain_goes_to_the_freest_compatible_destination():
    src = drained("d", req("x", priority=1, blocks=8), req("y", priority=3, blocks=4, tokens=200),
                  req("z", priority=3, blocks=2, tokens=30))
    loads = [src, inst("a", free=50, running=2), inst("b", free=90, running=2), inst("c", free=95, running=1)]
    # c is freest, but another engine / block size: not a candidate
    layouts = {"d": ("sim", 16), "a": ("sim", 16), "b": ("sim", 16), "c": ("torch", 16)}
    assert plan_migrations(loads, layouts=layouts) == [PlannedMigration("d", "b", "z", "drain")]
    assert plan_migrations(loads)[0].dst == "c"  # no layouts given: all compatible


def test_in_flight_pairs_limit_each_source_and_destination():
    src = drained("d", req("x"), req("y"), req("z"))
    loads = [src, inst("a", free=90, running=1), inst("b", free=60, running=1)]
    assert plan_migrations(loads, [("d", "a")]) == []  # d already has one out
    assert plan_migrations(loads, [("e", "a")]) == [PlannedMigration("d", "b", "x")]  # a already has one in
    assert plan_migrations(loads, [("e", "a"), ("f", "b")]) == []
    two = plan_migrations(loads, max_per_instance=2)
    # after taking x, a counts it (86 free / 2 running = 43 < b's 60): y goes to b
    assert [(p.dst, p.request_id) for p in two] == [("a", "x"), ("b", "y")]
    three = plan_migrations(loads, max_per_instance=3)
    assert sorted(p.request_id for p in three) == ["x", "y", "z"] and {p.dst for p in three} <= {"a", "b"}
    assert plan_migrations(loads, max_per_instance=0) == []


def test_busy_requests_are_skipped_and_destinations_need_room():
    src = drained("d", req("x", blocks=30), req("y", blocks=60, tokens=10_000))
    loads = [src, inst("a", free=40)]
    assert plan_migrations(loads, busy_requests={"x"}) == []  # y needs 60 blocks, a has 40
    assert plan_migrations(loads) == [PlannedMigration("d", "a", "x")]
    full = inst("a", free=90, running=4, max_running=4)
    assert plan_migrations([src, full]) == []


def test_dead_draining_and_self_are_never_destinations():
    loads = [drained("d", req("x")), drained("e", req("y")), inst("dead", alive=False)]
    assert plan_migrations(loads) == []
    loads.append(inst("ok", free=50))
    plans = plan_migrations(loads)
    assert [(p.src, p.dst) for p in plans] == [("d", "ok")]  # one into ok per round (limit 1)
    assert plan_migrations(loads, max_per_instance=2) == [PlannedMigration("d", "ok", "x"),
                                                          PlannedMigration("e", "ok", "y")]


def test_dead_or_idle_draining_instances_are_not_sources():
    idle = inst("idle", draining=True)
    dead = drained("dead", req("x"), alive=False)
    queued = inst("q", draining=True, requests=(req("w", running=False),))
    assert migration_sources([idle, dead, queued, inst("a")]) == []
    assert plan_migrations([idle, dead, queued, inst("a")]) == []


def test_unlisted_requests_are_left_to_the_source():
    # A report without per-request entries (or converted without them): the source picks.
    loads = [inst("d", free=80, running=3, draining=True), inst("a", free=50)]
    assert plan_migrations(loads) == [PlannedMigration("d", "a", None)]


def test_sources_most_loaded_first():
    loads = [drained("d1", req("a")), drained("d2", req("b"), req("c")), inst("x", free=90), inst("y", free=80)]
    plans = plan_migrations(loads)
    assert [(p.src, p.dst) for p in plans] == [("d2", "x"), ("d1", "y")]


def test_compatible():
    assert compatible(None, "a", "b")
    assert compatible({"a": 1, "b": 1}, "a", "b") and not compatible({"a": 1, "b": 2}, "a", "b")
    assert not compatible({"a": 1}, "a", "b") and not compatible({}, "a", "b")


# ---- cache affinity (prefix_blocks) ----------------------------------------------------------------

def test_affinity_prefers_the_destination_caching_the_prefix_among_similarly_free_ones():
    src = drained("d", req("x", blocks=10))
    loads = [src, inst("a", free=90, running=1), inst("b", free=80, running=1), inst("c", free=40, running=1)]
    held = {("x", "b"): 6, ("x", "c"): 10}
    plans = plan_migrations(loads, prefix_blocks=lambda rid, iid: held.get((rid, iid), 0))
    # b (F 80) is within 25 % of a (F 90) and caches 6 blocks; c caches all 10 but is far less free.
    assert plans == [PlannedMigration("d", "b", "x")]
    assert plan_migrations(loads)[0].dst == "a"  # without affinity: the freest
    nothing = plan_migrations(loads, prefix_blocks=lambda rid, iid: 0)
    assert nothing[0].dst == "a"  # nobody caches it: as without


def test_affinity_room_check_counts_only_the_blocks_the_destination_lacks():
    src = drained("d", req("x", blocks=30))
    loads = [src, inst("a", free=20)]
    assert plan_migrations(loads) == []  # 30 blocks, 20 free
    assert plan_migrations(loads, prefix_blocks=lambda rid, iid: 12) == [PlannedMigration("d", "a", "x")]
    # A lookup claiming more than the request has counts as the whole request, not negative room.
    assert plan_migrations(loads, prefix_blocks=lambda rid, iid: 500) == [PlannedMigration("d", "a", "x")]


def test_affinity_band_is_a_policy_setting():
    from policy import PolicyConfig

    src = drained("d", req("x", blocks=4))
    loads = [src, inst("a", free=90, running=1), inst("b", free=80, running=1)]
    held = lambda rid, iid: 4 if iid == "b" else 0  # noqa: E731
    assert plan_migrations(loads, prefix_blocks=held)[0].dst == "b"
    strict = PolicyConfig(migration_affinity_band=0.0)
    assert plan_migrations(loads, prefix_blocks=held, cfg=strict)[0].dst == "a"
