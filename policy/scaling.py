"""Auto-scaling (design §3): keep the cluster's freeness between two thresholds, with a minimum
interval between actions.

The cluster's freeness is pooled, as the paper's artifact computes it: the serving instances'
memory minus what their requests hold and what their queued requests need, over all their
requests, running and queued (F = (sum M - sum used - sum queued demand) / (sum running + sum
queued)), not the mean of per-instance freeness, in which one idle instance (F = M, hundreds of
blocks) outweighs fifteen busy ones. Queued work counts whole: a cluster whose queues grow reads
as full however much memory sits free next to them (fragmented, or on the wrong instances), which
is where dispatch without migration loses capacity. The priority load cap does not count here:
it reserves memory, it does not use it. Below `scale_up_below`: start an instance (up to `max_instances`).
Above `scale_down_above` even without the instance that would go (its memory removed, its load kept):
drain that instance, the one with the fewest requests (down to `min_instances`); the caller stops a
draining instance once it is empty. Testing the cluster as it would be after the drain keeps a
scale-in from taking the cluster straight back under `scale_up_below` (a start/drain flap).
Pure: the caller passes the time and the last action's time.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from policy.config import PolicyConfig
from policy.snapshot import InstanceLoad


@dataclass(frozen=True)
class ScaleAction:
    """`up`: start one instance; `down`: drain `instance_id` (stop it once it is empty); `cancel`:
    stop draining `instance_id`, retiring for a scale-in, and serve with it again (what the cluster
    needs now, at once, instead of an instance that takes a start-up to serve)."""

    kind: str  # up | down
    instance_id: str | None = None
    average_freeness: float = 0.0


def average_freeness(instances: Sequence[InstanceLoad], cfg: PolicyConfig, without: str | None = None) -> float:
    """The pooled freeness of the live, non-draining instances (-inf when there is none): their
    memory minus their virtual usages over their running requests (at least 1), so an idle
    cluster reads as very free. `without`: as if that instance's memory were gone and its load
    stayed on the others (what a scale-in would leave)."""
    serving = [i for i in instances if i.alive and not i.draining]
    if not serving:
        return -math.inf
    total = sum(i.total_blocks for i in serving if i.instance_id != without)
    usage = sum(i.used_blocks + queued_blocks(i) for i in serving)
    batch = sum(i.num_running + i.num_waiting for i in serving)
    return (total - usage) / max(1, batch)


def queued_blocks(inst: InstanceLoad) -> int:
    """What an instance's queued requests need: their prompt tokens still to prefill in blocks
    (at least the head of the line's demand, for reports that carry no queued tokens)."""
    return max(inst.head_of_line_blocks, -(-inst.queued_prefill_tokens // max(1, inst.block_size)))


def scaling_decision(instances: Sequence[InstanceLoad], cfg: PolicyConfig, now_s: float,
                     last_action_s: float = -math.inf, starting: int = 0,
                     last_joined_s: float = -math.inf, retiring: Collection[str] = ()) -> ScaleAction | None:
    """The action to take now, or None. `starting`: instances started but not reporting yet
    (they count towards `max_instances`, and no second one is started meanwhile). `retiring`:
    the instances draining for a scale-in; when the cluster needs one more, the first of them
    still alive is taken back (`cancel`) rather than a new one started (the paper's artifact
    does the same).
    `last_joined_s`: when the newest instance began serving. The next decision waits a full
    interval after that too, so it sees what the new instance took on: an instance that just
    joined is empty and reads as wholly free (F = M), which alone would lift the average over
    `scale_down_above` and drain that very instance (a start/drain flap that, measured on the
    paper's Fig 15 trace, held the cluster at 3 instances while 1,400 requests queued)."""
    if now_s - max(last_action_s, last_joined_s) < cfg.scale_interval_s:
        return None
    serving = [i for i in instances if i.alive and not i.draining]
    avg = average_freeness(instances, cfg)
    if avg < cfg.scale_up_below or not serving:
        back = next((i.instance_id for i in instances if i.alive and i.draining and i.instance_id in retiring), None)
        if back is not None:
            return ScaleAction("cancel", back, avg)
        if len(serving) + starting < cfg.max_instances and not starting:
            return ScaleAction("up", None, avg)
        return None
    if avg > cfg.scale_down_above and len(serving) > cfg.min_instances and not any(i.draining for i in instances):
        victim = min(serving, key=lambda i: (i.num_running + i.num_waiting, i.used_blocks, i.instance_id))
        if average_freeness(instances, cfg, without=victim.instance_id) > cfg.scale_down_above:
            return ScaleAction("down", victim.instance_id, avg)
    return None
