"""The global scheduler (DESIGN §2): worker registry, load reports, heartbeats, dispatch, migration, ctl.

Modules, one job each:
- `load`: LoadReport (+ registration) → policy.InstanceLoad, the policy's view of an instance.
- `registry`: the soft state, workers by id (registration, latest report, liveness, draining).
- `commands`: one DEALER per worker to its control endpoint (Ping heartbeats, Drain, MigrateCommand).
- `migrations`: the book of migrations in flight and of recent results (pure bookkeeping).
- `migrator`: ctl migrate, the periodic drain round (policy.plan_migrations), MigrationResult.
- `handlers`: one method per inbound message type; dispatch and status.
- `main`: the process: ROUTER socket, timers, signals, the READY line.

Soft state only: after a restart everything is rebuilt from the workers' next messages (an unknown
worker's LoadReport or Heartbeat is answered ErrorReply(not_found), and the worker registers again).
"""
