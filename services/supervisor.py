"""Restarts the processes of a local cluster that exit without being asked, as systemd's
`Restart=on-failure` + `WatchdogSec=` do for the units of a bare-metal host.

A child that exits on its own (a crash, `kill -9`, the OOM killer, a non-zero exit) is started
again with the same name, index, ports and environment after a delay that doubles with each
consecutive failure (`[supervisor] restart_delay_s` .. `restart_delay_max_s`); a child that keeps
failing (more than `start_limit_burst` restarts within `start_limit_interval_s`) is given up with
one line naming it and its last exit status. Each child gets its own notify socket
(services.sd_notify): one that announced itself and then sends no watchdog ping for
`watchdog_s` (its event loop is stuck, or its health check fails: a stuck engine thread) is
killed with SIGABRT (Python's faulthandler prints its threads' stacks), SIGKILL after
`kill_timeout_s`, and restarted like any other failure.

The supervisor only decides and restarts; whether the cluster can still serve (`fatal`) is for
its owner (`kvferry up`) to act on. `restart_delay` and `start_limit_hit` are pure functions.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.config import SupervisorConfig
from services.log import get_logger

if TYPE_CHECKING:
    from services.launcher import Child, LocalCluster

log = get_logger(__name__)

POLL_S = 0.1


def restart_delay(policy: SupervisorConfig, consecutive_failures: int) -> float:
    """Seconds before the next start after the `consecutive_failures`-th failure in a row (>= 1)."""
    return min(policy.restart_delay_max_s, policy.restart_delay_s * 2 ** max(0, consecutive_failures - 1))


def start_limit_hit(policy: SupervisorConfig, restarts: deque[float] | list[float], now: float) -> bool:
    """True when `start_limit_burst` restarts already happened within the last `start_limit_interval_s`."""
    return sum(1 for t in restarts if now - t < policy.start_limit_interval_s) >= policy.start_limit_burst


def describe_status(code: int | None) -> str:
    """An exit status as a person reads it: `1`, `-9 (SIGKILL)`."""
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


@dataclass
class SlotHistory:
    """What the supervisor remembers of one service name across its processes."""

    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=256))  # monotonic times
    consecutive_failures: int = 0
    last_status: int | None = None
    restart_at: float | None = None  # a restart is due then (the child exited; backing off)
    gave_up: bool = False


@dataclass
class Watch:
    """The notify socket of one child process and what it said."""

    sock: socket.socket
    path: str
    armed: bool = False  # it spoke the protocol (READY=1 or WATCHDOG=1): its silence now counts
    last_ping: float = 0.0
    status: str = ""
    abort_sent_at: float | None = None


@dataclass(frozen=True)
class SupervisorEvent:
    """A restart, a give-up or a watchdog kill, as printed on the console."""

    kind: str  # restart | give_up | watchdog | fatal
    name: str
    message: str


def _print(event: SupervisorEvent) -> None:
    print(event.message, flush=True)


class Supervisor:
    """Watches `cluster`'s children from a thread of its own and restarts the ones that fail."""

    def __init__(self, cluster: "LocalCluster", policy: SupervisorConfig,
                 on_event: Callable[[SupervisorEvent], None] = _print) -> None:
        policy.validate()
        self.cluster = cluster
        self.policy = policy
        self.on_event = on_event
        self.events: list[SupervisorEvent] = []
        self.history: dict[str, SlotHistory] = {}
        self.fatal: str | None = None  # why the cluster can no longer serve; set once
        self._watches: dict[int, Watch] = {}  # by child pid
        self._dir = tempfile.mkdtemp(prefix="kvferry-notify-")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    # ---- for the launcher ------------------------------------------------------------------------

    def notify_env(self, name: str) -> tuple[dict[str, str], Watch | None]:
        """Environment for a child about to start (its own notify socket, the watchdog deadline)."""
        if self.policy.watchdog_s <= 0:
            return {}, None
        path = os.path.join(self._dir, f"{name}.{time.monotonic_ns()}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(int(self.policy.watchdog_s * 1e6))}
        return env, Watch(sock, path)

    def attach(self, child: "Child", watch: Watch | None) -> None:
        if watch is not None:
            with self._lock:
                self._watches[child.proc.pid] = watch
        self.history.setdefault(child.name, SlotHistory())

    def release(self, child: "Child") -> None:
        """`child` is no longer supervised (stopped on purpose, or replaced): close its socket."""
        with self._lock:
            watch = self._watches.pop(child.proc.pid, None)
        if watch is not None:
            self._close(watch)

    def status_of(self, child: "Child") -> str:
        """What `child` last said it was doing (its STATUS=), "" if nothing."""
        with self._lock:
            watch = self._watches.get(child.proc.pid)
        return watch.status if watch is not None else ""

    def slot(self, name: str) -> SlotHistory:
        return self.history.setdefault(name, SlotHistory())

    def restarting(self, name: str) -> bool:
        h = self.history.get(name)
        return h is not None and h.restart_at is not None

    def gave_up(self, name: str) -> bool:
        h = self.history.get(name)
        return h is not None and h.gave_up

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        with self._lock:
            watches, self._watches = list(self._watches.values()), {}
        for w in watches:
            self._close(w)
        try:
            os.rmdir(self._dir)
        except OSError:
            pass

    # ---- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.step(time.monotonic())
            except Exception:  # noqa: BLE001 - the supervisor must outlive one bad round
                log.exception("supervisor.step_failed")

    def step(self, now: float) -> None:
        """One round: read notify sockets, enforce watchdogs, handle exits, start due restarts."""
        for child in self.cluster.supervised():
            h = self.slot(child.name)
            code = child.proc.poll()
            watch = self._watches.get(child.proc.pid)
            if code is None:
                if watch is not None:
                    self._read(watch, now)
                    self._check_watchdog(child, watch, now)
                if h.consecutive_failures and child.ready_line and now - child.started_at >= self.policy.restart_delay_max_s:
                    h.consecutive_failures = 0  # it served long enough: the next failure starts the delays over
                continue
            if h.gave_up:
                continue
            if h.restart_at is None:
                self._on_exit(child, h, code, now)
            elif now >= h.restart_at and not self._stop.is_set():
                self._restart(child, h, now)
        self._check_fatal()

    def _on_exit(self, child: "Child", h: SlotHistory, code: int, now: float) -> None:
        h.last_status = code
        h.consecutive_failures += 1
        self.release(child)
        status = describe_status(code)
        if not self.policy.restart or start_limit_hit(self.policy, h.restarts, now):
            h.gave_up = True
            why = ("restarts are off ([supervisor] restart = false)" if not self.policy.restart else
                   f"{sum(1 for t in h.restarts if now - t < self.policy.start_limit_interval_s)} restarts within "
                   f"{self.policy.start_limit_interval_s:g} s")
            self._event("give_up", child.name, f"error: {child.name} exited with status {status}; giving up on it "
                                               f"({why}): not restarted")
            log.error("supervisor.gave_up", child=child.name, exit_status=code, reason=why)
            return
        delay = restart_delay(self.policy, h.consecutive_failures)
        h.restart_at = now + delay
        log.warning("supervisor.exited", child=child.name, exit_status=code, restart_in_s=delay,
                    attempt=len(h.restarts) + 1)

    def _restart(self, child: "Child", h: SlotHistory, now: float) -> None:
        h.restart_at = None
        h.restarts.append(now)
        attempt = len(h.restarts)
        try:
            new = self.cluster.restart_child(child)
        except Exception as exc:  # noqa: BLE001 - e.g. fork failed: count it as another failure
            h.restart_at = now + restart_delay(self.policy, h.consecutive_failures + 1)
            log.error("supervisor.restart_failed", child=child.name, error=f"{type(exc).__name__}: {exc}")
            return
        self._event("restart", child.name, f"{child.name} exited with status {describe_status(h.last_status)}; "
                                           f"restarted (attempt {attempt}, pid {new.proc.pid})")
        log.warning("supervisor.restarted", child=child.name, exit_status=h.last_status, attempt=attempt,
                    pid=new.proc.pid)

    def _check_fatal(self) -> None:
        if self.fatal is not None:
            return
        reason = self.cluster.cannot_serve()
        if reason:
            self.fatal = reason
            self._event("fatal", "", f"error: the cluster cannot serve any more: {reason}")
            log.error("supervisor.fatal", reason=reason)

    # ---- the watchdog ----------------------------------------------------------------------------

    def _read(self, watch: Watch, now: float) -> None:
        while True:
            try:
                data = watch.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                if key in ("READY", "WATCHDOG") and value == "1":
                    watch.armed = True
                    watch.last_ping = now
                elif key == "STATUS":
                    watch.status = value[:500]
                elif key == "STOPPING":
                    watch.armed = False  # a stopping service may take its time

    def _check_watchdog(self, child: "Child", watch: Watch, now: float) -> None:
        if watch.abort_sent_at is not None:
            if now - watch.abort_sent_at > self.policy.kill_timeout_s:
                child.proc.kill()
            return
        if not watch.armed or now - watch.last_ping <= self.policy.watchdog_s:
            return
        watch.abort_sent_at = now
        status = f" ({watch.status})" if watch.status else ""
        self._event("watchdog", child.name, f"error: {child.name} sent no watchdog ping for "
                                            f"{self.policy.watchdog_s:g} s{status}; killing it (SIGABRT)")
        log.error("supervisor.watchdog", child=child.name, pid=child.proc.pid, status=watch.status)
        try:
            child.proc.send_signal(signal.SIGABRT)
            child.proc.send_signal(signal.SIGCONT)  # a stopped process must run to take the abort
        except OSError:
            pass

    @staticmethod
    def _close(watch: Watch) -> None:
        watch.sock.close()
        try:
            os.unlink(watch.path)
        except OSError:
            pass

    def _event(self, kind: str, name: str, message: str) -> None:
        ev = SupervisorEvent(kind, name, message)
        self.events.append(ev)
        self.on_event(ev)
