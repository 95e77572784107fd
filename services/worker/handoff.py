"""Prefill/decode hand-off, the prefill worker's side (policy.pd, design §4).

A worker in the "prefill" role moves each request to a decode worker by live migration as soon as
its first token is out (streamed already), toward the decode target the scheduler keeps fresh
(DecodeTarget): the worker starts the move itself, no scheduler round trip on the critical path.
A request that cannot move now (no target, the outgoing-migration limit, a refusal of the
destination) stays pending and is tried again after the next steps; it decodes here meanwhile,
so nothing waits for a hand-off. A request that finishes within its prefill (max_tokens 1) is
never moved. Migration aborts leave the request running here, exactly once (design §5).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from engine.request import RequestOutput
from protocol import ErrorCode, MigrateCommand
from services.log import get_logger
from services.worker.context import WorkerState
from services.worker.migration.source import MigrationSource, Refused
from services.worker.streams import RouteTable

log = get_logger("kvferry.worker.handoff")

MAX_PENDING = 4096


class HandOff:
    """Pending hand-offs of a prefill worker and the migrations that carry them out."""

    def __init__(self, state: WorkerState, routes: RouteTable, source: MigrationSource) -> None:
        self.state = state
        self.routes = routes
        self.source = source
        self.pending: dict[str, None] = {}  # prefilled requests still here, oldest first
        self.started = 0
        self._pumping = False

    def on_outputs(self, outputs: Iterable[RequestOutput]) -> None:
        """Note the requests whose first token this step produced (when this worker hands off)."""
        if self.state.role != "prefill":
            if self.pending:
                self.pending.clear()
            return
        for o in outputs:
            if o.first_index == 0 and o.new_token_ids and not o.finished and len(self.pending) < MAX_PENDING:
                self.pending[o.request_id] = None

    async def pump(self) -> None:
        """Start the pending hand-offs the target and the migration limit allow now."""
        if self._pumping or not self.pending or self.state.role != "prefill" or self.state.decode_target is None:
            return
        self._pumping = True
        try:
            target_id, endpoint = self.state.decode_target
            for rid in list(self.pending):
                if rid not in self.routes or self.source.is_migrating(rid):
                    self.pending.pop(rid, None)  # finished, aborted, or already on its way
                    continue
                cmd = MigrateCommand(migration_id=f"handoff-{uuid.uuid4().hex[:16]}", request_id=rid,
                                     dst_worker_id=target_id, dst_endpoint=endpoint, reason="handoff")
                try:
                    await self.source.start(cmd)
                except Refused as exc:
                    if exc.code == ErrorCode.OVERLOADED:
                        return  # the outgoing limit: the next steps try again
                    self.pending.pop(rid, None)
                    log.info("handoff.refused", request_id=rid, dst_worker_id=target_id, reason=str(exc))
                    continue
                self.pending.pop(rid, None)
                self.started += 1
        finally:
            self._pumping = False
