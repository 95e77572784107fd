"""`kvferry up` as a user runs it: all services start, and none outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from services.launcher import free_ports
from testkit.wait import wait_until


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def start_up(http: int, base: int, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "up", "--engine", "sim", "--model", "instant",
                             "--workers", "2", "--http-port", str(http), "--base-port", str(base)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 90
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "scheduler  :" in line:
            kids = children_of(proc.pid)
            assert len(kids) == 4, kids  # scheduler, 2 workers, frontend
            return proc, kids
    proc.kill()
    raise AssertionError(f"kvferry up did not come up: {lines}")


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> None:
    wait_until(lambda: not any(alive(p) for p in pids), timeout_s,
               lambda: f"every process to exit; still running: {[p for p in pids if alive(p)]}", step_s=0.1)


def test_sigterm_stops_every_service():
    http, base = free_ports(2)
    proc, kids = start_up(http, base)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        wait_gone(kids)
    finally:
        proc.kill()


def test_without_restarts_a_child_dying_first_stops_the_cluster():
    http, base = free_ports(2)
    proc, kids = start_up(http, base, env={"KVFERRY_SUPERVISOR_RESTART": "false", "KVFERRY_SUPERVISOR_WATCHDOG_S": "0"})
    try:
        os.kill(kids[1], signal.SIGKILL)  # a worker dies
        assert proc.wait(20) == 1
        wait_gone(kids)
    finally:
        proc.kill()


def test_a_scheduler_given_up_stops_the_cluster_with_an_error():
    """A killed scheduler is restarted; once its start limit is hit it is given up, and with no
    scheduler the cluster cannot serve: `kvferry up` says so and exits 1, every child gone."""
    http, base = free_ports(2)
    proc, kids = start_up(http, base, env={"KVFERRY_SUPERVISOR_START_LIMIT_BURST": "1"})
    try:
        scheduler = kids[0]
        os.kill(scheduler, signal.SIGKILL)
        assert "scheduler exited with status -9 (SIGKILL); restarted (attempt 1" in read_until(proc, "restarted")
        (again,) = [p for p in children_of(proc.pid) if p not in kids]
        os.kill(again, signal.SIGKILL)
        assert "giving up on it" in read_until(proc, "giving up")
        assert "cannot serve any more: scheduler was given up" in read_until(proc, "cannot serve")
        assert proc.wait(30) == 1
        wait_gone(kids + [again])
    finally:
        proc.kill()


def read_until(proc: subprocess.Popen[str], needle: str, timeout_s: float = 30.0) -> str:
    """The next line of `proc`'s stdout that contains `needle` (a line that never comes: the
    timeout kills `proc`, which ends the read)."""
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if needle in line:
                return line
    finally:
        timer.cancel()
    raise AssertionError(f"no line with {needle!r}")


@pytest.mark.parametrize("args", [["--workers", "0"]])
def test_bad_arguments_exit_2(args):
    out = subprocess.run([sys.executable, "-m", "cli.main", "up", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "error:" in out.stderr
