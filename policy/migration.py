"""Migration planning (design §3): which running requests move where, from load snapshots alone.

Pure code, no I/O and no clock, so the live scheduler and the offline simulator run the same plan.

Sources are the draining instances (design §3: a draining instance counts as infinitely loaded,
so everything moves off it; not with `drain_migrates` off, where their requests finish in place) and, when the policy migrates (`PolicyConfig.migrate`), instances
whose freeness is below `migrate_out_below` or whose queue is blocked (queued or preempted
work): the most loaded first. Each source is paired with the freest live, non-draining,
compatible destination that has room for the request (for load balancing: whose freeness is
above `migrate_in_above` and whose queue is empty), counting what this round already sent there.

Cache affinity (`prefix_blocks`, design §4): among the destinations whose freeness is within
`migration_affinity_band` of the freest one (F_d >= (1 - band) * F_best), the one caching the
most leading blocks of the victim's prompt is chosen (ties: the freer). Its room check counts only
the blocks it lacks: the cached ones are linked into the reservation, not sent.

Only running requests are planned: a queued request holds no KV to move and runs on its draining
instance in time (it is then moved like the others).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from policy.config import PolicyConfig
from policy.pd import hands_off, takes_decode
from policy.freeness import freeness, serves_high
from policy.snapshot import InstanceLoad, RequestLoad


@dataclass(frozen=True)
class PlannedMigration:
    """Move `request_id` (None: the source picks) from instance `src` to instance `dst`."""

    src: str
    dst: str
    request_id: str | None
    reason: str = "drain"


def migration_victim(requests: Iterable[RequestLoad], exclude: Collection[str] = ()) -> RequestLoad | None:
    """The request a source gives up first: the lowest priority (the largest priority number, since
    lower numbers are served first), then the shortest context (the cheapest to move), then by id."""
    cands = [r for r in requests if r.running and r.request_id not in exclude]
    return min(cands, key=lambda r: (-r.priority, r.num_tokens, r.request_id), default=None)


def is_overloaded(inst: InstanceLoad, cfg: PolicyConfig) -> bool:
    """A load-balancing source: low freeness, or a blocked queue (its head-of-line request does
    not fit in the free blocks; a request that merely arrived since the last step does not count).
    An instance over its priority load cap with only high-priority requests running is not one:
    the cap moves normal requests away, not the requests it is kept for."""
    blocked = inst.num_waiting > 0 and inst.head_of_line_blocks > inst.free_blocks
    if inst.num_running == 0:
        return False
    if blocked:
        return True
    if freeness(inst, cfg=cfg) >= cfg.migrate_out_below:
        return False
    if serves_high(inst, cfg):
        high_running = sum(1 for r in inst.requests if r.running and cfg.is_high(r.priority))
        if high_running >= inst.num_running:
            return freeness(inst, cfg=cfg.replace(priority_headroom=False)) < cfg.migrate_out_below
    return True


def migration_sources(instances: Iterable[InstanceLoad], cfg: PolicyConfig | None = None) -> list[InstanceLoad]:
    """Instances to move requests off: draining ones (most running requests first), then, with a
    migrating policy, overloaded ones (least free first); ties by id."""
    insts = [i for i in instances if i.alive and i.num_running > 0]
    drains = sorted((i for i in insts if i.draining and (cfg is None or cfg.drain_migrates)),
                    key=lambda i: (-i.num_running, i.instance_id))
    if cfg is None or not cfg.migrate:
        return drains
    # A prefill instance's requests leave by hand-off (policy.pd), not by load balancing.
    loaded = sorted((i for i in insts if not i.draining and not hands_off(i, cfg) and is_overloaded(i, cfg)),
                    key=lambda i: (freeness(i, cfg=cfg), i.instance_id))
    return drains + loaded


def compatible(layouts: Mapping[str, Hashable] | None, a: str, b: str) -> bool:
    """Two instances can exchange KV blocks only with equal layouts (block size, bytes per block,
    engine); `layouts` None means all are compatible. An instance without a layout pairs with none."""
    if layouts is None:
        return True
    la = layouts.get(a)
    return la is not None and la == layouts.get(b)


def plan_migrations(instances: Sequence[InstanceLoad], in_flight: Iterable[tuple[str, str]] = (), *,
                    max_per_instance: int = 1, layouts: Mapping[str, Hashable] | None = None,
                    busy_requests: Collection[str] = (), cfg: PolicyConfig | None = None,
                    prefix_blocks: Callable[[str, str], int] | None = None) -> list[PlannedMigration]:
    """The migrations to start now.

    `in_flight`: the (src, dst) pair of every migration not yet finished (repeats count); at most
    `max_per_instance` migrations go out of, and at most that many into, each instance.
    `layouts`: instance id → KV layout key (see `compatible`). `busy_requests`: request ids not to
    plan (already migrating, or just moved and the source has not reported since).
    A source's request is named when its snapshot lists requests, else left to the source (None).
    `prefix_blocks(request_id, instance_id)`: how many leading blocks of the request's prompt the
    instance caches (None: no cache affinity). The destination's engine makes the real room check
    when it reserves (a cached block nobody uses counts as free there, and linking it takes it).
    """
    if max_per_instance <= 0:
        return []
    out_n: Counter[str] = Counter()
    in_n: Counter[str] = Counter()
    for src, dst in in_flight:
        out_n[src] += 1
        in_n[dst] += 1
    dests = {i.instance_id: i for i in instances if i.alive and not i.draining and takes_decode(i, cfg)}
    taken = set(busy_requests)
    plans: list[PlannedMigration] = []
    for src in migration_sources(instances, cfg):
        sid = src.instance_id
        balance = not src.draining  # a load-balancing move, not a drain
        while out_n[sid] < max_per_instance:
            victim = migration_victim(src.requests, taken) if src.requests else None
            if src.requests and victim is None:
                break  # every running request listed is already on its way
            need = victim.num_blocks if victim is not None else 0
            held = None
            if prefix_blocks is not None and victim is not None:
                rid = victim.request_id
                held = lambda iid, rid=rid, n=need: min(n, max(0, prefix_blocks(rid, iid)))  # noqa: E731
            dst = _freest(dests.values(), sid, in_n, max_per_instance, layouts, need, cfg if balance else None,
                          held=held, band=cfg.migration_affinity_band if cfg is not None else 0.25)
            if dst is None:
                break
            need -= held(dst.instance_id) if held is not None else 0
            plans.append(PlannedMigration(sid, dst.instance_id, victim.request_id if victim else None,
                                          "load" if balance else "drain"))
            out_n[sid] += 1
            in_n[dst.instance_id] += 1
            if victim is not None:
                taken.add(victim.request_id)
            # Count the request on its destination now: the next pick sees it as less free.
            dests[dst.instance_id] = dataclasses.replace(
                dst, free_blocks=max(0, dst.free_blocks - need), num_running=dst.num_running + 1)
    return plans


def _freest(cands: Iterable[InstanceLoad], src: str, in_n: Counter[str], limit: int,
            layouts: Mapping[str, Hashable] | None, need_blocks: int,
            balance: PolicyConfig | None = None, held: Callable[[str], int] | None = None,
            band: float = 0.25) -> InstanceLoad | None:
    """The freest destination; for a load-balancing move (`balance`) only one above the policy's
    destination threshold with an empty queue. With `held` (instance → leading blocks of the
    request it caches): room for only the blocks it lacks, and among those within `band` of the
    freest, the one holding the most (see the module docstring)."""
    have = held if held is not None else (lambda _iid: 0)
    ok = [d for d in cands
          if d.instance_id != src and in_n[d.instance_id] < limit and not d.full
          and d.free_blocks >= need_blocks - have(d.instance_id) and compatible(layouts, src, d.instance_id)
          and (balance is None or (d.num_waiting == 0 and freeness(d, cfg=balance) > balance.migrate_in_above))]
    if not ok:
        return None
    score = {d.instance_id: freeness(d, cfg=balance) for d in ok}
    ordered = sorted(ok, key=lambda d: d.instance_id)
    # max() keeps the first of equals: ties go to the lowest id (deterministic).
    best = max(ordered, key=lambda d: score[d.instance_id])
    if held is None:
        return best
    top = score[best.instance_id]
    floor = top - band * abs(top) if math.isfinite(top) else top
    near = [d for d in ordered if score[d.instance_id] >= floor]
    return max(near, key=lambda d: (have(d.instance_id), score[d.instance_id]))
