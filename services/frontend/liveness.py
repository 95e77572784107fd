"""The frontend's own view of which workers are alive (design §6), so that it notices a lost
worker while the scheduler is away too: every tick it heartbeats and Pings each target (the known
workers and every worker holding one of its requests); a worker that answers no Ping for
`worker_timeout_s` is lost. The heartbeats also tell workers that this frontend lives (they abort
the requests of a frontend that fell silent or restarted)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import zmq

from protocol.common import Heartbeat, Ping, Pong
from protocol.errors import ProtocolError
from services.frontend.worker_links import WorkerLinks


@dataclass(slots=True)
class WorkerHealth:
    """This frontend's liveness view of one worker address (Ping → Pong)."""

    last_pong: float  # monotonic; set to the time watching began before the first Pong
    pinging: int = 0  # Pings in flight
    last_ping: float = float("-inf")  # monotonic: when the latest Ping went out


class WorkerLiveness:
    """Pings workers and says which are lost (see the module docstring).

    A Ping unanswered for `retry_s` is followed by another (at most `max_pings` in flight), so
    that one message lost or stuck on its way is not `timeout_s` of silence; each waits for its
    Pong up to `timeout_s`. Tokens from a worker count as an answer too (`heard`)."""

    retry_s = 1.0
    max_pings = 3

    def __init__(self, links: WorkerLinks, frontend_id: str, incarnation: str, timeout_s: float,
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.links = links
        self.frontend_id = frontend_id
        self.incarnation = incarnation
        self.timeout_s = timeout_s
        self._spawn = spawn
        self.health: dict[str, WorkerHealth] = {}  # by worker address
        self._seq = 0

    def tick(self, targets: dict[str, str], now: float) -> list[tuple[str, str, float]]:
        """One round over `targets` (address → worker id): start a ping to each that has none in
        flight; return the lost ones as (worker id, address, seconds without an answer)."""
        self._seq += 1
        for address in [a for a in self.health if a not in targets]:
            del self.health[address]
        lost = []
        for address, wid in targets.items():
            h = self.health.get(address)
            if h is None:
                h = self.health[address] = WorkerHealth(last_pong=now)
            if now - h.last_pong > self.timeout_s:
                lost.append((wid, address, now - h.last_pong))
            elif not h.pinging or (h.pinging < self.max_pings and now - h.last_ping >= self.retry_s):
                h.pinging += 1
                h.last_ping = now
                self._spawn(self._ping(address, h))
        return lost

    def heard(self, address: str, now: float) -> None:
        """Something came from the worker at `address` (its tokens): as good as a Pong."""
        h = self.health.get(address)
        if h is not None and now > h.last_pong:
            h.last_pong = now

    def excuse(self, seconds: float) -> None:
        """This frontend did not run for `seconds` (services.stall): that time is not the workers'
        silence, so every answer's deadline moves by it."""
        for h in self.health.values():
            h.last_pong += seconds

    def last_pong(self, address: str) -> float | None:
        """When `address` last answered a Ping (monotonic), or None when it is not watched."""
        h = self.health.get(address)
        return None if h is None else h.last_pong

    def forget(self, address: str) -> None:
        self.health.pop(address, None)

    async def _ping(self, address: str, h: WorkerHealth) -> None:
        try:
            r = self.links.get(address)
            with contextlib.suppress(ProtocolError):
                await r.send(Heartbeat(sender_id=self.frontend_id, role="frontend", seq=self._seq,
                                       incarnation=self.incarnation), timeout_s=0.05)
            reply = await r.request(Ping(sender_id=self.frontend_id), timeout_s=self.timeout_s)
            if isinstance(reply, Pong):
                h.last_pong = max(h.last_pong, time.monotonic())
        except (ProtocolError, zmq.ZMQError):
            pass
        finally:
            h.pinging -= 1
