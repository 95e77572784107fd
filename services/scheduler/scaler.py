"""Auto-scaling, the scheduler's side (design §3): decide, drain, and advise the pool manager.

The scheduler sees the load, so it decides (policy.scaling_decision over its snapshots: keep the
average freeness between `scale_up_below` and `scale_down_above`, at least `scale_interval_ms`
between two actions). A pool manager owns the worker processes (`kvferry up --scaling`): it polls
with ScaleQuery, listing the workers it runs, and acts on the ScaleAdvice:

- "up": the next advice says `start=1` (once); the manager starts a worker. Until that worker
  registers it counts as starting (listed by the manager, not registered), so no second one is
  asked for meanwhile.
- "down": the scheduler drains the instance with the fewest requests itself (no more dispatch; the
  migration round moves its running requests off; the worker is told, so it refuses new ones).
  Once the worker reports, draining, that it holds no request and no migration involves it, the
  advice lists it in `stop` (repeated until the manager no longer runs it); the manager stops it.

Nothing is decided while no manager has polled lately: a drained instance nobody stops would only
idle. Pure bookkeeping plus the registry and command channels; callers pass the clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from policy import PolicyConfig, ScaleAction, average_freeness, scaling_decision
from protocol import ScaleAdvice, ScaleQuery, ScalingStatus, now_ms
from services.config import SchedulerConfig
from services.log import get_logger
from services.scheduler.commands import CommandChannels
from services.scheduler.migrator import Migrator
from services.scheduler.registry import Registry

log = get_logger("kvferry.scheduler.scaling")

MANAGER_TIMEOUT_S = 5.0  # no ScaleQuery for this long: no manager, no scaling action
DRAIN_RESEND_S = 2.0  # a retiring worker whose reports do not say draining yet is told again


@dataclass
class Retiring:
    """An instance drained to be stopped once empty."""

    since: float  # monotonic seconds
    drain_sent: float


class Scaler:
    """The scaling state: the last action, a pending "up", the instances retiring, the manager."""

    def __init__(self, cfg: SchedulerConfig, policy: PolicyConfig, registry: Registry, migrator: Migrator,
                 commands: CommandChannels | None, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.policy = policy
        self.registry = registry
        self.migrator = migrator
        self.commands = commands
        self.clock = clock
        self.enabled = cfg.scaling
        self.last_action_s = -math.inf
        self.last_action = "none"
        self.last_action_ms = 0
        self.pending_up = False  # decided, not yet handed to the manager
        self.scale_ups = 0
        self.scale_downs = 0
        self.retiring: dict[str, Retiring] = {}
        self.manager_id = ""
        self.manager_heard = -math.inf
        self.managed: set[str] = set()
        self.awaited: set[str] = set()  # managed workers seen starting (listed, not serving), last tick
        self.last_joined_s = -math.inf  # when one of them last began serving (policy.scaling_decision)

    @property
    def tick_s(self) -> float:
        """How often `tick` runs: often enough that the minimum interval is what paces actions."""
        return min(0.5, self.policy.scale_interval_s / 4)

    def manager_active(self, now: float) -> bool:
        return now - self.manager_heard <= MANAGER_TIMEOUT_S

    def starting(self) -> int:
        """Workers started (or about to be) that do not serve yet."""
        alive = {r.worker_id for r in self.registry if r.alive}
        started = sum(1 for w in self.managed if w not in alive and w not in self.retiring)
        return started + (1 if self.pending_up else 0)

    def average_freeness(self) -> float:
        return average_freeness(self.registry.snapshots(), self.policy)

    # ---- the timer -------------------------------------------------------------------------------

    def tick(self) -> ScaleAction | None:
        """Decide (called every `tick_s`); returns the action taken, if any."""
        now = self.clock()
        self._resend_drains(now)
        if not self.enabled or not self.manager_active(now):
            return None
        # Dead instances neither serve nor count as draining: they only wait to be forgotten.
        live = [s for s in self.registry.snapshots() if s.alive]
        serving = {s.instance_id for s in live}
        if self.awaited & serving:
            self.last_joined_s = now
        self.awaited = self.managed - serving
        action = scaling_decision(live, self.policy, now, self.last_action_s, self.starting(),
                                  last_joined_s=self.last_joined_s, retiring=self.retiring.keys())
        if action is None:
            return None
        if action.kind == "cancel":
            wid = action.instance_id
            assert wid is not None
            self.registry.set_draining(wid, False)
            if self.commands is not None:
                self.commands.send_drain(wid, False)
            self.cancel(wid)
            self.scale_ups += 1
        elif action.kind == "down":
            wid = action.instance_id
            assert wid is not None
            if wid not in self.managed:  # its process is not the manager's to stop
                log.warning("scale.down_skipped", worker_id=wid, reason="not run by the pool manager",
                            manager_id=self.manager_id)
                return None
            self.retire(wid, now)
            self.scale_downs += 1
        else:
            self.pending_up = True
            self.scale_ups += 1
        self.last_action_s, self.last_action, self.last_action_ms = now, action.kind, now_ms()
        log.info(f"scale.{action.kind}", worker_id=action.instance_id,
                 average_freeness=round(action.average_freeness, 2),
                 serving=sum(1 for s in live if not s.draining), starting=self.starting(),
                 min_instances=self.policy.min_instances, max_instances=self.policy.max_instances)
        return action

    def retire(self, worker_id: str, now: float) -> None:
        """Drain `worker_id` for scale-in (stopped once empty)."""
        self.registry.set_draining(worker_id, True)
        if self.commands is not None:
            self.commands.send_drain(worker_id, True)
        self.retiring[worker_id] = Retiring(since=now, drain_sent=now)

    def cancel(self, worker_id: str) -> None:
        """An operator undrained `worker_id`: it serves again and is not stopped."""
        if self.retiring.pop(worker_id, None) is not None:
            log.info("scale.retire_cancelled", worker_id=worker_id)

    def _resend_drains(self, now: float) -> None:
        for wid, r in self.retiring.items():
            rec = self.registry.live(wid)
            if (rec is not None and not (rec.report is not None and rec.report.draining)
                    and now - r.drain_sent >= DRAIN_RESEND_S and self.commands is not None):
                r.drain_sent = now
                self.commands.send_drain(wid, True)

    # ---- the manager -----------------------------------------------------------------------------

    def ready_to_stop(self, worker_id: str) -> bool:
        """A retiring worker that holds nothing any more (or is dead or gone: the manager reaps it)."""
        rec = self.registry.live(worker_id)
        if rec is None:
            return True
        rep = rec.report
        # Its own draining flag: it refuses new requests, so an empty report stays empty.
        return (rep is not None and rep.draining and rep.num_running == 0 and rep.num_waiting == 0
                and not rep.requests and not self.migrator.involved(worker_id))

    def on_query(self, msg: ScaleQuery, scheduler_id: str) -> ScaleAdvice:
        now = self.clock()
        if msg.manager_id != self.manager_id:
            log.info("scale.manager", manager_id=msg.manager_id, workers=len(msg.workers))
        self.manager_id, self.manager_heard, self.managed = msg.manager_id, now, set(msg.workers)
        for wid in [w for w in self.retiring if w not in self.managed and self.registry.live(w) is None]:
            del self.retiring[wid]  # stopped and gone: retired
        start = 0
        if self.pending_up:
            self.pending_up = False
            if self.enabled and len(self.managed - set(self.retiring)) < self.policy.max_instances:
                start = 1
        stop = sorted(w for w in self.retiring if w in self.managed and self.ready_to_stop(w))
        if stop:
            log.info("scale.stop_advised", workers=stop)
        snaps = self.registry.snapshots()
        return ScaleAdvice(reply_to=msg.msg_id, scheduler_id=scheduler_id, enabled=self.enabled, start=start, stop=stop,
                           retiring=sorted(self.retiring),
                           serving=sum(1 for s in snaps if s.alive and not s.draining),
                           average_freeness=average_freeness(snaps, self.policy),
                           instance_seconds=self.registry.instance_seconds(now))

    def status(self) -> ScalingStatus | None:
        """For StatusReply (None when scaling is off)."""
        if not self.enabled:
            return None
        now = self.clock()
        return ScalingStatus(min_instances=self.policy.min_instances, max_instances=self.policy.max_instances,
                             average_freeness=self.average_freeness(),
                             manager_id=self.manager_id if self.manager_active(now) else "",
                             last_action=self.last_action, last_action_ms=self.last_action_ms,  # type: ignore[arg-type]
                             scale_ups=self.scale_ups, scale_downs=self.scale_downs, retiring=sorted(self.retiring))
