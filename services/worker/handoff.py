"""Prefill/decode hand-off, the prefill worker's side (policy.pd, design §4).

A worker in the "prefill" role moves each request to a decode worker by live migration as soon as
its first token is out (streamed already), toward the decode target the scheduler keeps fresh
(DecodeTarget): the worker starts the move itself, no scheduler round trip on the critical path.
The engine parks the request at that step boundary (`LLMEngine.park_prefilled`: out of the batch,
blocks kept), so it takes no decode step here and joins no later prefill's long step; the move is
then a stop-and-copy of its blocks. A request that cannot move (no target, a refusal, an aborted
migration) is put back into the batch and decodes here: nothing waits for a hand-off and every
abort path leaves the request running exactly once. While the outgoing-migration limit is
reached the parked requests wait for a slot (a few tens of ms each). A request that finishes
within its prefill (max_tokens 1) is never parked nor moved. Engines without parking (vLLM) hand
off live: the request decodes here during the pre-copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterable
from typing import Any

from engine.request import RequestOutput
from protocol import ErrorCode, MigrateCommand
from services.log import get_logger
from services.worker.context import WorkerContext
from services.worker.migration.source import MigrationSource, Refused

log = get_logger("kvferry.worker.handoff")

MAX_PENDING = 4096
RETRY_S = 0.02  # parked requests waiting for a migration slot are tried again this often


def set_parking(engine: Any, on: bool) -> list[str]:  # noqa: ANN401 - any engine
    """Turn the engine's parking on or off (off: every parked request back into the batch); the
    requests put back. Engines without parking ignore it."""
    if not hasattr(engine, "park_prefilled"):
        return []
    engine.park_prefilled = on
    back = [] if on else sorted(engine.parked)
    for rid in back:
        engine.reattach_request(rid)
    return back


class HandOff:
    """Pending hand-offs of a prefill worker and the migrations that carry them out."""

    def __init__(self, ctx: WorkerContext, source: MigrationSource) -> None:
        self.w = ctx
        self.source = source
        self.pending: dict[str, None] = {}  # prefilled requests still here, oldest first
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.parks = hasattr(ctx.driver.engine, "park_prefilled")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="handoff")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def on_outputs(self, outputs: Iterable[RequestOutput]) -> None:
        """Note the requests whose first token this step produced (when this worker hands off)."""
        if self.w.state.role != "prefill":
            return
        for o in outputs:
            if o.first_index == 0 and o.new_token_ids and not o.finished and len(self.pending) < MAX_PENDING:
                self.pending[o.request_id] = None
        if self.pending:
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RETRY_S if self.pending else None)
            self._wake.clear()
            try:
                await self.pump()
            except Exception:  # noqa: BLE001 - the loop must survive; requests stay where they are
                log.exception("handoff.pump_failed")

    async def _keep(self, rid: str, why: str) -> None:
        """The request decodes here after all."""
        self.pending.pop(rid, None)
        await self.w.driver.call(lambda e: e.reattach_request(rid) if rid in getattr(e, "parked", ()) else None)
        log.info("handoff.kept", request_id=rid, reason=why)

    async def pump(self) -> None:
        """Start the pending hand-offs the target and the migration limit allow now."""
        st = self.w.state
        if not self.pending:
            return
        for rid in list(self.pending):
            if rid not in self.w.routes or self.source.is_migrating(rid):
                self.pending.pop(rid, None)  # finished, aborted, or already on its way
                continue
            if st.role != "prefill" or st.decode_target is None:
                await self._keep(rid, "no decode target" if st.role == "prefill" else f"role {st.role}")
                continue
            target_id, endpoint = st.decode_target
            cmd = MigrateCommand(migration_id=f"handoff-{uuid.uuid4().hex[:16]}", request_id=rid,
                                 dst_worker_id=target_id, dst_endpoint=endpoint, reason="handoff",
                                 mode="blocking" if self.parks else "live")
            try:
                await self.source.start(cmd)
            except Refused as exc:
                if exc.code == ErrorCode.OVERLOADED:
                    return  # the outgoing limit: tried again in RETRY_S
                await self._keep(rid, str(exc))
                continue
            self.pending.pop(rid, None)
