"""Virtual usage and freeness (DESIGN §3).

Freeness F = (M - sum(V)) / B: roughly how many more decode steps the batch can take before the
instance's memory runs out. Virtual usage V makes load that is not yet physical count:
the head-of-line queued request counts its whole demand, so an instance whose queue is blocked
looks loaded; a draining instance counts as infinitely loaded.
"""

from __future__ import annotations

import math

from policy.snapshot import InstanceLoad


def virtual_usage(inst: InstanceLoad, extra_requests: int = 0, extra_blocks_each: int = 0) -> float:
    """Sum of the virtual usages of an instance's requests, in blocks.

    `extra_requests` counts requests dispatched to the instance since its last report, each
    assumed to need `extra_blocks_each` blocks.
    """
    if inst.draining or not inst.alive:
        return math.inf
    return inst.used_blocks + inst.head_of_line_blocks + extra_requests * extra_blocks_each


def freeness(inst: InstanceLoad, extra_requests: int = 0, extra_blocks_each: int = 0) -> float:
    """F = (M - sum V) / B, with B the batch size (running requests, at least 1)."""
    usage = virtual_usage(inst, extra_requests, extra_blocks_each)
    if math.isinf(usage):
        return -math.inf
    batch = max(1, inst.num_running + extra_requests)
    return (inst.total_blocks - usage) / batch
