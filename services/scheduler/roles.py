"""Prefill/decode roles, the scheduler's side (policy.pd): `ctl role`, adaptive role changes, and
the decode target each prefill worker hands its prefilled requests to.

A prefill worker starts each hand-off itself, as soon as a request's first token is out, toward
the decode target the scheduler last told it (DecodeTarget): no scheduler round trip on the
critical path. Every migration round recomputes each prefill worker's target from the latest
reports (the freest decode worker with room, then a mixed one) and sends it when it changed, or
again after `REFRESH_S`; a worker whose reported role differs from the scheduler's (a SetRole
that was lost, a restart) is told again. Roles set at run time last until the worker registers
anew (a restart starts from its configured role).
"""

from __future__ import annotations

from collections.abc import Callable

from protocol import Ack, DecodeTarget, ErrorCode, ErrorReply, SetInstanceRole, SetRole
from policy import PolicyConfig
from policy.pd import RoleState, handoff_target, role_changes
from services.log import get_logger
from services.scheduler.commands import CommandChannels
from services.scheduler.registry import Registry

log = get_logger("kvferry.scheduler.roles")

REFRESH_S = 2.0  # a prefill worker hears its target again at least this often
COMMAND_TIMEOUT_S = 2.0


class Roles:
    """Keeps workers' roles and prefill workers' decode targets (see the module docstring)."""

    def __init__(self, policy: PolicyConfig, registry: Registry, commands: CommandChannels | None,
                 clock: Callable[[], float]) -> None:
        self.policy = policy
        self.registry = registry
        self.commands = commands
        self.clock = clock
        self.state = RoleState({})
        self._sent: dict[str, tuple[str | None, float]] = {}  # prefill worker → (target, when sent)
        self._told_role: dict[str, tuple[str, float]] = {}  # worker → (role, when last sent)

    def on_ctl(self, msg: SetInstanceRole) -> Ack | ErrorReply:
        rec = self.registry.get(msg.worker_id)
        if rec is None or not rec.alive:
            return ErrorReply(reply_to=msg.msg_id, code=ErrorCode.NOT_FOUND, message=f"no live instance {msg.worker_id}")
        old = rec.role
        self.registry.set_role(msg.worker_id, msg.role)
        self.state.configured[msg.worker_id] = msg.role  # adaptive mode lends from the new role
        self._tell_role(msg.worker_id, msg.role)
        log.info("worker.role_set", worker_id=msg.worker_id, role=msg.role, was=old)
        return Ack(reply_to=msg.msg_id, detail=f"{msg.worker_id}: {old} -> {msg.role}")

    def round(self) -> None:
        """Called with every migration round."""
        if self.policy.pd_mode == "off" or self.commands is None:
            return
        now = self.clock()
        for rec in self.registry:
            self.state.configured.setdefault(rec.worker_id, rec.info.role)
        snaps = self.registry.snapshots()
        for wid, role in role_changes(snaps, self.policy, self.state, now):
            self.registry.set_role(wid, role)
            log.info("worker.role_adapted", worker_id=wid, role=role, configured=self.state.configured.get(wid))
            self._tell_role(wid, role)
        snaps = self.registry.snapshots()
        for rec in self.registry:
            if not rec.alive:
                self._sent.pop(rec.worker_id, None)
                continue
            reported = rec.report.role if rec.report is not None else rec.info.role
            told = self._told_role.get(rec.worker_id)
            if reported != rec.role and (told is None or now - told[1] > REFRESH_S):
                self._tell_role(rec.worker_id, rec.role)  # lost, or the worker restarted
            if rec.role != "prefill":
                self._sent.pop(rec.worker_id, None)
                continue
            target = handoff_target(snaps, self.policy, 1, exclude={rec.worker_id})
            last = self._sent.get(rec.worker_id)
            if last is not None and last[0] == target and now - last[1] < REFRESH_S:
                continue
            self._sent[rec.worker_id] = (target, now)
            dst = self.registry.get(target) if target is not None else None
            self._send(rec.worker_id, DecodeTarget(worker_id=target, migration_endpoint=dst.info.endpoints.migration
                                                   if dst is not None else None))

    def _tell_role(self, worker_id: str, role: str) -> None:
        self._told_role[worker_id] = (role, self.clock())
        self._sent.pop(worker_id, None)  # its target follows in the next round
        self._send(worker_id, SetRole(role=role))

    def _send(self, worker_id: str, msg: SetRole | DecodeTarget) -> None:
        if self.commands is None or worker_id not in self.commands:
            return

        async def forward() -> None:
            try:
                reply = await self.commands.ask(worker_id, msg, COMMAND_TIMEOUT_S)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - resent by a later round
                log.info("worker.role_message_lost", worker_id=worker_id, message=type(msg).__name__, error=str(exc))
                self._sent.pop(worker_id, None)
                return
            if isinstance(reply, ErrorReply):
                log.warning("worker.role_message_refused", worker_id=worker_id, message=type(msg).__name__,
                            error=reply.message)

        self.commands.spawn(forward(), name=f"role-{worker_id}")

