"""The scheduling policy: pure functions over instance load snapshots (no I/O).

The live global scheduler and the offline simulator call the very same functions.
"""

from policy.config import POLICY_NAMES, PolicyConfig, named_policy
from policy.dispatch import DispatchState, dispatch, hit_tokens
from policy.freeness import freeness, headroom_blocks, virtual_usage
from policy.prefix_index import PrefixIndex
from policy.migration import PlannedMigration, migration_victim, plan_migrations
from policy.scaling import ScaleAction, average_freeness, scaling_decision
from policy.snapshot import InstanceLoad, RequestLoad

__all__ = [
    "POLICY_NAMES", "DispatchState", "InstanceLoad", "PlannedMigration", "PolicyConfig", "PrefixIndex", "RequestLoad", "ScaleAction",
    "average_freeness", "dispatch", "freeness", "headroom_blocks", "hit_tokens", "migration_victim", "named_policy",
    "plan_migrations", "scaling_decision", "virtual_usage",
]
