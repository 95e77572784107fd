"""A kvferry cluster over several "hosts": Linux network namespaces (testkit.netns), each service
also in its own UTS namespace with the host's name, started with the systemd units' own command
lines (testkit.units) and a per-host copy of deploy/kvferry.toml.

Why: everything kvferry says about several hosts (the frames KV path between workers of
different hosts, `[cluster] host` / `bind_host` / `[cluster.overrides]`, CurveZMQ across the
network) otherwise only runs on loopback. Here every address is a host's own, other hosts reach
it over a bridge, `socket.gethostname()` differs per host, and a host can be cut off
(`link_down`) or lose a process (`kill`).

    with MultiHost({"a": ["scheduler", "frontend"], "b": ["worker", "worker"], "c": ["worker"]},
                   tmp_dir, worker={...}) as mh:
        mh.http_url, mh.scheduler_endpoint, mh.worker_ids("b"), mh.link_down("c"), mh.kill("c-0")

Every process runs as `ip netns exec NS unshare --uts sh -c 'hostname H && exec ARGV'` (one
process: each step execs the next) in its own process group, with PR_SET_PDEATHSIG; stdout and
stderr go to `<service>.out` / `<service>.err` under `log_dir`. Teardown (`close()`: SIGTERM,
then SIGKILL to each group, then the namespaces) runs from the context manager, an atexit hook
and a SIGTERM handler, so a failed or interrupted run leaves nothing; a run killed outright
(SIGKILL) is swept by the next one (testkit.netns.sweep).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.config import to_toml  # kvferry's own writer, as `kvferry config show` uses
from testkit.netns import HostNetwork, NetHost, check_available
from testkit.units import ENV_FILE, ROOT, unit_command
from testkit.wait import WaitTimeout, wait_until

KVFERRY = str(Path(sys.executable).parent / "kvferry")
DEPLOY_TOML = ROOT / "deploy" / "kvferry.toml"
READY_S = 180.0  # a torch worker's first start on a loaded 2-core machine
STOP_S = 10.0  # SIGTERM to SIGKILL
SERVICES = ("scheduler", "frontend", "worker")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Host:
    """One host: its namespace and address, its host name, its copy of the configuration."""

    net: NetHost
    config_path: Path

    @property
    def name(self) -> str:
        return self.net.name

    @property
    def hostname(self) -> str:
        return self.net.netns  # unique per run, so worker ids (`<host name>-<index>`) are too

    @property
    def address(self) -> str:
        return self.net.address


@dataclass(eq=False)
class Service:
    """One kvferry process on a host. `name`: "scheduler", "frontend" or the worker id."""

    name: str
    kind: str
    host: Host
    index: int | None
    argv: list[str]
    env: dict[str, str]
    out_path: Path
    err_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def ready_line(self) -> str | None:
        """The READY line this start printed (stdout is truncated at each start)."""
        with contextlib.suppress(OSError):
            for line in self.out_path.read_text(errors="replace").splitlines(keepends=True):
                if line.startswith("READY ") and line.endswith("\n"):
                    return line.strip()
        return None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def tail(self, chars: int = 3000) -> str:
        parts = []
        for path in (self.out_path, self.err_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if text.strip():
                    parts.append(f"--- {path.name} (last {min(chars, len(text))} of {len(text)} chars)\n"
                                 f"{text[-chars:]}")
        status = "running" if self.running() else f"exited {None if self.proc is None else self.proc.returncode}"
        return f"=== {self.name} on host {self.host.name} ({status})\n" + ("\n".join(parts) or "(no output)")


# ---- teardown hooks: every MultiHost still open is closed at exit and on SIGTERM -----------------

_OPEN: set[MultiHost] = set()
_HOOKS_LOCK = threading.Lock()
_hooks_installed = False
_previous_sigterm: Any = signal.SIG_DFL


def _close_all() -> None:
    for mh in list(_OPEN):
        mh.close()


def _on_sigterm(signum: int, frame: object) -> None:
    _close_all()
    signal.signal(signal.SIGTERM, _previous_sigterm)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_hooks() -> None:
    global _hooks_installed, _previous_sigterm
    with _HOOKS_LOCK:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(_close_all)
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGTERM)
            _previous_sigterm = prev if prev not in (None, _on_sigterm) else signal.SIG_DFL
            signal.signal(signal.SIGTERM, _on_sigterm)


def scrape(url: str) -> dict[str, float]:
    """A /metrics page as {series with its labels, as written: value}."""
    import httpx

    out = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


class MultiHost:
    """Hosts (namespaces) and the kvferry services on them; see the module docstring.

    `layout`: host name → the services it runs, in order ("scheduler", "frontend", "worker"; a
    host's workers get indexes 0, 1, ... as `kvferry-worker@N` would). Exactly one host runs the
    scheduler: every other host's `[cluster.overrides] scheduler` points at it.
    `worker`, `scheduler`, `frontend`: settings laid over deploy/kvferry.toml's sections;
    `env`: lines added to the units' environment file (e.g. KVFERRY_WORKER_DEVICE=cpu, as
    kvferry.env says for a CPU-only host). `curve`: generate keys (`kvferry keys generate`) and
    set `[cluster] curve_keys_dir` on every host."""

    def __init__(self, layout: dict[str, list[str]], log_dir: Path, *, worker: dict[str, Any] | None = None,
                 scheduler: dict[str, Any] | None = None, frontend: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, curve: bool = True, ready_s: float = READY_S) -> None:
        for host, services in layout.items():
            bad = [s for s in services if s not in SERVICES]
            if bad:
                raise ValueError(f"host {host}: unknown services {bad}")
        sched = [h for h, s in layout.items() if "scheduler" in s]
        if len(sched) != 1:
            raise ValueError("exactly one host runs the scheduler")
        self.layout = layout
        self.scheduler_host = sched[0]
        self.log_dir = log_dir
        self.sections = {"worker": worker or {}, "scheduler": scheduler or {}, "frontend": frontend or {}}
        self.env_lines = env or {}
        self.curve = curve
        self.ready_s = ready_s
        self.net = HostNetwork(list(layout))
        self.hosts: dict[str, Host] = {}
        self.services: dict[str, Service] = {}
        self.keys_dir = log_dir / "curve-keys"
        self.base = tomllib.loads(DEPLOY_TOML.read_text())
        self._spawner: ThreadPoolExecutor | None = None
        self._closed = False

    # ---- addresses ----------------------------------------------------------------------------------

    def address(self, host: str) -> str:
        return self.hosts[host].address

    @property
    def base_port(self) -> int:
        return int(self.base["cluster"].get("base_port", 17100))

    @property
    def scheduler_endpoint(self) -> str:
        return f"tcp://{self.address(self.scheduler_host)}:{self.base_port}"

    def _frontend_host(self) -> str:
        return next(h for h, s in self.layout.items() if "frontend" in s)

    @property
    def http_url(self) -> str:
        return f"http://{self.address(self._frontend_host())}:{self.base['cluster'].get('http_port', 8000)}"

    @property
    def sdk_endpoint(self) -> str:
        return f"tcp://{self.address(self._frontend_host())}:{self.base_port + 1}"

    @property
    def tokens_endpoint(self) -> str:
        return f"tcp://{self.address(self._frontend_host())}:{self.base_port + 2}"

    def worker_endpoints(self, worker_id: str) -> tuple[str, str]:
        """(control, migration) of a worker, from its host's address and index."""
        s = self.services[worker_id]
        port = self.base_port + 100 + 2 * (s.index or 0)
        return f"tcp://{s.host.address}:{port}", f"tcp://{s.host.address}:{port + 1}"

    def worker_ids(self, host: str | None = None) -> list[str]:
        return [s.name for s in self.services.values() if s.kind == "worker" and (host is None or s.host.name == host)]

    def metrics_url(self, name: str) -> str:
        """The /metrics URL of the scheduler or a worker (deploy/kvferry.toml's metrics ports)."""
        s = self.services[name]
        if s.kind == "worker":
            port = int(self._settings(s.host.name)["worker"]["metrics_port"]) + (s.index or 0)
        elif s.kind == "scheduler":
            port = int(self._settings(s.host.name)["scheduler"]["metrics_port"])
        else:
            return f"{self.http_url}/metrics"
        return f"http://{s.host.address}:{port}/metrics"

    async def ask(self, msg: Any, timeout: float = 5.0) -> Any:
        """One request to the scheduler, from the root namespace across the bridge (with the
        `client` keys when Curve is on): quicker than starting `kvferry ctl`."""
        import zmq
        import zmq.asyncio

        from protocol import SchedulerReplies
        from protocol.security import load_keys, use_curve
        from protocol.sockets import MessageSocket, request

        ctx = zmq.asyncio.Context()
        if self.curve:
            use_curve(ctx, load_keys(str(self.keys_dir), "client"))
        sock = MessageSocket.connect(ctx, zmq.DEALER, self.scheduler_endpoint, SchedulerReplies,
                                     server_role="scheduler")
        try:
            return await request(sock, msg, timeout_s=timeout)
        finally:
            sock.close()
            ctx.destroy(linger=0)

    # ---- start ---------------------------------------------------------------------------------------

    def _settings(self, host: str) -> dict[str, dict[str, Any]]:
        """deploy/kvferry.toml with this host's addresses and the test's sections."""
        data = {section: dict(values) for section, values in self.base.items()}
        address = self.address(host)
        cluster = data.setdefault("cluster", {})
        cluster.update(host=address, bind_host=address, http_host=address)
        if self.curve:
            cluster["curve_keys_dir"] = str(self.keys_dir)
        if host != self.scheduler_host:
            cluster["overrides"] = {**cluster.get("overrides", {}), "scheduler": self.scheduler_endpoint}
        for section, values in self.sections.items():
            data.setdefault(section, {}).update(values)
        return data

    def open(self) -> MultiHost:
        """Build the hosts, write the configuration, start every service, wait for READY lines."""
        check_available()
        _install_hooks()
        _OPEN.add(self)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.net.open()
            self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multihost-spawner")
            if self.curve:
                out = subprocess.run([KVFERRY, "keys", "generate", str(self.keys_dir)], capture_output=True,
                                     text=True, timeout=60, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"kvferry keys generate: {out.stderr}")
            env_file = self.log_dir / "kvferry.env"
            env_file.write_text(ENV_FILE.read_text() + "".join(f"{k}={v}\n" for k, v in self.env_lines.items()))
            for name, net_host in self.net.hosts.items():
                path = self.log_dir / f"kvferry-{name}.toml"
                self.hosts[name] = Host(net_host, path)
            for name, host in self.hosts.items():
                host.config_path.write_text(to_toml(self._settings(name)))
                index = 0
                for kind in self.layout[name]:
                    cmd = unit_command(kind, hostname=host.hostname, kvferry=KVFERRY, config=str(host.config_path),
                                       env_text=env_file.read_text(), instance=str(index) if kind == "worker" else "")
                    worker = kind == "worker"
                    sname = f"{host.hostname}-{index}" if worker else kind
                    self.services[sname] = Service(sname, kind, host, index if worker else None, cmd.argv, cmd.env,
                                                   self.log_dir / f"{sname}.out", self.log_dir / f"{sname}.err")
                    index += worker
            for s in self.services.values():
                self._spawn(s)
            self.wait_ready(list(self.services))
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, s: Service) -> None:
        """Start `s` in its host's namespaces (from the spawner thread: PR_SET_PDEATHSIG follows the
        forking thread, which lives as long as this object)."""
        assert self._spawner is not None
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
        argv = ["ip", "netns", "exec", s.host.net.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                s.host.hostname, *s.argv]

        def start() -> subprocess.Popen[bytes]:
            with open(s.out_path, "wb") as out, open(s.err_path, "ab") as err:
                err.write(f"\n===== start {s.starts + 1}: {' '.join(s.argv)}\n".encode())
                err.flush()
                return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.log_dir,
                                        env={**base_env, **s.env}, start_new_session=True,
                                        preexec_fn=_die_with_parent)  # noqa: PLW1509 - one prctl call

        s.proc = self._spawner.submit(start).result()
        s.starts += 1

    def wait_ready(self, names: list[str], timeout_s: float | None = None) -> None:
        """Until each of `names` printed READY; raises with the log tails if one exits or the
        deadline passes first."""
        def all_ready() -> bool:
            for n in names:
                s = self.services[n]
                if s.ready_line() is None and not s.running():
                    raise RuntimeError(f"{n} exited with status {s.proc.returncode if s.proc else None} before "
                                       f"READY\n{self.tails([n])}")
            return all(self.services[n].ready_line() is not None for n in names)

        try:
            wait_until(all_ready, timeout_s or self.ready_s, f"READY from {', '.join(names)}", step_s=0.1)
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}\n{self.tails(names)}") from None

    def respawn(self, name: str, timeout_s: float | None = None) -> Service:
        """Start service `name` again (after a kill) with the same command line; waits for READY."""
        s = self.services[name]
        if s.running():
            raise RuntimeError(f"{name} is still running")
        self._spawn(s)
        self.wait_ready([name], timeout_s)
        return s

    # ---- faults --------------------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to service `name`'s process group (default SIGKILL: a crash)."""
        self.services[name].signal_group(sig)

    def link_down(self, host: str) -> None:
        self.net.link_down(host)

    def link_up(self, host: str) -> None:
        self.net.link_up(host)

    # ---- logs and teardown -----------------------------------------------------------------------------

    def tails(self, names: list[str] | None = None, chars: int = 3000) -> str:
        return "\n\n".join(self.services[n].tail(chars) for n in (names or list(self.services)))

    def close(self) -> None:
        """Stop every service (SIGTERM, SIGKILL after STOP_S: each process group), then remove the
        namespaces and the root-side veth. Idempotent."""
        if self._closed:
            return
        self._closed = True
        procs = [s for s in self.services.values() if s.running()]
        for s in procs:  # workers: SIGINT, stop at once (the whole cluster goes: nowhere to drain to)
            s.signal_group(signal.SIGINT if s.kind == "worker" else signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        for s in procs:
            assert s.proc is not None
            try:
                s.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.signal_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    s.proc.wait(10)
        self.net.close()
        if self._spawner is not None:
            self._spawner.shutdown(wait=False)
        with contextlib.suppress(Exception):  # staging buffers of workers killed with -9
            from kv_transfer.shm import sweep_stale_buffers

            sweep_stale_buffers()
        _OPEN.discard(self)

    def leftovers(self) -> list[str]:
        """Namespaces, links and processes of this run still there (empty after `close()`)."""
        procs = [f"{s.name} (pid {s.proc.pid})" for s in self.services.values() if s.proc is not None and s.running()]
        return self.net.leftovers() + procs

    def __enter__(self) -> MultiHost:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
