"""Auto-scaling (design §3): keep the average freeness of the serving instances between two
thresholds, with a minimum interval between actions.

Below `scale_up_below`: start an instance (up to `max_instances`). Above `scale_down_above`:
drain the instance with the fewest requests (down to `min_instances`); the caller stops a
draining instance once it is empty. Pure: the caller passes the time and the last action's time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from policy.config import PolicyConfig
from policy.freeness import freeness
from policy.snapshot import InstanceLoad


@dataclass(frozen=True)
class ScaleAction:
    """`up`: start one instance; `down`: drain `instance_id` (stop it once it is empty)."""

    kind: str  # up | down
    instance_id: str | None = None
    average_freeness: float = 0.0


def average_freeness(instances: Sequence[InstanceLoad], cfg: PolicyConfig) -> float:
    """Mean freeness of the live, non-draining instances (-inf when there is none). An idle instance
    counts its whole memory (F = M), so an empty cluster reads as very free."""
    fs = [freeness(i, cfg=cfg) for i in instances if i.alive and not i.draining]
    return sum(fs) / len(fs) if fs else -math.inf


def scaling_decision(instances: Sequence[InstanceLoad], cfg: PolicyConfig, now_s: float,
                     last_action_s: float = -math.inf, starting: int = 0,
                     last_joined_s: float = -math.inf) -> ScaleAction | None:
    """The action to take now, or None. `starting`: instances started but not reporting yet
    (they count towards `max_instances`, and no second one is started meanwhile).
    `last_joined_s`: when the newest instance began serving. The next decision waits a full
    interval after that too, so it sees what the new instance took on: an instance that just
    joined is empty and reads as wholly free (F = M), which alone would lift the average over
    `scale_down_above` and drain that very instance (a start/drain flap that, measured on the
    paper's Fig 15 trace, held the cluster at 3 instances while 1,400 requests queued)."""
    if now_s - max(last_action_s, last_joined_s) < cfg.scale_interval_s:
        return None
    serving = [i for i in instances if i.alive and not i.draining]
    avg = average_freeness(instances, cfg)
    if (avg < cfg.scale_up_below or not serving) and len(serving) + starting < cfg.max_instances and not starting:
        return ScaleAction("up", None, avg)
    if avg > cfg.scale_down_above and len(serving) > cfg.min_instances and not any(i.draining for i in instances):
        victim = min(serving, key=lambda i: (i.num_running + i.num_waiting, i.used_blocks, i.instance_id))
        return ScaleAction("down", victim.instance_id, avg)
    return None
