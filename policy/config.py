"""Policy settings and the named policies every benchmark compares (design §3).

- `rr`: round-robin dispatch, no migration.
- `load`: dispatch to the freest instance, no migration (the paper's INFaaS++).
- `prefix`: dispatch to the instance holding the longest cached prefix of the prompt (ties: the
  freest), no migration (what SGLang's cache-aware router and llm-d's prefix scorer do).
- `kvferry`: cache-aware dispatch (the least prefill work among instances with room; plain
  freeness when no instance holds any of the prompt), migration for load balancing,
  de-fragmentation and draining, priority headroom.
- `kvferry-nopri`: `kvferry` without the priority headroom (high-priority requests are judged
  like the others).

Priorities: an integer, lower is served first (the engine's and vLLM's convention); a request is
"high priority" when its priority is below `high_priority_below` (default 0: negative numbers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

POLICY_NAMES = ("rr", "load", "prefix", "kvferry", "kvferry-nopri")


@dataclass(frozen=True)
class PolicyConfig:
    """Everything the pure policy functions need besides the load snapshots."""

    name: str = "kvferry"
    dispatch: str = "cache"  # rr | load (highest freeness) | prefix (longest cached prefix) | cache (policy.dispatch)
    migrate: bool = True  # migration rounds for load balancing / de-fragmentation (draining always moves)
    priority_headroom: bool = True
    high_priority_below: int = 0  # priority < this is high priority
    # An instance serving a high-priority request is kept at about this much load (tokens of KV)
    # for everything else: its memory beyond the cap counts as used (policy.freeness), so normal
    # requests keep off it and migrate away. The paper's artifact: 100 blocks of 16 tokens.
    priority_load_cap_tokens: int = 1600
    # Cache-aware dispatch weighs prefill work only among instances at least this free, or, when
    # none is, within `affinity_freeness_band` of the freest, so a hot prefix cannot pile every
    # request on one instance while others have room, and affinity still counts in a busy cluster.
    affinity_min_freeness: float = 10.0
    affinity_freeness_band: float = 30.0
    migrate_out_below: float = 3.0  # freeness below this: a migration source
    migrate_in_above: float = 30.0  # freeness above this: a migration destination
    # A migration goes, among destinations at least (1 - band) x as free as the freest, to the one
    # caching most of the request's prompt (its KV there is linked, not sent).
    migration_affinity_band: float = 0.25
    migration_interval_s: float = 0.05
    # A draining instance's running requests move off by migration. False: they finish where they
    # are (a system without migration, e.g. the paper's INFaaS++ baseline under auto-scaling).
    drain_migrates: bool = True
    max_migrations_per_instance: int = 1
    # Scaling: keep the average freeness within [scale_up_below, scale_down_above].
    scale_up_below: float = 10.0
    scale_down_above: float = 60.0
    scale_interval_s: float = 10.0
    min_instances: int = 1
    max_instances: int = 1
    # Prefill/decode disaggregation (policy.pd): "off" (every instance mixed), "fixed" (the
    # configured roles), "adaptive" (decode instances lend themselves to prefill under a backlog).
    pd_mode: str = "off"
    pd_prefill_backlog_tokens: int = 8192  # queued prefill tokens per prefill instance that call for help
    pd_decode_room: float = 30.0  # ... lent only while the decode instances are this free on average
    pd_role_interval_s: float = 2.0

    def is_high(self, priority: int) -> bool:
        return priority < self.high_priority_below

    def replace(self, **changes: object) -> "PolicyConfig":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def named_policy(name: str, **overrides: object) -> PolicyConfig:
    """The PolicyConfig of a named policy, with `overrides` (thresholds, scaling bounds) applied."""
    presets = {
        "rr": dict(dispatch="rr", migrate=False, priority_headroom=False),
        "load": dict(dispatch="load", migrate=False, priority_headroom=False),
        "prefix": dict(dispatch="prefix", migrate=False, priority_headroom=False),
        "kvferry": dict(dispatch="cache", migrate=True, priority_headroom=True),
        "kvferry-nopri": dict(dispatch="cache", migrate=True, priority_headroom=False),
    }
    if name not in presets:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(POLICY_NAMES)})")
    return PolicyConfig(name=name, **presets[name]).replace(**overrides)  # type: ignore[arg-type]
