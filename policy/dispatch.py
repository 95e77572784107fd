"""Dispatch: which instance gets a new request (design §3, §4).

- `rr`: round-robin.
- `load`: the highest freeness. With a PolicyConfig that has priority headroom, a high-priority
  request judges instances by high-priority load (ties broken by overall freeness).
- `prefix`: the instance holding the longest cached prefix of the prompt, ties by freeness (a
  baseline: cache hits alone, however loaded the instance).
- `cache` (the `kvferry` policies): prefill work balanced with freeness. An instance i with
  freeness F_i (as `load` computes it) whose cache holds m_i leading blocks of the prompt would
  cost the request

      cost_i = (P - hit_i) + Q_i,    hit_i = min(m_i * block_size, P - 1)

  prompt tokens of prefill before its first token: its own uncached tokens plus the prefill
  queued there (Q_i: the instance's last report plus what was dispatched to it since). Only
  instances with F_i >= min(affinity_min_freeness, max_j F_j - affinity_freeness_band) are
  weighed, so a hot prefix cannot pile requests on one instance while others have room; when
  none has that much room (a busy cluster), every instance close to the freest competes on cost,
  so a conversation keeps finding its history instead of going to whichever instance is
  momentarily freest (and recomputing it, which makes a busy cluster busier). The least cost
  wins, ties by freeness. With no hit anywhere this is exactly `load`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from policy.config import POLICY_NAMES, PolicyConfig, named_policy
from policy.freeness import freeness
from policy.pd import dispatch_candidates
from policy.snapshot import InstanceLoad

POLICIES = POLICY_NAMES


@dataclass
class DispatchState:
    """What dispatch remembers between calls: the round-robin cursor, and the requests sent to
    each instance since its last report (so a burst does not all land on one instance)."""

    rr_cursor: int = 0
    since_report: dict[str, int] = field(default_factory=dict)
    blocks_since_report: dict[str, int] = field(default_factory=dict)
    prefill_since_report: dict[str, int] = field(default_factory=dict)  # uncached prompt tokens

    def on_report(self, instance_id: str) -> None:
        self.since_report.pop(instance_id, None)
        self.blocks_since_report.pop(instance_id, None)
        self.prefill_since_report.pop(instance_id, None)

    def on_dispatch(self, instance_id: str, blocks: int, prefill_tokens: int = 0) -> None:
        self.since_report[instance_id] = self.since_report.get(instance_id, 0) + 1
        self.blocks_since_report[instance_id] = self.blocks_since_report.get(instance_id, 0) + blocks
        if prefill_tokens:
            self.prefill_since_report[instance_id] = self.prefill_since_report.get(instance_id, 0) + prefill_tokens


def eligible(instances: Sequence[InstanceLoad]) -> list[InstanceLoad]:
    return [i for i in instances if i.alive and not i.draining and not i.full]


def hit_tokens(cached_blocks: int, prompt_tokens: int, block_size: int) -> int:
    """Prompt tokens an instance holding `cached_blocks` leading blocks would not prefill: a
    prefill computes at least the last prompt token (to sample from it)."""
    return max(0, min(cached_blocks * block_size, prompt_tokens - 1))


def dispatch(policy: str | PolicyConfig, instances: Sequence[InstanceLoad], state: DispatchState,
             demand_blocks: int = 1, priority: int = 0, *, prompt_tokens: int = 0,
             cached_blocks: Mapping[str, int] | None = None, block_size: int = 16) -> str | None:
    """The instance id for a new request needing `demand_blocks` blocks, or None if no instance
    can take it. `policy`: a PolicyConfig or a policy name. `cached_blocks`: instance id → how many
    leading blocks (of `block_size` tokens) of the request's `prompt_tokens`-token prompt it holds
    (policy.PrefixIndex.match); absent instances hold none. Updates `state` with the choice."""
    cfg = policy if isinstance(policy, PolicyConfig) else named_policy(policy)
    cands = sorted(dispatch_candidates(eligible(instances), cfg), key=lambda i: i.instance_id)
    if not cands:
        return None
    hits = {i.instance_id: hit_tokens(cached_blocks.get(i.instance_id, 0), prompt_tokens, block_size)
            for i in cands} if cached_blocks else {}
    if cfg.dispatch == "rr":
        choice = cands[state.rr_cursor % len(cands)]
        state.rr_cursor += 1
    elif cfg.dispatch in ("load", "prefix", "cache"):
        high = cfg.priority_headroom and cfg.is_high(priority)

        def free(i: InstanceLoad) -> tuple[float, float]:
            n = state.since_report.get(i.instance_id, 0)
            each = state.blocks_since_report.get(i.instance_id, 0) // n if n else 0
            f = freeness(i, n, each, cfg=cfg, high=high)
            # A high-priority request's ties (e.g. no high-priority load anywhere: every F_high is
            # M) go to the instance with the most room overall, not to the lowest id however busy.
            return (f, freeness(i, n, each, cfg=cfg) if high else f)
        scores = {i.instance_id: free(i) for i in cands}
        # max()/min() keep the first of equals: ties go to the lowest id (deterministic).
        if cfg.dispatch == "load" or not any(hits.values()):
            choice = max(cands, key=lambda i: scores[i.instance_id])
        elif cfg.dispatch == "prefix":
            choice = max(cands, key=lambda i: (hits[i.instance_id], scores[i.instance_id]))
        else:
            best = max(s[0] for s in scores.values())
            floor = min(cfg.affinity_min_freeness, best - cfg.affinity_freeness_band)
            room = [i for i in cands if scores[i.instance_id][0] >= floor]

            def cost(i: InstanceLoad) -> int:
                queued = i.queued_prefill_tokens + state.prefill_since_report.get(i.instance_id, 0)
                return prompt_tokens - hits[i.instance_id] + queued
            choice = min(room, key=lambda i: (cost(i), tuple(-x for x in scores[i.instance_id])))
    else:
        raise ValueError(f"unknown dispatch kind {cfg.dispatch!r}")
    state.on_dispatch(choice.instance_id, demand_blocks, max(0, prompt_tokens - hits.get(choice.instance_id, 0)))
    return choice.instance_id
