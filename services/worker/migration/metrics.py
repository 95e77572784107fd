"""The worker's migration metrics (Prometheus, a registry per worker).

Counters by role ("out": this worker is the source, "in": the destination) and abort reason,
the source-measured downtime (request out of the source's batch → destination committed),
KV bytes moved per data path, and pre-copy stages per committed migration.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

DOWNTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
STAGE_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 16)


class MigrationMetrics:
    """Counters and histograms of one worker's migrations; `render()` gives the text format."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.started = Counter("kvferry_migrations_started", "Migrations started, by role (out: source, in: "
                               "destination)", ["role"], registry=r)
        self.committed = Counter("kvferry_migrations_committed", "Migrations committed, by role", ["role"],
                                 registry=r)
        self.aborted = Counter("kvferry_migrations_aborted", "Migrations aborted, by role and reason",
                               ["role", "reason"], registry=r)
        self.downtime = Histogram("kvferry_migration_downtime_seconds", "Time a migrated request was out of "
                                  "every batch (source detach to destination commit)", buckets=DOWNTIME_BUCKETS,
                                  registry=r)
        self.bytes = Counter("kvferry_migration_bytes", "KV bytes sent by migrations, by data path", ["path"],
                             registry=r)
        self.blocks_skipped = Counter("kvferry_migration_blocks_skipped", "KV blocks committed migrations did not "
                                      "send: the destination's prefix cache held them", registry=r)
        # At 0 from the start, so that rate() and increase() see the first migration of each role and
        # path (a series first scraped at 1 shows no increase). Abort reasons start with their first.
        for role in ("out", "in"):
            self.started.labels(role=role)
            self.committed.labels(role=role)
        for path in ("shm", "frames"):  # kv_transfer's data paths (sender.name)
            self.bytes.labels(path=path)
        self.stages = Histogram("kvferry_migration_stages", "Copy stages per committed migration (the last "
                                "stop-and-copy stage included)", buckets=STAGE_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when absent), e.g. value("kvferry_migrations_committed_total", role="out")."""
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v
