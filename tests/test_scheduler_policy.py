"""The scheduler's policy wiring: named policies and thresholds from config and flags, dispatch with the
request's priority, the migration round (load balancing vs drains only), auto-scaling decisions and the
pool manager's advice, instance-seconds. In-process with fake load reports (a fake clock where time
matters), plus one real scheduler in a thread for the MigrateCommand a load-balancing round sends.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from protocol import (
    Ack,
    Deregister,
    DispatchRequest,
    LoadReport,
    MigrateCommand,
    RegisterReply,
    RequestLoadEntry,
    ScaleAdvice,
    ScaleQuery,
    StatusReply,
    StatusRequest,
    UndrainInstance,
)
from protocol.sockets import Received
from services.config import ConfigFileError, SchedulerConfig, load_config
from services.scheduler.handlers import SchedulerCore
from tests.test_scheduler_migration import ROUND_MS, registered, scheduler
from tests.test_scheduler_service import reg

HIGH = -1  # priority < high_priority_below (0): high priority


class Core:
    """A SchedulerCore driven by hand: messages in, replies out, the clock set by the test."""

    def __init__(self, **settings: Any) -> None:
        self.now = 0.0
        self.core = SchedulerCore(SchedulerConfig(**settings), clock=lambda: self.now)
        self.seq: dict[str, int] = {}

    def handle(self, msg: Any) -> Any:
        return asyncio.run(self.core.handle(Received(msg, [], b"peer")))

    def register(self, *wids: str, blocks: int = 100) -> None:
        for w in wids:
            assert isinstance(self.handle(reg(w, blocks)), RegisterReply)

    def report(self, wid: str, reqs: list[tuple[int, int]] = (), *, total: int = 100, waiting: int = 0,
               draining: bool = False, used: int | None = None) -> None:
        """reqs: (priority, blocks) of running requests, ids <wid>-r<k>."""
        self.seq[wid] = self.seq.get(wid, 0) + 1
        entries = [RequestLoadEntry(request_id=f"{wid}-r{k}", priority=p, num_blocks=b, num_tokens=b * 16)
                   for k, (p, b) in enumerate(reqs)]
        used = sum(b for _, b in reqs) if used is None else used
        assert self.handle(LoadReport(worker_id=wid, seq=self.seq[wid], total_blocks=total, free_blocks=total - used,
                                      num_running=len(reqs), num_waiting=waiting, requests=entries,
                                      draining=draining)) is None

    def dispatch(self, priority: int = 0, tokens: int = 16) -> str:
        rep = self.handle(DispatchRequest(request_id=f"q{self.now}", priority=priority, num_prompt_tokens=tokens,
                                          frontend_id="fe"))
        return rep.worker_id

    def query(self, *workers: str) -> ScaleAdvice:
        adv = self.handle(ScaleQuery(manager_id="test-pool", workers=list(workers)))
        assert isinstance(adv, ScaleAdvice), adv
        return adv

    def status(self) -> StatusReply:
        return self.handle(StatusRequest())


# ---- config and flags ------------------------------------------------------------------------------

def test_scheduler_config_maps_onto_the_named_policies():
    pc = SchedulerConfig().policy_config()
    assert (pc.name, pc.dispatch, pc.migrate, pc.priority_headroom) == ("kvferry", "cache", True, True)
    assert (pc.migrate_out_below, pc.migrate_in_above, pc.priority_load_cap_tokens, pc.high_priority_below) == \
        (3.0, 30.0, 1600, 0)
    assert pc.migration_interval_s == 0.05 and pc.scale_interval_s == 10.0
    flags = {name: (p.dispatch, p.migrate, p.priority_headroom) for name in ("rr", "load", "prefix", "kvferry", "kvferry-nopri")
             for p in [SchedulerConfig(policy=name).policy_config()]}
    assert flags == {"rr": ("rr", False, False), "load": ("load", False, False), "prefix": ("prefix", False, False),
                     "kvferry": ("cache", True, True), "kvferry-nopri": ("cache", True, False)}
    cfg = load_config(env={"KVFERRY_SCHEDULER_POLICY": "kvferry-nopri", "KVFERRY_SCHEDULER_MIGRATE_OUT_BELOW": "5",
                           "KVFERRY_SCHEDULER_SCALE_MAX_INSTANCES": "6", "KVFERRY_SCHEDULER_SCALING": "true"},
                      overrides={"scheduler": {"priority_load_cap_tokens": 800, "scale_interval_ms": 2500,
                                               "high_priority_below": -3}})
    pc = cfg.scheduler.policy_config()
    assert (pc.name, pc.migrate_out_below, pc.priority_load_cap_tokens, pc.high_priority_below) == \
        ("kvferry-nopri", 5.0, 800, -3)
    assert (pc.max_instances, pc.scale_interval_s, cfg.scheduler.scaling) == (6, 2.5, True)
    for bad, match in [(dict(policy="random"), "unknown policy"), (dict(priority_load_cap_tokens=-1), "priority_load_cap_tokens"),
                       (dict(scale_up_below=70.0), "flap"), (dict(migrate_out_below=40.0), "migrate_out_below"),
                       (dict(scale_min_instances=3, scale_max_instances=2), "scale_min_instances")]:
        with pytest.raises(ValueError, match=match):
            SchedulerConfig(**bad).policy_config()
        with pytest.raises(ValueError, match=match):
            SchedulerCore(SchedulerConfig(**bad))
    with pytest.raises(ConfigFileError, match="expected float"):
        load_config(env={}, overrides={"scheduler": {"migrate_in_above": "x"}})


def test_demo_starts_what_kvferry_up_would(monkeypatch):
    from cli.demo import demo_cluster
    from cli.main import build_parser

    for k in [k for k in __import__("os").environ if k.startswith("KVFERRY_")]:
        monkeypatch.delenv(k)
    c = demo_cluster(build_parser().parse_args(["demo"]))
    cfg = c.spec.config
    assert (c.spec.num_workers, cfg.worker.engine, cfg.worker.model, cfg.worker.device) == (2, "torch", "smollm2", "cpu")
    assert (cfg.cluster.http_port, cfg.cluster.base_port, cfg.scheduler.policy, c.scaling) == (8000, 17100, "kvferry",
                                                                                             False)


def test_up_and_scheduler_flags(monkeypatch):
    from cli.main import build_parser
    from cli.up import cluster_from_args

    for k in [k for k in __import__("os").environ if k.startswith("KVFERRY_")]:
        monkeypatch.delenv(k)
    parse = build_parser().parse_args
    c = cluster_from_args(parse(["up", "--engine", "sim", "--scaling", "--min-workers", "1", "--max-workers", "3",
                                 "--policy", "kvferry-nopri"]))
    sc = c.spec.config.scheduler
    assert (c.spec.num_workers, sc.scaling, sc.scale_min_instances, sc.scale_max_instances, sc.policy) == \
        (1, True, 1, 3, "kvferry-nopri")
    assert c.scaling and c.max_workers == 3
    c = cluster_from_args(parse(["up", "--workers", "2", "--scaling"]))  # --workers: the minimum; default max 4
    assert (c.spec.num_workers, c.spec.config.scheduler.scale_max_instances) == (2, 4)
    c = cluster_from_args(parse(["up", "--workers", "3", "--policy", "rr"]))
    assert (c.spec.num_workers, c.scaling, c.spec.config.scheduler.policy) == (3, False, "rr")
    assert cluster_from_args(parse(["up"])).spec.config.scheduler.policy == "kvferry"  # the product default
    for args, match in [(["--min-workers", "2"], "go with --scaling"),
                        (["--scaling", "--min-workers", "3", "--max-workers", "2"], "scale_min_instances"),
                        (["--scaling", "--workers", "1", "--min-workers", "1"], "not --workers")]:
        with pytest.raises(ValueError, match=match):
            cluster_from_args(parse(["up", *args]))
    for cmd in (["up", "--policy", "random"], ["scheduler", "--policy", "random"]):
        with pytest.raises(SystemExit):
            parse(cmd)
    assert parse(["scheduler", "--policy", "load"]).policy == "load"


# ---- dispatch: the request's priority and the headroom ------------------------------------------------

def test_dispatch_uses_the_requests_priority_and_the_headroom():
    """Normal requests keep off an instance serving a high-priority request (capped at 70 blocks of its
    100 here); a high-priority request joins the instance kept light for them, or opens the least loaded."""
    c = Core(priority_load_cap_tokens=70 * 16)
    c.register("w0", "w1")
    c.report("w0", [(0, 30), (0, 30)])  # busy with normal requests: F = 40/2 = 20
    c.report("w1", [(0, 10)])  # F = 90
    assert c.dispatch(HIGH) == "w1"  # no high-priority load anywhere: capped, w1 (70-10)/1 over w0 (70-60)/2
    c.report("w0", [(0, 30)])  # F = 70
    c.report("w1", [(HIGH, 20)])  # F = (100 - 20 - 30 headroom) / 1 = 50 with kvferry, 80 without
    # the dispatch snapshots carry the high-priority entries the headroom needs, and only those
    assert [r.request_id for r in c.core.registry.get("w1").snapshot.requests] == ["w1-r0"]
    assert c.core.registry.get("w0").snapshot.requests == ()
    assert c.dispatch(0) == "w0"  # 70 > 50: away from the high-priority request's headroom
    c.report("w0", [(0, 30)])
    assert c.dispatch(HIGH) == "w1"  # w1's memory is kept for high-priority work: F 80, w0 capped (70-30)/1
    st = {i.worker_id: i.freeness for i in c.status().instances}
    assert st == {"w0": pytest.approx(70.0), "w1": pytest.approx(50.0)}  # status shows the policy's view

    nopri = Core(policy="kvferry-nopri")
    nopri.register("w0", "w1")
    nopri.report("w0", [(0, 30)])
    nopri.report("w1", [(HIGH, 20)])
    assert nopri.core.registry.get("w1").snapshot.requests == ()  # nothing needs them
    assert nopri.dispatch(0) == "w1" and nopri.dispatch(HIGH) == "w0"  # overall load only (w1 counts one more)


# ---- the migration round -------------------------------------------------------------------------------

def test_migration_plan_balances_load_with_kvferry_and_only_drains_with_rr_and_load():
    def plans(policy: str, drain: str | None = None) -> list[tuple[str, str, str | None, str]]:
        c = Core(policy=policy)
        c.register("cold", "hot", "warm")
        c.report("hot", [(0, 40), (0, 30), (1, 28)])  # F = 2/3: below migrate_out_below
        c.report("warm", [(0, 50)])
        c.report("cold", [])
        if drain:
            c.core.registry.set_draining(drain, True)
        return [(p.src, p.dst, p.request_id, p.reason) for p in c.core.migrator.plan()]

    # the source's victim: lowest priority (largest number) first, named from the full request list
    assert plans("kvferry") == plans("kvferry-nopri") == [("hot", "cold", "hot-r2", "load")]
    assert plans("load") == plans("rr") == []
    assert plans("load", drain="warm") == [("warm", "cold", "warm-r0", "drain")]
    # drains first; cold takes one migration at a time (max_migrations_per_instance = 1)
    assert plans("kvferry", drain="warm") == [("warm", "cold", "warm-r0", "drain")]


@pytest.mark.parametrize("policy", ["kvferry", "load"])
def test_a_load_balancing_round_sends_migrate_commands_only_with_a_migrating_policy(policy):
    import zmq

    ctx = zmq.Context()
    try:
        with scheduler(policy=policy) as ep:
            ws = registered(ctx, ep, ("cold", 100, (), {}),
                            ("hot", 2, (("a", 40, 0, 640), ("b", 30, 0, 480), ("c", 28, 3, 448)), {}))
            got = ws["hot"].command(timeout_s=8 * ROUND_MS / 1000)
            if policy == "load":
                assert got is None
                return
            assert got is not None
            peer, cmd = got
            assert isinstance(cmd, MigrateCommand)
            assert (cmd.request_id, cmd.dst_worker_id, cmd.reason) == ("c", "cold", "load")
            ws["hot"].answer(peer, Ack(reply_to=cmd.msg_id, detail="c"))
            assert ws["hot"].command(timeout_s=4 * ROUND_MS / 1000) is None  # one in flight out of hot
            for w in ws.values():
                w.close()
    finally:
        ctx.destroy(linger=0)


# ---- scaling -----------------------------------------------------------------------------------------

def test_scaling_advice_up_to_max_then_drain_and_stop_down_to_min():
    c = Core(scaling=True, scale_min_instances=1, scale_max_instances=3, scale_up_below=10.0,
             scale_down_above=60.0, scale_interval_ms=1000)
    s = c.core.scaler
    assert s.tick_s == 0.25
    c.register("w0")
    c.report("w0", [(0, 45), (0, 50)])  # F = 2.5
    assert s.tick() is None  # no pool manager has asked: nobody would act
    adv = c.query("w0")
    assert adv.enabled and adv.start == 0 and adv.serving == 1 and adv.average_freeness == pytest.approx(2.5)
    act = s.tick()
    assert act is not None and act.kind == "up"
    assert c.query("w0").start == 1  # handed over once
    assert c.query("w0", "w1").start == 0  # w1 starts (listed, not registered yet)
    c.now = 5.0
    assert s.tick() is None  # interval passed, but one is still starting
    c.register("w1")
    c.report("w1", [(0, 90)])  # F = 10; average (2.5 + 10) / 2 < 10
    c.now = 5.1
    c.query("w0", "w1")  # the manager polls all along (a few times a second)
    assert s.tick() is None  # w1 just joined: the next decision waits an interval to see its load
    c.now = 6.1
    c.query("w0", "w1")
    assert s.tick().kind == "up" and c.query("w0", "w1").start == 1
    c.register("w2")
    c.report("w2", [(0, 95)])
    c.now = 7.0
    c.query("w0", "w1", "w2")
    assert s.tick() is None  # 3 = max_instances
    # idle: drain the instance with the fewest requests (ties: fewest used blocks, then id)
    c.report("w0", [(0, 5)])
    c.report("w1", [])
    c.report("w2", [(0, 10)])
    c.now = 8.0
    act = s.tick()
    assert act.kind == "down" and act.instance_id == "w1"
    st = c.status()
    assert {i.worker_id: i.draining for i in st.instances} == {"w0": False, "w1": True, "w2": False}
    assert st.scaling is not None and st.scaling.retiring == ["w1"] and st.scaling.last_action == "down"
    assert (st.scaling.scale_ups, st.scaling.scale_downs, st.scaling.manager_id) == (2, 1, "test-pool")
    assert c.dispatch() != "w1"
    adv = c.query("w0", "w1", "w2")
    assert adv.stop == [] and adv.retiring == ["w1"] and adv.serving == 2  # the worker has not said draining yet
    c.report("w1", [], draining=True)
    assert c.query("w0", "w1", "w2").stop == ["w1"]
    c.now = 9.5
    assert s.tick() is None  # one drain at a time
    c.handle(Deregister(worker_id="w1", reason="sigterm"))  # the manager stopped it
    assert c.query("w0", "w2").retiring == []
    c.now = 10.0
    # w0 and w2 hold 5 and 10 blocks: without w0 the cluster would read (100 - 15) / 2 < 60, kept
    assert s.tick() is None
    c.report("w2", [])
    assert s.tick().instance_id == "w2"  # without w2: (100 - 5) / 1 = 95
    c.report("w2", [(0, 5)], draining=True)
    assert c.query("w0", "w2").stop == []  # still holds a request (the migration round moves it)
    c.report("w2", [], draining=True)
    assert c.query("w0", "w2").stop == ["w2"]
    c.handle(Deregister(worker_id="w2"))
    c.query("w0")
    c.now = 20.0
    assert s.tick() is None  # at min_instances
    # instance-seconds: w0 0 → 20, w1 5 → 9.5, w2 6.1 → 10
    assert c.status().instance_seconds == pytest.approx(20.0 + 4.5 + 3.9)


def test_scaling_is_idle_without_a_manager_and_an_undrain_cancels_a_retirement():
    c = Core(scaling=True, scale_min_instances=1, scale_max_instances=2, scale_interval_ms=1000)
    s = c.core.scaler
    c.register("w0", "w1")
    c.query("w0", "w1")
    act = s.tick()
    assert act.kind == "down" and act.instance_id == "w0"
    assert isinstance(c.handle(UndrainInstance(worker_id="w0")), Ack)
    assert s.retiring == {} and c.query("w0", "w1").stop == []
    c.now = 10.0  # the manager went quiet: no action however free the cluster
    assert s.tick() is None
    # a worker the manager does not run is never chosen to stop
    c.query("w1")
    c.now = 12.0
    assert s.tick() is None and s.retiring == {}
    off = Core()
    assert off.status().scaling is None
    adv = off.query("w0")
    assert not adv.enabled and adv.start == 0 and adv.average_freeness == -math.inf


def test_instance_seconds_count_registration_to_death_and_again_after_reregistration():
    c = Core(heartbeat_timeout_ms=1000)
    c.register("w0", "w1")
    c.now = 1.0
    c.report("w1", [])
    c.now = 3.0
    c.register("w0")  # registering again while alive keeps the start
    assert [r.worker_id for r in c.core.sweep()] == ["w1"]  # silent since 1.0: dead at 3.0
    assert c.status().instance_seconds == pytest.approx(3.0 + 3.0)
    c.now = 4.0
    c.register("w1")  # back: counts again from now
    c.now = 5.0
    assert c.status().instance_seconds == pytest.approx(5.0 + 3.0 + 1.0)
    c.handle(Deregister(worker_id="w0"))
    c.now = 7.0
    assert c.status().instance_seconds == pytest.approx(5.0 + 3.0 + 3.0)


def test_ctl_status_prints_policy_instance_seconds_and_scaling():
    from cli.ctl import format_status, status_to_json

    c = Core(scaling=True, scale_max_instances=3, scale_interval_ms=1000)
    c.register("w0")
    c.query("w0")
    c.now = 12.5
    c.report("w0", [(0, 95)])
    text = format_status(c.status())
    first, second = text.splitlines()[:2]
    assert first.startswith("scheduler scheduler-0  policy kvferry  instances 1") and "instance-seconds 12.5" in first
    assert second.startswith("scaling 1..3 instances  average freeness 5.0  last action none")
    data = status_to_json(c.status())
    assert data["instance_seconds"] == 12.5 and data["scaling"]["max_instances"] == 3
