"""Virtual usage and freeness (design §3).

Freeness F = (M - sum(V)) / B: roughly how many more decode steps the batch can take before the
instance's memory runs out (in blocks per running request). Virtual usage V makes load that is
not yet physical count:
- running requests: their physical blocks;
- the head-of-line queued request: its whole demand (an instance whose queue is blocked looks
  loaded, so load moves away); other queued requests: 0;
- an instance serving a high-priority request (with `cfg.priority_headroom`): everything beyond
  `priority_load_cap_tokens` of its memory (the paper's artifact: M - 100 blocks), so it reads as
  full once it holds that much, normal requests keep off it and its normal requests migrate
  away: its batch stays small and its steps fast;
- a draining (or dead) instance: one fake request of infinite usage (F = -inf).

A high-priority request judges instances the other way round (`high=True`): one that already
serves high-priority work by its plain freeness (its memory is kept for them), one that does not
as if it were capped (M = the cap), so high-priority requests gather on the few instances kept
light instead of capping every instance in the cluster, and a new one is opened only when those
fill up. Without `cfg.priority_headroom` nobody is capped.
"""

from __future__ import annotations

import math

from policy.config import PolicyConfig
from policy.snapshot import InstanceLoad


def serves_high(inst: InstanceLoad, cfg: PolicyConfig | None) -> bool:
    return cfg is not None and cfg.priority_headroom and any(cfg.is_high(r.priority) for r in inst.requests)


def cap_blocks(inst: InstanceLoad, cfg: PolicyConfig) -> int:
    """The priority load cap in the instance's blocks (at most its memory)."""
    return min(inst.total_blocks, -(-cfg.priority_load_cap_tokens // max(1, inst.block_size)))


def headroom_blocks(inst: InstanceLoad, cfg: PolicyConfig | None) -> float:
    """The memory an instance keeps for its high-priority requests: all beyond the load cap while it
    serves one (0 otherwise)."""
    if not serves_high(inst, cfg):
        return 0.0
    assert cfg is not None
    return float(inst.total_blocks - cap_blocks(inst, cfg))


def virtual_usage(inst: InstanceLoad, extra_requests: int = 0, extra_blocks_each: int = 0, *,
                  cfg: PolicyConfig | None = None, high: bool = False) -> float:
    """Sum of the virtual usages of an instance's requests, in blocks.

    `extra_requests` counts requests dispatched to the instance since its last report, each
    assumed to need `extra_blocks_each` blocks. With `high`, as a high-priority request sees it:
    no headroom where high-priority work is served, the cap's worth where none is (see the
    module docstring)."""
    if inst.draining or not inst.alive:
        return math.inf
    usage = inst.used_blocks + inst.head_of_line_blocks + extra_requests * extra_blocks_each
    if not high:
        return usage + headroom_blocks(inst, cfg)
    if cfg is None or not cfg.priority_headroom or serves_high(inst, cfg):
        return float(usage)
    return usage + float(inst.total_blocks - cap_blocks(inst, cfg))


def freeness(inst: InstanceLoad, extra_requests: int = 0, extra_blocks_each: int = 0, *,
             cfg: PolicyConfig | None = None, high: bool = False) -> float:
    """F = (M - sum V) / B, with B the batch size (running requests plus those dispatched since the
    last report, at least 1); `high`: as a high-priority request judges the instance."""
    usage = virtual_usage(inst, extra_requests, extra_blocks_each, cfg=cfg, high=high)
    if math.isinf(usage):
        return -math.inf
    return (inst.total_blocks - usage) / max(1, inst.num_running + extra_requests)
