"""Dispatch: which instance gets a new request: round-robin (`rr`) or the highest freeness
(`load`; the policies `kvferry` and `kvferry-nopri` dispatch this way too). With a PolicyConfig
that has priority headroom, a high-priority request judges instances by high-priority load (ties
broken by overall freeness)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from policy.config import POLICY_NAMES, PolicyConfig, named_policy
from policy.freeness import freeness
from policy.snapshot import InstanceLoad

POLICIES = POLICY_NAMES


@dataclass
class DispatchState:
    """What dispatch remembers between calls: the round-robin cursor, and the requests sent to
    each instance since its last report (so a burst does not all land on one instance)."""

    rr_cursor: int = 0
    since_report: dict[str, int] = field(default_factory=dict)
    blocks_since_report: dict[str, int] = field(default_factory=dict)

    def on_report(self, instance_id: str) -> None:
        self.since_report.pop(instance_id, None)
        self.blocks_since_report.pop(instance_id, None)

    def on_dispatch(self, instance_id: str, blocks: int) -> None:
        self.since_report[instance_id] = self.since_report.get(instance_id, 0) + 1
        self.blocks_since_report[instance_id] = self.blocks_since_report.get(instance_id, 0) + blocks


def eligible(instances: Sequence[InstanceLoad]) -> list[InstanceLoad]:
    return [i for i in instances if i.alive and not i.draining and not i.full]


def dispatch(policy: str | PolicyConfig, instances: Sequence[InstanceLoad], state: DispatchState,
             demand_blocks: int = 1, priority: int = 0) -> str | None:
    """The instance id for a new request needing `demand_blocks` blocks, or None if no instance
    can take it. `policy`: a PolicyConfig or a policy name. Updates `state` with the choice."""
    cfg = policy if isinstance(policy, PolicyConfig) else named_policy(policy)
    cands = eligible(instances)
    if not cands:
        return None
    if cfg.dispatch == "rr":
        cands.sort(key=lambda i: i.instance_id)
        choice = cands[state.rr_cursor % len(cands)]
        state.rr_cursor += 1
    elif cfg.dispatch == "load":
        high = cfg.priority_headroom and cfg.is_high(priority)

        def score(i: InstanceLoad) -> tuple[float, float]:
            n = state.since_report.get(i.instance_id, 0)
            each = state.blocks_since_report.get(i.instance_id, 0) // n if n else 0
            f = freeness(i, n, each, cfg=cfg, high=high)
            # A high-priority request's ties (e.g. no high-priority load anywhere: every F_high is
            # M) go to the instance with the most room overall, not to the lowest id however busy.
            return (f, freeness(i, n, each, cfg=cfg) if high else f)
        # max() keeps the first of equals: ties go to the lowest id (deterministic).
        choice = max(sorted(cands, key=lambda i: i.instance_id), key=score)
    else:
        raise ValueError(f"unknown dispatch kind {cfg.dispatch!r}")
    state.on_dispatch(choice.instance_id, demand_blocks)
    return choice.instance_id

