"""The scheduling policy: pure functions over instance load snapshots (no I/O).

The live global scheduler and the offline simulator call the very same functions.
"""

from policy.dispatch import DispatchState, dispatch
from policy.freeness import freeness, virtual_usage
from policy.migration import PlannedMigration, migration_victim, plan_migrations
from policy.snapshot import InstanceLoad, RequestLoad

__all__ = [
    "DispatchState", "InstanceLoad", "PlannedMigration", "RequestLoad", "dispatch", "freeness",
    "migration_victim", "plan_migrations", "virtual_usage",
]
