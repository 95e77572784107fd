"""The worker pool manager of `kvferry up --scaling`: starts and stops worker processes as the
scheduler advises (the scheduler decides: services.scheduler.scaler; this owns the processes).

A thread polls the scheduler with ScaleQuery every `poll_s`, listing the workers it runs. On
`start` it starts the next worker (the lowest index no running worker uses: id `worker-<i>`, ports
from protocol.ClusterAddresses); on `stop` it retires those workers: SIGTERM, so the worker
deregisters and exits (SIGKILL after RETIRE_TIMEOUT_S), and the launcher does not count that exit
as a failure. A worker the scheduler lists in `stop` has been drained and is empty.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq

from protocol import ErrorReply, ScaleAdvice, ScaleQuery, SchedulerReplies
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.security import curve_keys, secure, use_curve

if TYPE_CHECKING:
    from services.launcher import Child, LocalCluster

POLL_S = 0.2
QUERY_TIMEOUT_S = 1.0
RETIRE_TIMEOUT_S = 15.0  # a retired worker still running this long after SIGTERM is killed


@dataclass(frozen=True)
class ScaleEvent:
    """A worker started or stopped by the pool manager."""

    t: float  # monotonic seconds
    kind: str  # start | stop
    worker_id: str
    average_freeness: float
    instance_seconds: float

    def __str__(self) -> str:
        f = self.average_freeness
        freeness = ("inf" if f > 0 else "-inf") if math.isinf(f) else f"{f:.1f}"
        verb = "started" if self.kind == "start" else "stopped"
        return (f"scale: {verb} {self.worker_id} (average freeness {freeness}, "
                f"instance-seconds {self.instance_seconds:.1f})")


def _print(event: ScaleEvent) -> None:
    print(event, flush=True)


class PoolManager:
    """Polls the scheduler and starts/retires the cluster's workers accordingly (on its own thread)."""

    def __init__(self, cluster: "LocalCluster", manager_id: str = "kvferry-up", poll_s: float = POLL_S,
                 on_event: Callable[[ScaleEvent], None] = _print) -> None:
        self.cluster = cluster
        self.manager_id = manager_id
        self.poll_s = poll_s
        self.on_event = on_event
        self.events: list[ScaleEvent] = []
        self.last_advice: ScaleAdvice | None = None
        self.errors = 0  # queries without a usable answer
        self._refusal_shown = False
        self._retired: dict[str, tuple["Child", float]] = {}  # name → (child, kill deadline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-manager", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    @property
    def instance_seconds(self) -> float:
        """As of the latest advice (the scheduler's account)."""
        return self.last_advice.instance_seconds if self.last_advice is not None else 0.0

    # ---- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        ctx = use_curve(zmq.Context(), curve_keys(self.cluster.spec.config.cluster, "client"))
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        secure(sock, server=False, server_role="scheduler")
        sock.connect(self.cluster.scheduler_endpoint)
        try:
            while not self._stop.wait(self.poll_s):
                try:
                    self.step(sock)
                except Exception as exc:  # noqa: BLE001 - the manager must outlive one bad step
                    self.errors += 1
                    print(f"scale: error: {type(exc).__name__}: {exc}", flush=True)
        finally:
            sock.close(linger=0)
            ctx.term()

    def step(self, sock: zmq.Socket) -> ScaleAdvice | None:
        """One poll: reap retired workers, ask, act on the advice."""
        self._reap()
        # A crashed worker the supervisor is about to restart still counts: no second one for it.
        running = [c.name for c in self.cluster.workers() if c.proc.poll() is None or self.cluster.restarting(c)]
        advice = self._ask(sock, ScaleQuery(manager_id=self.manager_id, workers=running))
        if advice is None:
            return None
        self.last_advice = advice
        for name in advice.stop:
            child = self.cluster.retire_worker(name)
            if child is not None:
                self._retired[name] = (child, time.monotonic() + RETIRE_TIMEOUT_S)
                self._event("stop", name, advice)
        if advice.start and not self._stop.is_set():
            child = self.cluster.start_worker(self.cluster.next_worker_index())
            self._event("start", child.name, advice)
        return advice

    def _event(self, kind: str, name: str, advice: ScaleAdvice) -> None:
        ev = ScaleEvent(time.monotonic(), kind, name, advice.average_freeness, advice.instance_seconds)
        self.events.append(ev)
        self.on_event(ev)

    def _reap(self) -> None:
        """Kill retired workers that ignore SIGTERM; forget those that exited."""
        now = time.monotonic()
        for name, (child, deadline) in list(self._retired.items()):
            if child.proc.poll() is not None:
                del self._retired[name]
            elif now > deadline:
                child.proc.kill()

    def _ask(self, sock: zmq.Socket, msg: ScaleQuery) -> ScaleAdvice | None:
        sock.send(encode(msg))
        deadline = time.monotonic() + QUERY_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                self.errors += 1
                return None
            try:
                reply = decode(sock.recv(), SchedulerReplies)
            except ProtocolError:
                continue
            if getattr(reply, "reply_to", None) != msg.msg_id:
                continue  # a late answer to an earlier query
            if isinstance(reply, ErrorReply):
                self.errors += 1
                if not self._refusal_shown:  # e.g. a scheduler without scaling support: say it once
                    self._refusal_shown = True
                    print(f"scale: the scheduler refused ScaleQuery: {reply.code}: {reply.message}", flush=True)
                return None
            return reply if isinstance(reply, ScaleAdvice) else None
