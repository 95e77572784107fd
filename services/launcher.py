"""Starts a local cluster (scheduler, N workers, frontend) as separate processes and supervises it.

Each child is `python -m cli.main <service>`, configured through KVFERRY_* environment variables
(so the same settings path as compose and systemd), and prints one `READY ...` line on stdout
when it serves. Children die with the launcher (PR_SET_PDEATHSIG) and are stopped together:
on stop(), on a signal, or when any one of them exits first.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.config import KvferryConfig

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(workers: int) -> tuple[int, int]:
    """An HTTP port and a ZeroMQ base port whose scheduler, frontend and worker ports (the layout
    of protocol.ClusterAddresses) are free on 127.0.0.1: for tests and benchmarks."""
    for _ in range(200):
        base = random.randrange(20000, 50000, 200)
        http = base + 190
        ports = [base, base + 1, base + 2, http] + [base + 100 + k for k in range(2 * workers + 2)]
        if all(_port_free(p) for p in ports):
            return http, base
    raise RuntimeError("no free port range")


class LaunchError(RuntimeError):
    """A service did not become ready, or exited early."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    ready_line: str = ""
    output: list[str] = field(default_factory=list)  # stdout lines after READY (bounded)


@dataclass
class ClusterSpec:
    """What to start: every setting comes from `config` (file + env + flags already merged)."""

    config: KvferryConfig
    num_workers: int = 1
    config_path: str | None = None
    ready_timeout_s: float = 180.0
    extra_env: dict[str, str] = field(default_factory=dict)


def _env_for(section: str, values: dict[str, object]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        if key == "overrides":
            continue  # endpoint overrides are passed through the config file only
        if isinstance(value, bool):
            out[f"KVFERRY_{section.upper()}_{key.upper()}"] = "true" if value else "false"
        elif isinstance(value, (int, float)):
            out[f"KVFERRY_{section.upper()}_{key.upper()}"] = str(value)
        elif isinstance(value, str):
            out[f"KVFERRY_{section.upper()}_{key.upper()}"] = f'"{value}"' if value == "" or _looks_numeric(value) else value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return s in ("true", "false")


class LocalCluster:
    """A scheduler, `num_workers` workers and one frontend on this machine."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.children: list[Child] = []
        self._stopping = False

    # ---- endpoints ----------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return self.spec.config.cluster.http_url()

    @property
    def sdk_endpoint(self) -> str:
        return self.spec.config.cluster.frontend_sdk(0)

    @property
    def scheduler_endpoint(self) -> str:
        return self.spec.config.cluster.scheduler()

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.spec.config
        base_env = dict(os.environ)
        base_env.update(_env_for("cluster", cfg.cluster.__dict__))
        base_env.update(self.spec.extra_env)
        threads = self._threads_per_worker()
        try:
            self._spawn("scheduler", "scheduler", {**base_env, **_env_for("scheduler", cfg.scheduler.__dict__)})
            for i in range(self.spec.num_workers):
                w = dict(cfg.worker.__dict__, index=i, worker_id=f"worker-{i}", device=self._device_for(i))
                if threads and not w.get("threads"):
                    w["threads"] = threads
                if cfg.worker.metrics_port:
                    w["metrics_port"] = cfg.worker.metrics_port + i
                self._spawn(f"worker-{i}", "worker", {**base_env, **_env_for("worker", w)})
            self._spawn("frontend", "frontend", {**base_env, **_env_for("frontend", cfg.frontend.__dict__)})
            deadline = time.monotonic() + self.spec.ready_timeout_s
            for child in self.children:
                self._wait_ready(child, deadline)
            self._wait_healthy(deadline)
        except BaseException:
            self.stop()
            raise

    def _device_for(self, i: int) -> str:
        dev = self.spec.config.worker.device
        return f"cuda:{i}" if dev == "cuda" else dev

    def _threads_per_worker(self) -> int:
        if not self.spec.config.worker.device.startswith("cpu"):
            return 0
        return max(1, (os.cpu_count() or 1) // max(1, self.spec.num_workers))

    def _spawn(self, name: str, service: str, env: dict[str, str]) -> None:
        cmd = [sys.executable, "-m", "cli.main", service]
        if self.spec.config_path:
            cmd += ["--config", str(self.spec.config_path)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                bufsize=1, preexec_fn=_die_with_parent, cwd=str(Path(__file__).resolve().parents[1]))
        self.children.append(Child(name, proc))

    def _wait_ready(self, child: Child, deadline: float) -> None:
        assert child.proc.stdout is not None
        lines: list[str] = []
        done = threading.Event()

        def read() -> None:
            for line in child.proc.stdout:  # type: ignore[union-attr]
                if not done.is_set():
                    lines.append(line.rstrip("\n"))
                    if line.startswith("READY"):
                        done.set()
                elif len(child.output) < 1000:
                    child.output.append(line.rstrip("\n"))
            done.set()

        threading.Thread(target=read, name=f"stdout-{child.name}", daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise LaunchError(f"{child.name} did not become ready within {self.spec.ready_timeout_s:.0f} s")
        ready = [ln for ln in lines if ln.startswith("READY")]
        if not ready:
            raise LaunchError(f"{child.name} exited with status {child.proc.wait()} before it was ready")
        child.ready_line = ready[0]

    def _wait_healthy(self, deadline: float) -> None:
        """Ready means serviceable: the frontend's /health says it knows a live worker."""
        import httpx

        url = f"{self.http_url}/health"
        while True:
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            dead = self.first_exited()
            if dead is not None:
                raise LaunchError(f"{dead.name} exited with status {dead.proc.returncode}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{url} did not answer 200 within {self.spec.ready_timeout_s:.0f} s")
            time.sleep(0.1)

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every child (frontend first, scheduler last), then SIGKILL what is left."""
        if self._stopping:
            return
        self._stopping = True
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
