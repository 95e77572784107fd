"""The global scheduler (design §2): worker registry, load reports, heartbeats, dispatch, migration,
scaling, ctl.

Modules, one job each:
- `load`: LoadReport (+ registration) → policy.InstanceLoad, the policy's view of an instance.
- `registry`: the soft state, workers by id (registration, latest report, liveness, draining).
- `commands`: one DEALER per worker to its control endpoint (Ping heartbeats, Drain, MigrateCommand).
- `migrations`: the book of migrations in flight and of recent results (pure bookkeeping).
- `migrator`: ctl migrate, the periodic migration round (policy.plan_migrations: drains, and load
  balancing with the kvferry policies), MigrationResult.
- `scaler`: auto-scaling decisions (policy.scaling_decision), scale-in drains, ScaleQuery → ScaleAdvice.
- `handlers`: one method per inbound message type; dispatch (with the request's priority) and status.
- `main`: the process: ROUTER socket, timers, signals, the READY line.
- `process`: its flags and entry point (`kvferry scheduler`, `python -m services.scheduler`).
- `client`: asking the running scheduler from outside (`kvferry ctl`, `kvferry bench serve`).

Soft state only: after a restart everything is rebuilt from the workers' next messages (an unknown
worker's LoadReport or Heartbeat is answered ErrorReply(not_found), and the worker registers again).
"""
