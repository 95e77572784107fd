"""The service manager's notify protocol (sd_notify(3)): readiness, status and watchdog pings.

systemd (a unit with `Type=notify` and `WatchdogSec=`) and `kvferry up`'s supervisor
(services.supervisor) both speak it: the manager names a datagram socket in $NOTIFY_SOCKET and,
with a watchdog, the ping deadline in $WATCHDOG_USEC. A service sends `READY=1` once it serves,
`WATCHDOG=1` at least every half deadline while it is healthy, and `STOPPING=1` when it stops. A
service that stops pinging (its event loop is stuck, or its health check fails: a worker whose
engine thread made no progress for `[worker] watchdog_s`) is killed and restarted by the manager.

The protocol is one datagram of `KEY=VALUE` lines; without $NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

from services.log import get_logger

log = get_logger(__name__)

_tasks: set[asyncio.Task[None]] = set()  # keeps the watchdog tasks referenced


class Notifier:
    """Sends notify messages to the service manager named by the environment (if any)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@' (systemd's own convention).
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: object) -> bool:
        """Send `KEY=VALUE` lines (READY=1, STATUS=..., WATCHDOG=1, STOPPING=1); False if not sent."""
        if not self.address:
            return False
        data = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
            return True
        except OSError as exc:  # the manager is gone or its socket is full: nothing to do but retry later
            log.debug("sd_notify.failed", error=str(exc))
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify(ready=1, status=status) if status else self.notify(ready=1)

    def stopping(self) -> bool:
        return self.notify(stopping=1)


HealthFn = Callable[[], tuple[bool, str]]


async def watchdog_pings(notifier: Notifier, healthy: HealthFn | None = None) -> None:
    """Ping the manager's watchdog at a third of its deadline for as long as `healthy()` says ok
    (a stuck event loop cannot ping at all). An unhealthy spell is sent as STATUS once."""
    if notifier.watchdog_s is None:
        return
    interval = max(0.05, notifier.watchdog_s / 3)
    unhealthy = ""
    while True:
        ok, why = healthy() if healthy is not None else (True, "")
        if ok:
            notifier.notify(watchdog=1)
            unhealthy = ""
        elif why != unhealthy:
            unhealthy = why
            log.error("sd_notify.unhealthy", reason=why)
            notifier.notify(status=f"unhealthy: {why}")
        await asyncio.sleep(interval)


def start(status: str = "", healthy: HealthFn | None = None, env: Mapping[str, str] | None = None) -> Notifier:
    """On the running event loop: tell the manager we are ready and keep its watchdog fed."""
    notifier = Notifier(env)
    if notifier.enabled:
        notifier.ready(status)
        if notifier.watchdog_s is not None:
            task = asyncio.get_running_loop().create_task(watchdog_pings(notifier, healthy), name="sd-watchdog")
            _tasks.add(task)
            task.add_done_callback(_tasks.discard)
    return notifier
