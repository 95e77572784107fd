"""Virtual usage and freeness (design §3).

Freeness F = (M - sum(V)) / B: roughly how many more decode steps the batch can take before the
instance's memory runs out (in blocks per running request). Virtual usage V makes load that is
not yet physical count:
- running requests: their physical blocks;
- the head-of-line queued request: its whole demand (an instance whose queue is blocked looks
  loaded, so load moves away); other queued requests: 0;
- high-priority requests (with `cfg.priority_headroom`): their blocks plus the priority's
  headroom (`headroom_fraction` of the instance's blocks, split among them), which keeps their
  instance lightly loaded;
- a draining (or dead) instance: one fake request of infinite usage (F = -inf).
"""

from __future__ import annotations

import math

from policy.config import PolicyConfig
from policy.snapshot import InstanceLoad


def headroom_blocks(inst: InstanceLoad, cfg: PolicyConfig | None) -> float:
    """The high-priority headroom an instance carries now (0 without high-priority requests)."""
    if cfg is None or not cfg.priority_headroom:
        return 0.0
    if not any(cfg.is_high(r.priority) for r in inst.requests):
        return 0.0
    return cfg.headroom_fraction * inst.total_blocks


def virtual_usage(inst: InstanceLoad, extra_requests: int = 0, extra_blocks_each: int = 0, *,
                  cfg: PolicyConfig | None = None, high: bool = False) -> float:
    """Sum of the virtual usages of an instance's requests, in blocks.

    `extra_requests` counts requests dispatched to the instance since its last report, each
    assumed to need `extra_blocks_each` blocks. With `high`, only high-priority load counts (how a
    high-priority request judges an instance).
    """
    if inst.draining or not inst.alive:
        return math.inf
    extra = extra_requests * extra_blocks_each
    if high and cfg is not None:
        blocks = sum(r.num_blocks for r in inst.requests if cfg.is_high(r.priority))
        return blocks + headroom_blocks(inst, cfg) + extra
    return inst.used_blocks + inst.head_of_line_blocks + headroom_blocks(inst, cfg) + extra


def freeness(inst: InstanceLoad, extra_requests: int = 0, extra_blocks_each: int = 0, *,
             cfg: PolicyConfig | None = None, high: bool = False) -> float:
    """F = (M - sum V) / B, with B the batch size (running requests, at least 1); with `high`,
    over high-priority requests only."""
    usage = virtual_usage(inst, extra_requests, extra_blocks_each, cfg=cfg, high=high)
    if math.isinf(usage):
        return -math.inf
    if high and cfg is not None:
        batch = sum(1 for r in inst.requests if r.running and cfg.is_high(r.priority))
    else:
        batch = inst.num_running
    return (inst.total_blocks - usage) / max(1, batch + extra_requests)
