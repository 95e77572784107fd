"""The supervisor's decisions (services.supervisor) and the notify protocol (services.sd_notify),
on fake processes and real datagram sockets; `kvferry up` itself: tests/test_e2e_supervisor.py."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from dataclasses import dataclass, field

import pytest

from services import sd_notify
from services.config import SupervisorConfig, load_config
from services.supervisor import Supervisor, describe_status, restart_delay, start_limit_hit

POLICY = SupervisorConfig(restart_delay_s=0.5, restart_delay_max_s=10.0, start_limit_burst=3,
                          start_limit_interval_s=60.0, watchdog_s=2.0, kill_timeout_s=1.0)


def test_restart_delay_doubles_up_to_the_cap():
    assert [restart_delay(POLICY, n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_start_limit_counts_restarts_within_the_interval():
    assert not start_limit_hit(POLICY, [0.0, 1.0], now=2.0)
    assert start_limit_hit(POLICY, [0.0, 1.0, 2.0], now=3.0)
    assert not start_limit_hit(POLICY, [0.0, 1.0, 2.0], now=60.5)  # the first fell out of the window


def test_exit_statuses_read_as_a_person_reads_them():
    assert describe_status(1) == "1" and describe_status(-9) == "-9 (SIGKILL)" and describe_status(None) == "unknown"


@pytest.mark.parametrize("bad", [{"restart_delay_s": -1}, {"restart_delay_max_s": 0.1}, {"start_limit_burst": 0},
                                 {"start_limit_interval_s": 0}, {"watchdog_s": -1}, {"kill_timeout_s": 0}])
def test_bad_policies_are_refused(bad):
    with pytest.raises(ValueError):
        SupervisorConfig(**bad).validate()


def test_the_supervisor_section_comes_from_the_environment():
    cfg = load_config(env={"KVFERRY_SUPERVISOR_START_LIMIT_BURST": "2", "KVFERRY_SUPERVISOR_RESTART": "false"})
    assert cfg.supervisor.start_limit_burst == 2 and cfg.supervisor.restart is False


# ---- the supervisor on fake children ------------------------------------------------------------------

class FakeProc:
    _next_pid = 100_000

    def __init__(self) -> None:
        FakeProc._next_pid += 1
        self.pid = FakeProc._next_pid
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)
        self.returncode = -9


@dataclass(eq=False)
class FakeChild:
    name: str
    proc: FakeProc = field(default_factory=FakeProc)
    ready_line: str = "READY"
    started_at: float = 0.0
    retired: bool = False
    index: int | None = 0

    @property
    def is_worker(self) -> bool:
        return self.name.startswith("worker")


class FakeCluster:
    """What the supervisor needs of LocalCluster: the children, a restart, whether it can serve."""

    def __init__(self, sup_policy: SupervisorConfig, names: tuple[str, ...] = ("scheduler", "worker-0", "frontend")):
        self.children = [FakeChild(n) for n in names]
        self.now = 0.0
        self.sup = Supervisor(self, sup_policy, on_event=lambda ev: None)
        self.watches: dict[str, object] = {}
        for c in self.children:
            self._attach(c)

    def _attach(self, c: FakeChild) -> None:
        env, watch = self.sup.notify_env(c.name)
        self.watches[c.name] = env
        self.sup.attach(c, watch)  # type: ignore[arg-type]

    def supervised(self) -> list[FakeChild]:
        return [c for c in self.children if not c.retired]

    def restart_child(self, old: FakeChild) -> FakeChild:
        new = FakeChild(old.name, started_at=self.now)
        self.children[self.children.index(old)] = new
        self._attach(new)
        return new

    def cannot_serve(self) -> str:
        workers = [c for c in self.children if c.is_worker and not c.retired]
        return "no worker left" if workers and all(self.sup.gave_up(c.name) for c in workers) else ""

    def child(self, name: str) -> FakeChild:
        return next(c for c in self.children if c.name == name)

    def step(self, t: float) -> None:
        self.now = t
        self.sup.step(t)


def test_a_crashed_child_is_restarted_after_a_growing_delay_then_given_up():
    c = FakeCluster(POLICY)
    try:
        pids = [c.child("worker-0").proc.pid]
        t = 0.0
        for delay in (0.5, 1.0, 2.0):
            c.child("worker-0").proc.returncode = -9
            c.step(t)  # exit seen: backing off
            assert c.sup.restarting("worker-0")
            c.step(t + delay - 0.01)
            assert c.child("worker-0").proc.pid == pids[-1], "restarted before its delay"
            t += delay
            c.step(t)
            pids.append(c.child("worker-0").proc.pid)
            assert pids[-1] != pids[-2] and not c.sup.restarting("worker-0")
        c.child("worker-0").proc.returncode = 1
        c.step(t)  # the 4th failure in a row, 3 restarts within 60 s: given up
        assert c.sup.gave_up("worker-0") and c.sup.fatal == "no worker left"
        assert [e.kind for e in c.sup.events] == ["restart", "restart", "restart", "give_up", "fatal"]
        assert "worker-0 exited with status 1; giving up" in c.sup.events[3].message
        assert c.child("scheduler").proc.signals == [] and c.sup.history["scheduler"].restarts == deque_empty()
    finally:
        c.sup.stop()


def deque_empty():  # noqa: ANN201
    from collections import deque

    return deque(maxlen=256)


def test_a_child_that_served_long_enough_starts_the_delays_over():
    c = FakeCluster(POLICY)
    try:
        c.child("worker-0").proc.returncode = -9
        c.step(0.0)
        c.step(0.5)  # restarted (delay 0.5)
        c.step(0.5 + POLICY.restart_delay_max_s + 1)  # served 11 s: the failure count resets
        assert c.sup.history["worker-0"].consecutive_failures == 0
        c.child("worker-0").proc.returncode = -9
        c.step(20.0)
        assert c.sup.history["worker-0"].restart_at == pytest.approx(20.5)
    finally:
        c.sup.stop()


def test_children_stopped_on_purpose_are_not_restarted_and_restart_false_gives_up_at_once():
    c = FakeCluster(SupervisorConfig(restart=False, watchdog_s=0))
    try:
        c.child("worker-0").retired = True
        c.child("worker-0").proc.returncode = 0
        c.step(0.0)
        assert not c.sup.events
        c.child("scheduler").proc.returncode = 1
        c.step(1.0)
        assert c.sup.gave_up("scheduler") and "restarts are off" in c.sup.events[0].message
    finally:
        c.sup.stop()


def notify(env: dict[str, str], text: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text, env["NOTIFY_SOCKET"])


def test_the_watchdog_kills_a_silent_child_once_it_spoke_the_protocol():
    c = FakeCluster(POLICY)
    try:
        fe, w = c.child("frontend"), c.child("worker-0")
        assert c.watches["worker-0"]["WATCHDOG_USEC"] == "2000000"
        c.step(0.0)
        c.step(10.0)  # never announced itself: its silence does not count
        assert w.proc.signals == []
        notify(c.watches["worker-0"], b"READY=1\nSTATUS=serving")
        notify(c.watches["frontend"], b"READY=1")
        c.step(10.0)
        notify(c.watches["frontend"], b"WATCHDOG=1")
        c.step(11.9)
        notify(c.watches["frontend"], b"WATCHDOG=1")
        notify(c.watches["worker-0"], b"STATUS=unhealthy: engine step running for 5 s")
        c.step(12.1)  # worker: 2.1 s without a ping
        assert w.proc.signals == [signal.SIGABRT, signal.SIGCONT] and fe.proc.signals == []
        assert "engine step running" in c.sup.events[-1].message
        c.step(13.2)  # still there after kill_timeout_s: SIGKILL
        assert w.proc.signals[-1] == signal.SIGKILL
        c.step(13.3)  # its exit is a failure like any other
        assert c.sup.restarting("worker-0")
    finally:
        c.sup.stop()


# ---- the notify protocol from the service's side --------------------------------------------------------

def test_notifier_is_a_no_op_without_a_manager():
    n = sd_notify.Notifier(env={})
    assert not n.enabled and n.watchdog_s is None and n.ready() is False


def test_notifier_honours_watchdog_pid_and_abstract_sockets(tmp_path):
    assert sd_notify.Notifier(env={"NOTIFY_SOCKET": "x", "WATCHDOG_USEC": "1000000",
                                   "WATCHDOG_PID": "1"}).watchdog_s is None  # meant for another process
    assert sd_notify.Notifier(env={"NOTIFY_SOCKET": "x", "WATCHDOG_USEC": "1000000",
                                   "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 1.0
    name = f"@kvferry-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name[1:])
        assert sd_notify.Notifier(env={"NOTIFY_SOCKET": name}).notify(status="hi")
        assert srv.recv(100) == b"STATUS=hi"


async def test_pings_go_out_only_while_healthy(tmp_path):
    path = str(tmp_path / "n.sock")
    healthy = threading.Event()
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        srv.setblocking(False)

        async def recv(timeout: float = 5.0) -> bytes:
            return await asyncio.wait_for(loop.sock_recv(srv, 100), timeout)

        n = sd_notify.start("up", lambda: (healthy.is_set(), "engine stuck"),
                            env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "300000"})
        try:
            assert await recv() == b"READY=1\nSTATUS=up"
            assert await recv() == b"STATUS=unhealthy: engine stuck"  # once, not every interval
            with pytest.raises(asyncio.TimeoutError):
                await recv(0.5)
            healthy.set()
            assert await recv() == b"WATCHDOG=1"
            n.stopping()
            assert b"STOPPING=1" in {await recv() for _ in range(3)}
        finally:
            for task in list(sd_notify._tasks):
                task.cancel()
            await asyncio.sleep(0)
