"""Starts a local cluster (scheduler, N workers, frontend) as separate processes and supervises it.

Each child is `python -m cli.main <service>`, configured through KVFERRY_* environment variables
(so the same settings path as compose and systemd), and prints one `READY ...` line on stdout
when it serves. Children die with the launcher (PR_SET_PDEATHSIG) and are stopped together on
stop(). A child that exits without being asked is restarted by a supervisor (services.supervisor:
backoff, start limit, watchdog; `[supervisor]` settings); one stopped on purpose (`kill`, or
scale-in: with `[scheduler] scaling` on, a pool manager (services.pool) starts and stops workers
as the scheduler advises, between `scale_min_instances` and `scale_max_instances`) is not.
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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from services.config import KvferryConfig
from services.supervisor import Supervisor

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


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range: ports picked for services stay below it,
    because a port inside it can be taken meanwhile as some connection's source port (or by a
    reconnecting client's TCP self-connect to a dead listener), and a respawned service that must
    bind the same port again then fails with EADDRINUSE."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(30000, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


def port_slice() -> tuple[int, int]:
    """(i, n) from KVFERRY_PORT_SLICE="i/n": this process picks ports only from the i-th of n
    disjoint ranges, so n concurrent test runners (pytest-xdist workers, tests/conftest.py) never
    pick the same ports between checking them and binding them. Default (0, 1): every range."""
    raw = os.environ.get("KVFERRY_PORT_SLICE", "")
    try:
        i, n = (int(x) for x in raw.split("/"))
    except ValueError:
        return 0, 1
    return (i, n) if 0 <= i < n else (0, 1)


def free_ports(workers: int) -> tuple[int, int]:
    """An HTTP port and a ZeroMQ base port whose scheduler, frontend and worker ports (the layout
    of protocol.ClusterAddresses) are free on 127.0.0.1: for tests and benchmarks."""
    i, n = port_slice()
    bases = range(20000, _ephemeral_low() - 200, 200)[i::n]
    for _ in range(200):
        base = random.choice(bases)
        http = base + 190
        ports = [base, base + 1, base + 2, http] + [base + 100 + k for k in range(2 * workers + 2)]
        if all(_port_free(p) for p in ports):
            return http, base
    raise RuntimeError("no free port range")


def free_port_block(n: int) -> int:
    """The first of `n` consecutive ports free on 127.0.0.1 (metrics endpoints: the scheduler's and
    one per worker index)."""
    i, slices = port_slice()
    width = 8000 // slices
    lo = 11000 + i * width
    for _ in range(200):
        first = random.randrange(lo, lo + width - n)
        if all(_port_free(first + k) for k in range(n)):
            return first
    raise RuntimeError("no free port range")


class LaunchError(RuntimeError):
    """A service did not become ready, or exited early."""


@dataclass(eq=False)
class Child:
    """One service process."""

    name: str
    proc: subprocess.Popen[str]
    ready_line: str = ""
    output: list[str] = field(default_factory=list)  # stdout lines after READY (bounded)
    index: int | None = None  # a worker's index (its ports)
    retired: bool = False  # stopped by scale-in: its exit is no failure
    ready: threading.Event = field(default_factory=threading.Event)  # READY seen, or stdout closed
    early_lines: list[str] = field(default_factory=list)  # stdout up to READY
    service: str = ""  # what `respawn` starts again: the `kvferry` subcommand and its environment
    env: dict[str, str] = field(default_factory=dict, repr=False)
    started_at: float = field(default_factory=time.monotonic)

    @property
    def is_worker(self) -> bool:
        return self.index is not None


@dataclass
class ClusterSpec:
    """What to start: every setting comes from `config` (file + env + flags already merged)."""

    config: KvferryConfig
    num_workers: int = 1
    config_path: str | None = None
    ready_timeout_s: float = 180.0
    extra_env: dict[str, str] = field(default_factory=dict)
    # Prefill/decode roles: workers 0..P-1 prefill, the next D decode, the rest [worker] role.
    prefill_workers: int = 0
    decode_workers: int = 0
    # Called every PROGRESS_EVERY_S while the start waits, with what it waits for (`kvferry up`: print).
    on_progress: Callable[[str], None] | None = None


PROGRESS_EVERY_S = 5.0


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
    """A scheduler, `num_workers` workers and one frontend on this machine; with scaling on, a
    pool manager thread adds and retires workers as the scheduler advises."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.children: list[Child] = []
        self._stopping = False
        self._lock = threading.Lock()  # children: the pool manager adds workers from its thread
        self._worker_env: dict[str, str] = {}
        self.pool = None  # services.pool.PoolManager when scaling
        # Restarts failed children (off with [supervisor] restart = false and watchdog_s = 0).
        sup = spec.config.supervisor
        self.supervisor: Supervisor | None = Supervisor(self, sup) if sup.restart or sup.watchdog_s > 0 else None
        self.exits: deque[Child] = deque(maxlen=100)  # children replaced by a restart, latest last
        # Every child is forked from this one long-lived thread: PR_SET_PDEATHSIG fires when the
        # forking *thread* exits, so a child started from a short-lived thread (asyncio.to_thread,
        # the pool manager's) would be killed with it.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvferry-spawner")

    @property
    def scaling(self) -> bool:
        return self.spec.config.scheduler.scaling

    @property
    def max_workers(self) -> int:
        if not self.scaling:
            return self.spec.num_workers
        return max(self.spec.num_workers, self.spec.config.scheduler.scale_max_instances)

    def workers(self) -> list[Child]:
        """Worker processes not retired nor given up (running, starting, or exited and restarting)."""
        sup = self.supervisor
        with self._lock:
            return [c for c in self.children if c.is_worker and not c.retired
                    and not (sup is not None and sup.gave_up(c.name))]

    def supervised(self) -> list[Child]:
        """The children the supervisor watches: every one not stopped on purpose."""
        with self._lock:
            return [c for c in self.children if not c.retired]

    def current(self, name: str) -> Child | None:
        """The latest process of service `name`."""
        with self._lock:
            return next((c for c in reversed(self.children) if c.name == name), None)

    def restarting(self, child: Child) -> bool:
        """`child` exited and the supervisor will start it again (counts as running for the pool)."""
        return self.supervisor is not None and not child.retired and self.supervisor.restarting(child.name)

    def cannot_serve(self) -> str:
        """Why the cluster can no longer serve ("" while it can): its scheduler or its frontend was
        given up, or every worker that was not stopped on purpose was."""
        sup = self.supervisor
        if sup is None:
            return ""
        for name in ("scheduler", "frontend"):
            if sup.gave_up(name):
                return f"{name} was given up"
        with self._lock:
            workers = [c for c in self.children if c.is_worker and not c.retired]
        if workers and all(sup.gave_up(c.name) for c in workers):
            return "no worker left"
        return ""

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

    def metrics_urls(self) -> dict[str, str]:
        """Prometheus endpoints by service name: the frontend's (on its API port), the scheduler's and
        each running worker's when their `metrics_port` is set (worker i: metrics_port + i)."""
        cfg = self.spec.config
        host = f"http://{cfg.cluster.http_host}"
        urls = {"frontend": f"{self.http_url}/metrics"}
        if cfg.scheduler.metrics_port:
            urls["scheduler"] = f"{host}:{cfg.scheduler.metrics_port}/metrics"
        if cfg.worker.metrics_port:
            for w in self.workers():
                urls[w.name] = f"{host}:{cfg.worker.metrics_port + (w.index or 0)}/metrics"
        return urls

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.spec.config
        base_env = dict(os.environ)
        base_env.update(_env_for("cluster", cfg.cluster.__dict__))
        if cfg.cluster.curve_keys_dir:  # children run in the repository root: an absolute path, checked now
            from protocol.security import ROLES, KeyFileError, load_keys

            keys_dir = str(Path(cfg.cluster.curve_keys_dir).resolve())
            try:
                for role in ROLES:
                    load_keys(keys_dir, role)
            except KeyFileError as exc:
                raise LaunchError(str(exc)) from None
            base_env["KVFERRY_CLUSTER_CURVE_KEYS_DIR"] = keys_dir
        base_env.update(self.spec.extra_env)
        self._worker_env = base_env
        try:
            self._spawn("scheduler", "scheduler", {**base_env, **_env_for("scheduler", cfg.scheduler.__dict__)})
            for i in range(self.spec.num_workers):
                self.start_worker(i)
            self._spawn("frontend", "frontend", {**base_env, **_env_for("frontend", cfg.frontend.__dict__)})
            if self.supervisor is not None:
                self.supervisor.start()
            deadline = time.monotonic() + self.spec.ready_timeout_s
            self._wait_slots_ready([c.name for c in self.children], deadline)
            self._wait_healthy(deadline)
            if self.scaling:
                from services.pool import PoolManager

                self.pool = PoolManager(self)
                self.pool.start()
        except BaseException:
            self.stop()
            raise

    def start_worker(self, index: int) -> Child:
        """Spawn worker `index` (its id and ports follow from the index); does not wait for READY."""
        cfg = self.spec.config
        w = dict(cfg.worker.__dict__, index=index, worker_id=f"worker-{index}", device=self._device_for(index))
        p, d = self.spec.prefill_workers, self.spec.decode_workers
        if index < p + d:
            w["role"] = "prefill" if index < p else "decode"
        threads = self._threads_per_worker()
        if threads and not w.get("threads"):
            w["threads"] = threads
        return self._spawn(f"worker-{index}", "worker", {**self._worker_env, **_env_for("worker", w)}, index=index)

    def next_worker_index(self) -> int:
        """The lowest index no running worker process uses (a retired one may still hold its ports)."""
        with self._lock:
            children = list(self.children)
        used = {c.index for c in children if c.is_worker and (c.proc.poll() is None or self.restarting(c))}
        return next(i for i in range(len(used) + 1) if i not in used)

    def retire_worker(self, name: str) -> Child | None:
        """Stop worker `name` for scale-in (SIGTERM: it deregisters); its exit is no failure."""
        with self._lock:
            child = next((c for c in self.children if c.name == name and c.is_worker and not c.retired), None)
            if child is None:
                return None
            child.retired = True
        if self.supervisor is not None:
            self.supervisor.release(child)
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
        return child

    def _device_for(self, i: int) -> str:
        dev = self.spec.config.worker.device
        return f"cuda:{i}" if dev == "cuda" else dev

    def _threads_per_worker(self) -> int:
        if not self.spec.config.worker.device.startswith("cpu"):
            return 0
        return max(1, (os.cpu_count() or 1) // max(1, self.max_workers))

    def _spawn(self, name: str, service: str, env: dict[str, str], index: int | None = None,
               replaces: Child | None = None) -> Child:
        cmd = [sys.executable, "-m", "cli.main", service]
        if self.spec.config_path:
            cmd += ["--config", str(self.spec.config_path)]
        notify_env, watch = self.supervisor.notify_env(name) if self.supervisor is not None else ({}, None)
        proc = self._spawner.submit(
            subprocess.Popen, cmd, env={**env, **notify_env}, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, preexec_fn=_die_with_parent, cwd=str(Path(__file__).resolve().parents[1])).result()
        child = Child(name, proc, index=index, service=service, env=env)
        with self._lock:
            if replaces is not None and replaces in self.children:
                self.children[self.children.index(replaces)] = child
                self.exits.append(replaces)
            else:
                self.children.append(child)
        if self.supervisor is not None:
            self.supervisor.attach(child, watch)
        self._read_stdout(child)
        return child

    def restart_child(self, old: Child) -> Child:
        """Start `old`'s service again in its place (same name, index, ports, environment); for the
        supervisor. Does not wait for READY."""
        if self.supervisor is not None:
            self.supervisor.release(old)
        return self._spawn(old.name, old.service, old.env, index=old.index, replaces=old)

    @staticmethod
    def _read_stdout(child: Child) -> None:
        """Collect the child's stdout on a thread: lines up to READY (then `ready` is set), after it
        into `output` (bounded). The pipe is always drained, so the child never blocks on it."""
        assert child.proc.stdout is not None

        def read() -> None:
            for line in child.proc.stdout:  # type: ignore[union-attr]
                if not child.ready.is_set():
                    child.early_lines.append(line.rstrip("\n"))
                    if line.startswith("READY"):
                        child.ready_line = line.rstrip("\n")
                        child.ready.set()
                elif len(child.output) < 1000:
                    child.output.append(line.rstrip("\n"))
            child.ready.set()

        threading.Thread(target=read, name=f"stdout-{child.name}", daemon=True).start()

    def _wait_slots_ready(self, names: list[str], deadline: float) -> None:
        """Wait until every service of `names` serves (its latest process printed READY); every
        PROGRESS_EVERY_S tell `on_progress` what is still awaited and what it says it is doing."""
        t0 = last = time.monotonic()
        pending = list(names)
        while True:
            pending = [n for n in pending if not self._slot_ready(n)]
            now = time.monotonic()
            if not pending:
                return
            if now > deadline:
                raise LaunchError(f"{', '.join(pending)} did not become ready within {self.spec.ready_timeout_s:.0f} s")
            if self.spec.on_progress is not None and now - last >= PROGRESS_EVERY_S:
                last = now
                waiting = []
                for n in pending:
                    child = self.current(n)
                    doing = self.supervisor.status_of(child) if self.supervisor is not None and child else ""
                    waiting.append(f"{n} ({doing})" if doing else n)
                self.spec.on_progress(f"waiting for {', '.join(waiting)}: {now - t0:.0f} s")
            time.sleep(0.1)

    def _slot_ready(self, name: str) -> bool:
        """Service `name` serves. Under a supervisor a process that exits first is restarted (and
        waited for again) and a worker given up counts as done; without one, an early exit raises."""
        child = self.current(name)
        assert child is not None
        sup = self.supervisor
        if sup is None or not sup.policy.restart:
            if child.ready.is_set() and not child.ready_line:
                raise LaunchError(f"{name} exited with status {child.proc.wait()} before it was ready")
            return child.ready.is_set()
        if sup.fatal is not None:
            raise LaunchError(sup.fatal)
        if sup.gave_up(name):
            if name in ("scheduler", "frontend"):
                raise LaunchError(f"{name} was given up")
            return True
        return child.ready.is_set() and bool(child.ready_line)

    def _wait_ready(self, child: Child, deadline: float) -> None:
        if not child.ready.wait(max(0.0, deadline - time.monotonic())):
            raise LaunchError(f"{child.name} did not become ready within {self.spec.ready_timeout_s:.0f} s")
        if not child.ready_line:
            raise LaunchError(f"{child.name} exited with status {child.proc.wait()} before it was ready")

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
            if self.supervisor is not None and self.supervisor.policy.restart:
                if self.supervisor.fatal is not None:
                    raise LaunchError(self.supervisor.fatal)
            else:
                dead = self.first_exited()
                if dead is not None:
                    raise LaunchError(f"{dead.name} exited with status {dead.proc.returncode}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{url} did not answer 200 within {self.spec.ready_timeout_s:.0f} s")
            time.sleep(0.1)

    def first_exited(self) -> Child | None:
        """A child that exited on its own (a retired worker's exit does not count; one the supervisor
        restarted does), or None."""
        with self._lock:
            children = list(self.exits) + list(self.children)
        return next((c for c in children if not c.retired and c.proc.poll() is not None), None)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> Child:
        """Send `sig` to the running child `name` (default SIGKILL: a crash; SIGTERM: a worker's
        graceful stop) and count its exit as no failure. Returns the child."""
        with self._lock:
            child = next(c for c in reversed(self.children) if c.name == name and not c.retired)
            child.retired = True
        if self.supervisor is not None:
            self.supervisor.release(child)
        if child.proc.poll() is None:
            child.proc.send_signal(sig)
        return child

    def respawn(self, name: str, timeout_s: float | None = None) -> Child:
        """Start service `name` again with the settings it was first started with (after `kill`),
        and wait until it prints READY."""
        with self._lock:
            old = next(c for c in reversed(self.children) if c.name == name)
        if old.proc.poll() is None:
            raise LaunchError(f"{name} is still running (pid {old.proc.pid})")
        child = self._spawn(name, old.service, old.env, index=old.index)
        self._wait_ready(child, time.monotonic() + (timeout_s or self.spec.ready_timeout_s))
        return child

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the pool manager, then every child (frontend first, scheduler last): SIGTERM, but
        SIGINT for workers (stop now: with the whole cluster going there is nowhere to drain to);
        then SIGKILL what is left, and unlink the staging buffers of workers killed with -9."""
        if self._stopping:
            return
        self._stopping = True
        if self.pool is not None:
            self.pool.stop()
        if self.supervisor is not None:
            self.supervisor.stop()  # first: nothing stopped below is restarted
        with self._lock:
            rank = {"frontend": 0, "scheduler": 2}
            children = sorted(self.children, key=lambda c: rank.get(c.name, 1))  # stable: workers in order
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGINT if child.is_worker else signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for child in children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
        self._spawner.shutdown(wait=False)
        with self._lock:
            killed = any(c.is_worker and c.proc.returncode == -signal.SIGKILL for c in self.children)
        if killed:  # a worker killed with -9 could not unlink its shared-memory staging buffer
            from kv_transfer.shm import sweep_stale_buffers  # imports torch: only on this path

            sweep_stale_buffers()

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
