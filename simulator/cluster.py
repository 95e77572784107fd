"""The discrete-event cluster: N sim-engine instances in virtual time under one policy.

Events (a heap keyed by time, ties in insertion order) are each instance's step ends, migration
stages, the periodic migration round, fragmentation samples, scaling checks and instance start-ups;
trace arrivals are merged in from the sorted trace. Each instance steps on its own: a step runs the
engine at once and its tokens are delivered when it ends, `last_step_seconds` later, and the next
step starts right then if the instance has work.

Like the live scheduler, dispatch sees each instance's last load report (sent after a step, at most
every `report_interval_s`, or when the instance goes idle) plus the requests dispatched to it since
(policy.DispatchState). Migration rounds plan from the same reports with policy.plan_migrations,
the sources' request lists read at the round (the live source picks its request itself).
Deterministic: no randomness besides the trace's; ties broken by insertion order and ids.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from engine.block_manager import KvEventBatch, blocks_for
from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.request import RequestStatus, SamplingParams
from engine.sim.executor import sim_token
from policy import DispatchState, InstanceLoad, PlannedMigration, PolicyConfig, dispatch, plan_migrations, scaling_decision
from policy.pd import RoleState, hands_off, handoff_target, role_changes
from policy.freeness import freeness
from policy.migration import migration_sources
from policy.prefix_index import PrefixIndex
from policy.request_prefixes import RequestPrefixes
from protocol.kv_hash import prompt_hashes, root_from_namespace
from simulator.config import SimConfig
from simulator.instance import SimInstance
from simulator.migration import Migrator
from workload.metrics import SLO, FragmentationMeter, RequestRecord, instance_seconds, summarize
from workload.reuse import prompt_tokens
from workload.traces import TraceRequest

PROMPT_TOKEN = 7  # the sim executor ignores prompt contents ...


def sim_prompt(rid: str, length: int, vocab_size: int) -> list[int]:
    """... but the prefix cache does not: a prompt of its own for every request (two leading
    tokens from the request id, then PROMPT_TOKEN), so a trace without reuse gets no cache hits."""
    idx = int(rid.lstrip("r") or 0)
    head = [idx // vocab_size % vocab_size, idx % vocab_size]
    return (head + [PROMPT_TOKEN] * length)[:length]
STALL_S = 3600.0  # no token and no arrival for this long (virtual): a bug, not a slow run


@dataclass
class SimResult:
    """A finished run: per-request records, the summary (workload.metrics plus cluster metrics),
    and the instances' lifetimes."""

    records: list[RequestRecord]
    summary: dict[str, Any]
    lifetimes: list[tuple[str, float, float]]  # (instance id, start, stop or end of run)
    wall_s: float


class ClusterSim:
    """Run `trace` on a simulated cluster under `policy` (see the module docstring)."""

    def __init__(self, trace: Sequence[TraceRequest], policy: PolicyConfig, config: SimConfig | None = None,
                 slo: SLO | None = None) -> None:
        self.trace = trace
        self.policy = policy
        self.cfg = config or SimConfig()
        self.slo = slo
        self.latency = self.cfg.latency_model
        longest = max((r.input_len + r.output_len for r in trace), default=0)
        self.max_model_len = max(8192, longest + 1)
        self.engine_config = self.cfg.engine_config(self.max_model_len)
        self._heap: list[tuple[float, int, Callable[[Any, float], None], Any]] = []
        self._seq = itertools.count()
        self.instances: list[SimInstance] = []  # every instance ever started, in start order
        self.live: list[SimInstance] = []  # ready and not stopped (draining ones included)
        self.starting: list[SimInstance] = []
        self.by_id: dict[str, SimInstance] = {}
        self.records: dict[str, RequestRecord] = {}
        self.arrival_key: dict[str, float] = {}  # the engine's arrival_time of each request (restored after a move)
        self.preempted_at: dict[str, float] = {}  # when a preempted request's token was due (loss runs from there)
        self.pending: deque[str] = deque()  # arrived while no instance could take them
        self.dstate = DispatchState()
        self.migrator = Migrator(self, self.cfg)
        self.frag = FragmentationMeter()
        # Traces with reuse (prompts made of segments): the prefix index the dispatch consults (fed
        # by KV events with each report, as in the live scheduler), and hit-rate accounting
        # against an oracle that sees every instance's actual cache at dispatch.
        self.reuse = any(r.segments for r in trace)
        self.use_index = self.reuse and policy.dispatch in ("prefix", "cache")
        self.index = PrefixIndex()
        self.req_prefixes = RequestPrefixes()  # running requests' prompt hashes (migration affinity)
        self.prefix = {"prompt_tokens": 0, "oracle_hit_tokens": 0, "dispatch_hit_tokens": 0}
        self.done = 0
        self.now = 0.0
        self.last_progress_s = 0.0
        self.last_scale_s = -math.inf
        self.last_joined_s = -math.inf  # when the newest started instance began serving
        self.scale_actions: list[tuple[float, str, str]] = []
        self._n_inst = 0
        self.pd = policy.pd_mode != "off"
        self.roles = RoleState({})
        self.handoffs = {"started": 0, "no_target": 0, "role_changes": 0}

    # ---- event plumbing (the Host protocol of simulator.migration) ---------------------------------

    def schedule(self, t: float, fn: Callable[[Any, float], None], arg: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, arg))

    def kick(self, inst: SimInstance, now: float) -> None:
        """Start a step if the instance is idle and has work."""
        if not inst.busy and inst.stopped_s is None and inst.engine.scheduler.has_work:
            self._start_step(inst, now)

    def moved(self, request_id: str, src: SimInstance, dst: SimInstance, now: float) -> None:
        req = dst.engine.requests[request_id]
        req.arrival_time = self.arrival_key[request_id]  # queue order as if it had never moved
        self.records[request_id].migrations += 1
        if request_id in src.high:
            del src.high[request_id]
            dst.high[request_id] = None
        # Both report at their next step end, so the next round sees the move.
        src.last_report_s = dst.last_report_s = -math.inf

    def settled(self, inst: SimInstance, now: float) -> None:
        """A draining instance stops once it is empty."""
        if inst.draining and inst.stopped_s is None and inst.empty:
            inst.stopped_s = now
            self.index.clear(inst.id)
            self.live.remove(inst)
            self.scale_actions.append((now, "stopped", inst.id))

    # ---- instances ---------------------------------------------------------------------------------

    def _new_instance(self, now: float, ready_s: float) -> SimInstance:
        engine = LLMEngine.sim(self.latency, self.engine_config, clock="virtual", max_model_len=self.max_model_len)
        inst = SimInstance(f"i{self._n_inst:02d}", engine, now, ready_s)
        inst.role = self.cfg.role(self._n_inst)
        self.roles.configured[inst.id] = inst.role
        engine.park_prefilled = self.pd and inst.role == "prefill"  # as a live prefill worker's engine
        inst.report = inst.snapshot()
        if self.use_index:
            engine.enable_kv_events()
            inst.kv_sink = self._kv_events
            inst.report = inst.snapshot()
        self._n_inst += 1
        self.instances.append(inst)
        self.by_id[inst.id] = inst
        return inst

    def _kv_events(self, instance_id: str, batch: KvEventBatch) -> None:
        if batch.reset:
            self.index.clear(instance_id)
        self.index.removed(instance_id, batch.removed)
        self.index.stored(instance_id, batch.stored)

    def _ready(self, inst: SimInstance, now: float) -> None:
        self.starting.remove(inst)
        self.live.append(inst)
        self.last_joined_s = now
        inst.take_report(now)
        self.dstate.on_report(inst.id)
        self.scale_actions.append((now, "ready", inst.id))
        self._retry_pending(now)

    # ---- steps -------------------------------------------------------------------------------------

    def _start_step(self, inst: SimInstance, now: float) -> None:
        if inst.busy:
            raise RuntimeError(f"{inst.id}: a step started while another runs")
        d = inst.step()
        sched = inst.engine.scheduler
        if sched.num_preemptions != inst.preemptions_seen:
            self._note_preemptions(inst, now + d)
        if d == 0.0:  # nothing could run (e.g. the queue waits for blocks held by a migration)
            if inst.outputs:
                self._deliver(inst, now)
            return
        inst.busy = True
        heapq.heappush(self._heap, (now + d, next(self._seq), self._step_end, inst))

    def _note_preemptions(self, inst: SimInstance, token_due_s: float) -> None:
        inst.preemptions_seen = inst.engine.scheduler.num_preemptions
        recs = self.records
        for rid, req in inst.engine.requests.items():
            rec = recs[rid]
            if req.num_preemptions != rec.preemptions:
                rec.preemptions = req.num_preemptions
                self.preempted_at.setdefault(rid, token_due_s)

    def _step_end(self, inst: SimInstance, now: float) -> None:
        inst.busy = False
        self._deliver(inst, now)
        if inst.detach_queue:
            queue, inst.detach_queue = inst.detach_queue, []
            for m in queue:
                self.migrator.final_stage(m, now)
        has_work = inst.engine.scheduler.has_work
        if not has_work or now - inst.last_report_s >= self.cfg.report_interval_s:
            inst.take_report(now)
            self.dstate.on_report(inst.id)
        if inst.busy:
            return  # an aborted final stage re-attached a request and already started the next step
        if has_work:
            self._start_step(inst, now)
        elif inst.draining:
            self.settled(inst, now)

    def _deliver(self, inst: SimInstance, now: float) -> None:
        outs, inst.outputs = inst.outputs, []
        recs = self.records
        pre = self.preempted_at
        if outs:
            self.last_progress_s = now
        for o in outs:
            rid = o.request_id
            rec = recs[rid]
            if o.new_token_ids:
                if rec.first_token_s is None:
                    rec.first_token_s = now
                    if self.pd and not o.finished and (hands_off(inst.report, self.policy) or rid in inst.engine.parked):
                        self._hand_off(inst, rid, now)
                else:
                    rec.itl.append(now - rec.last_token_s)
                rec.last_token_s = now
                rec.output_tokens += len(o.new_token_ids)
                if pre and rid in pre:
                    rec.preemption_loss_s += now - pre.pop(rid)
            if o.finished:
                rec.finish_s = now
                if o.error:
                    rec.error = o.error
                inst.high.pop(rid, None)
                self.req_prefixes.forget(rid)
                self.done += 1

    def _hand_off(self, inst: SimInstance, rid: str, now: float, retry: bool = False) -> None:
        """A prefilled request on a prefill instance moves to a decode instance (policy.pd) at
        once: the live worker starts the move itself, toward the target the scheduler keeps fresh."""
        if rid in self.migrator.in_flight:
            return
        need = inst.engine.blocks.num_owned(rid) + 1
        snaps = [i.report for i in self.live]
        target = handoff_target(snaps, self.policy, need, exclude={inst.id})
        dst = self.by_id[target] if target is not None else None
        if dst is not None and self.migrator.start(PlannedMigration(inst.id, target, rid, "handoff"), inst, dst, now):
            self.handoffs["started"] += 1
            r = dst.report  # count it there until the destination reports
            dst.report = replace(r, free_blocks=max(0, r.free_blocks - need), num_running=r.num_running + 1)
            return
        if not retry:
            self.handoffs["no_target"] += 1
        if rid in inst.engine.parked:  # it decodes here after all (the live worker does the same)
            inst.engine.reattach_request(rid)
            self.kick(inst, now)

    # ---- arrivals and dispatch ---------------------------------------------------------------------

    def _arrive(self, idx: int, r: TraceRequest, now: float) -> None:
        rid = f"r{idx}"
        self.records[rid] = RequestRecord(rid, r.arrival_s, r.input_len, r.output_len, r.priority, itl=array("d"))
        self.last_progress_s = now
        if self.pending or not self._dispatch(rid, now):
            self.pending.append(rid)  # no instance can take it now: retried when one is ready

    def _dispatch(self, rid: str, now: float) -> bool:
        """Send a request to the instance the policy picks; False if there is none."""
        rec = self.records[rid]
        snaps = [i.report for i in self.live]
        bs = self.cfg.block_size
        demand = blocks_for(rec.input_len, bs)
        segments = self.trace[int(rid[1:])].segments
        if segments and self.live:
            vocab = self.live[0].engine.vocab_size
            # An answer segment is what that request generated: the sim engine's tokens for it.
            prompt = prompt_tokens(segments, vocab, lambda j, n: [sim_token(f"r{j}", i, vocab) for i in range(n)])
            namespace = self.live[0].engine.kv_namespace
            hashes = prompt_hashes(prompt, bs, root_from_namespace(namespace, ""))
            cached = self.index.match(hashes, [i.id for i in self.live]) if self.use_index else {}
        else:
            prompt, hashes, cached = None, [], {}
        target = dispatch(self.policy, snaps, self.dstate, demand, rec.priority, prompt_tokens=rec.input_len,
                          cached_blocks=cached, block_size=bs) if snaps else None
        if target is None:
            return False
        inst = self.by_id[target]
        if hashes:
            if self.use_index and self.policy.migrate:
                self.req_prefixes.remember(rid, namespace, bs, hashes)
            p = self.prefix
            p["prompt_tokens"] += rec.input_len
            best = max(len(i.engine.blocks.cached_prefix(hashes)) for i in self.live)
            p["oracle_hit_tokens"] += min(best * bs, rec.input_len - 1)
            p["dispatch_hit_tokens"] += min(cached.get(target, 0) * bs, rec.input_len - 1)
        try:
            req = inst.engine.add_request(rid, prompt if prompt is not None else sim_prompt(rid, rec.input_len, inst.engine.vocab_size),
                                          SamplingParams(max_tokens=rec.output_len, ignore_eos=True), rec.priority)
        except InvalidRequestError as exc:
            rec.error = str(exc)
            rec.finish_s = now
            self.done += 1
            return True
        self.arrival_key[rid] = req.arrival_time
        if self.policy.is_high(rec.priority):
            inst.high[rid] = None
        if not inst.busy:
            self._start_step(inst, now)
        return True

    def _retry_pending(self, now: float) -> None:
        while self.pending and self._dispatch(self.pending[0], now):
            self.pending.popleft()

    # ---- periodic: migration rounds, samples, scaling ----------------------------------------------

    def _round(self, _: Any, now: float) -> None:
        if self.done >= len(self.trace):
            return
        self.schedule(now + self.policy.migration_interval_s, self._round, None)
        snaps = [i.report for i in self.live]
        for iid, role in role_changes(snaps, self.policy, self.roles, now):
            inst = self.by_id[iid]
            inst.role = role
            inst.engine.park_prefilled = role == "prefill"
            if role != "prefill":
                for rid in sorted(inst.engine.parked):
                    if rid not in self.migrator.in_flight:
                        inst.engine.reattach_request(rid)
                self.kick(inst, now)
            inst.take_report(now)
            self.handoffs["role_changes"] += 1
            snaps = [i.report for i in self.live]
        if self.pd:  # hand-offs that found no room when their prefill finished: try again
            for inst in self.live:
                if hands_off(inst.report, self.policy):
                    for rid, req in list(inst.engine.requests.items()):
                        if req.num_output_tokens and req.status is RequestStatus.RUNNING \
                                and rid not in inst.engine.detached:
                            self._hand_off(inst, rid, now, retry=True)
            snaps = [i.report for i in self.live]
        sources = migration_sources(snaps, self.policy)
        if not sources:
            return
        cfg = self.policy
        if not any(s.draining for s in sources) and not any(self._may_receive(s) for s in snaps):
            return  # no destination for a load-balancing move: skip reading the sources' requests
        # Every number as last reported; a source's request list read from it now (the live source
        # picks its request itself), which costs too much to build at every report.
        ids = {s.instance_id for s in sources}
        snaps = [replace(s, requests=self.by_id[s.instance_id].request_loads()) if s.instance_id in ids else s
                 for s in snaps]
        plans = plan_migrations(snaps, self.migrator.pairs(), max_per_instance=cfg.max_migrations_per_instance,
                                busy_requests=self.migrator.in_flight, cfg=cfg,
                                prefix_blocks=self.req_prefixes.prefix_blocks(lambda h, _ns, _bs: self.index.match(h))
                                if self.use_index else None)
        for p in plans:
            self.migrator.start(p, self.by_id[p.src], self.by_id[p.dst], now)

    def _may_receive(self, s: InstanceLoad) -> bool:
        """Could `s` be a load-balancing destination (policy.migration's filter, before room and
        in-flight limits)? False for all instances means the round can plan nothing but drains."""
        cfg = self.policy
        return (not s.draining and s.num_waiting == 0 and not s.full
                and freeness(s, cfg=cfg) > cfg.migrate_in_above)

    def _sample(self, _: Any, now: float) -> None:
        if self.done >= len(self.trace):
            return
        self.schedule(now + self.cfg.sample_interval_s, self._sample, None)
        free = total = 0
        blocked = False
        for inst in self.live:
            b = inst.engine.blocks
            free += b.num_free
            total += b.num_blocks
            blocked = blocked or inst.blocked()
        self.frag.sample(free, total, blocked)
        if now - self.last_progress_s > STALL_S:
            raise RuntimeError(f"simulation stalled: no token for {STALL_S:g} virtual s, "
                               f"{len(self.trace) - self.done} requests unfinished")

    def _scale(self, _: Any, now: float) -> None:
        if self.done >= len(self.trace):
            return
        self.schedule(now + self.cfg.scale_check_s, self._scale, None)
        act = scaling_decision([i.report for i in self.live], self.policy, now, self.last_scale_s,
                               starting=len(self.starting), last_joined_s=self.last_joined_s,
                               retiring=[i.id for i in self.live if i.draining])
        if act is None:
            return
        self.last_scale_s = now
        if act.kind == "cancel":
            inst = self.by_id[act.instance_id]  # type: ignore[index]
            inst.draining = False
            inst.take_report(now)
            self.scale_actions.append((now, "undrain", inst.id))
            self._retry_pending(now)
        elif act.kind == "up":
            inst = self._new_instance(now, now + self.cfg.startup_s)
            self.starting.append(inst)
            self.scale_actions.append((now, "start", inst.id))
            self.schedule(inst.ready_s, self._ready, inst)
        else:
            inst = self.by_id[act.instance_id]  # type: ignore[index]
            inst.draining = True
            inst.take_report(now)
            self.scale_actions.append((now, "drain", inst.id))
            self.settled(inst, now)

    # ---- the run -----------------------------------------------------------------------------------

    def run(self) -> SimResult:
        t0 = time.perf_counter()
        n0 = self.cfg.instances
        if self.cfg.scaling:
            n0 = min(max(n0, self.policy.min_instances), self.policy.max_instances)
        for _ in range(n0):
            inst = self._new_instance(0.0, 0.0)
            self.live.append(inst)
        if self.policy.migrate or self.cfg.scaling or self.pd:
            self.schedule(self.policy.migration_interval_s, self._round, None)
        if self.cfg.scaling:
            self.schedule(self.cfg.scale_check_s, self._scale, None)
        self.schedule(self.cfg.sample_interval_s, self._sample, None)
        trace, heap, n = self.trace, self._heap, len(self.trace)
        i = 0
        while self.done < n:
            nxt = trace[i].arrival_s if i < n else math.inf
            if heap and heap[0][0] <= nxt:
                t, _, fn, arg = heapq.heappop(heap)
                self.now = t
                fn(arg, t)
            elif i < n:
                self.now = nxt
                self._arrive(i, trace[i], nxt)
                i += 1
            else:
                raise RuntimeError(f"simulation stalled with {n - self.done} unfinished requests")
        return self._result(time.perf_counter() - t0)

    def _result(self, wall_s: float) -> SimResult:
        end = self.now
        lifetimes = [(i.id, i.started_s, i.stopped_s if i.stopped_s is not None else end) for i in self.instances]
        records = list(self.records.values())
        s = summarize(records, slo=self.slo)
        s["instance_seconds"] = instance_seconds((a, b) for _, a, b in lifetimes)
        s["instances"] = {"started": len(self.instances), "at_end": len(self.live),
                          "max_live": self._max_live(lifetimes)}
        s["fragmentation"] = self.frag.result()
        s["migration"] = self.migrator.stats.to_dict()
        s["engine_preemptions"] = sum(i.engine.scheduler.num_preemptions for i in self.instances)
        s["steps"] = sum(i.steps for i in self.instances)
        if self.reuse:
            p = dict(self.prefix)
            hit = sum(i.engine.scheduler.prefix_hit_tokens for i in self.instances)
            query = sum(i.engine.scheduler.prefix_query_tokens for i in self.instances)
            total = max(1, p["prompt_tokens"])
            # hit_rate: prompt tokens the engines actually reused (preempted and re-admitted
            # requests look up again, so this counts re-admissions too) / prompt tokens dispatched.
            p.update(engine_hit_tokens=hit, engine_query_tokens=query, hit_rate=hit / max(1, query),
                     oracle_hit_rate=p["oracle_hit_tokens"] / total, dispatch_hit_rate=p["dispatch_hit_tokens"] / total)
            s["prefix"] = p
        s["virtual_s"] = end
        s["wall_s"] = wall_s
        if self.cfg.scaling:
            s["scale_actions"] = len(self.scale_actions)
        if self.pd:
            s["pd"] = dict(self.handoffs)
        return SimResult(records, s, lifetimes, wall_s)

    @staticmethod
    def _max_live(lifetimes: list[tuple[str, float, float]]) -> int:
        events = sorted([(a, 1) for _, a, _ in lifetimes] + [(b, -1) for _, _, b in lifetimes])
        best = cur = 0
        for _, d in events:
            cur += d
            best = max(best, cur)
        return best


def simulate(trace: Sequence[TraceRequest], policy: PolicyConfig, config: SimConfig | None = None,
             slo: SLO | None = None) -> SimResult:
    """Run one simulation (see ClusterSim)."""
    return ClusterSim(trace, policy, config, slo).run()
