"""Linux network namespaces as test "hosts", joined by veth pairs to one bridge (iproute2's `ip`).

Layout of one run (PREFIX = `kvf<pid>`, the creating process's pid, so leftovers of a dead run
are recognisable):

    namespace PREFIX-br   the bridge `kvbr`, one port per host (`v<name>`) and `vroot`; no address
    namespace PREFIX-<n>  host n: `lo` and `eth0` (the other end of `v<n>`) with its address
    root namespace        `PREFIX-r` (the other end of `vroot`): the test process reaches the hosts

Addresses: only in 10.213.0.0/24 (SUBNET), split into /28 slots so that concurrent runs (two
checkouts' `make test`, two xdist workers) never share a route: a run holds slot k (an flock
under LOCK_DIR, released when its process dies) and uses 10.213.0.16k+1 .. for its hosts and
16k+14 for the root side. Nothing is routed anywhere else: the slot's /28 is on-link on these
veths only. Namespaces and the root-side veth are removed by `close()`; `sweep()` removes what
runs whose creating process is gone left behind (the slot lock proves a root-side address in our
slot stale).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SUBNET = ipaddress.IPv4Network("10.213.0.0/24")
SLOT_PREFIXLEN = 28
SLOTS = 2 ** (SLOT_PREFIXLEN - SUBNET.prefixlen)  # 16 slots of 16 addresses
MAX_HOSTS = 13  # .1 .. .13 of a slot; .14 is the root side
ROOT_OFFSET = 14
LOCK_DIR = Path("/run/kvferry-netns")
BRIDGE = "kvbr"
NAME_RE = re.compile(r"^kvf(\d+)-")
IP_TIMEOUT_S = 20.0
CLONE_NEWNET = 0x40000000  # <sched.h>
_OPEN_PREFIXES: set[str] = set()  # the networks this process has open (names carry only the pid)


class NetnsError(RuntimeError):
    """An `ip` command failed (its stderr in the message)."""


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip` / `unshare`, or `ip netns add` fails)."""


def ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS`; its stdout. Raises NetnsError (with stderr) when it fails and `check`."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if check and out.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out.stdout


def netns_names() -> list[str]:
    """Every named namespace (`ip netns list`), without the `(id: N)` suffix."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def root_links() -> list[str]:
    """Interface names of the root namespace (`ip -o link`; `name@peer` shortened to `name`)."""
    return [line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link", "show").splitlines()
            if line.count(":") >= 2]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_available() -> None:
    """Raise NetnsUnavailable with the reason when this machine cannot host the namespaces."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    for tool in ("ip", "unshare", "hostname"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"no `{tool}` command")
    probe = f"kvf{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        raise NetnsUnavailable(f"`ip netns add` fails here: {exc}") from None
    ip("netns", "del", probe, check=False)


def enter(netns: str) -> None:
    """Move the calling thread into namespace `netns` (setns(2), as `ip netns exec` does). Call it
    first thing in a fresh process, before any thread starts: threads started later inherit it
    (bench.transfer's spawned peers). Python 3.11 has no os.setns, hence libc."""
    import ctypes

    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def sweep() -> list[str]:
    """Remove namespaces and root-namespace links named `kvf<pid>-...` whose pid is no longer
    running (a run killed before its teardown). Returns what was removed."""
    removed = []
    for link in root_links():
        m = NAME_RE.match(link)
        if m and not _pid_alive(int(m.group(1))):
            ip("link", "del", link, check=False)
            removed.append(link)
    for ns in netns_names():
        m = NAME_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed


@dataclass(frozen=True)
class NetHost:
    """One host's namespace, address and bridge port."""

    name: str  # "a", "b", ...
    netns: str  # the namespace (also its host name: unique per run)
    address: str  # on its eth0
    bridge_port: str  # its veth end in the bridge namespace (link_down / link_up act on it)


class HostNetwork:
    """The namespaces of one run (see the module docstring). `open()` builds them; `close()`
    removes them and is safe to call any number of times, from any cleanup path."""

    def __init__(self, names: list[str], prefix: str | None = None) -> None:
        if not 1 <= len(names) <= MAX_HOSTS or len(set(names)) != len(names):
            raise ValueError(f"need 1..{MAX_HOSTS} distinct host names, not {names}")
        if any(not re.fullmatch(r"[a-z0-9]{1,4}", n) or n == "br" for n in names):
            raise ValueError(f"host names are 1-4 lowercase letters or digits, not br (interface names <= 15): "
                             f"{names}")
        self.prefix = prefix or f"kvf{os.getpid()}"
        self.names = names
        self.bridge_ns = f"{self.prefix}-br"
        self.root_link = f"{self.prefix}-r"
        self.hosts: dict[str, NetHost] = {}
        self.slot = -1
        self._lock_fd: int | None = None

    # ---- building ---------------------------------------------------------------------------------

    def _take_slot(self) -> int:
        LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
        for k in range(SLOTS):
            fd = os.open(LOCK_DIR / f"slot-{k}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd = fd
            return k
        raise NetnsError(f"all {SLOTS} address slots of {SUBNET} are in use by other runs")

    def _slot_net(self) -> ipaddress.IPv4Network:
        return list(SUBNET.subnets(new_prefix=SLOT_PREFIXLEN))[self.slot]

    def _clear_slot(self) -> None:
        """Remove root-namespace links holding an address of our slot: the slot lock is ours, so
        whoever made them is gone (a run whose pid was reused, which `sweep` cannot tell)."""
        net = self._slot_net()
        for line in ip("-o", "-4", "addr", "show").splitlines():
            parts = line.split()
            name, addr = parts[1].split("@")[0], parts[3]
            if NAME_RE.match(name) and ipaddress.IPv4Interface(addr).ip in net and name != self.root_link:
                ip("link", "del", name, check=False)

    def open(self) -> HostNetwork:
        if self.prefix in _OPEN_PREFIXES:
            raise NetnsError(f"a network named {self.prefix} is already open in this process (one at a time)")
        sweep()
        self.slot = self._take_slot()
        _OPEN_PREFIXES.add(self.prefix)
        try:
            self._clear_slot()
            net = self._slot_net()
            plen = str(SLOT_PREFIXLEN)
            ip("netns", "add", self.bridge_ns)
            ip("-n", self.bridge_ns, "link", "add", "name", BRIDGE, "type", "bridge")
            ip("-n", self.bridge_ns, "link", "set", BRIDGE, "up")
            for k, name in enumerate(self.names):
                ns, port = f"{self.prefix}-{name}", f"v{name}"
                address = str(net.network_address + 1 + k)
                ip("netns", "add", ns)
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", self.bridge_ns, "link", "add", "name", port, "type", "veth", "peer", "name", "eth0",
                   "netns", ns)
                ip("-n", self.bridge_ns, "link", "set", port, "master", BRIDGE, "up")
                ip("-n", ns, "addr", "add", f"{address}/{plen}", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                self.hosts[name] = NetHost(name, ns, address, port)
            ip("link", "add", "name", self.root_link, "type", "veth", "peer", "name", "vroot", "netns",
               self.bridge_ns)
            ip("-n", self.bridge_ns, "link", "set", "vroot", "master", BRIDGE, "up")
            ip("addr", "add", f"{self.root_address}/{plen}", "dev", self.root_link)
            ip("link", "set", self.root_link, "up")
        except BaseException:
            self.close()
            raise
        return self

    @property
    def root_address(self) -> str:
        """The test process's address on the hosts' network."""
        return str(self._slot_net().network_address + ROOT_OFFSET)

    # ---- partitions -------------------------------------------------------------------------------

    def link_down(self, name: str) -> None:
        """Cut host `name` off the bridge (its bridge-side veth down): nothing passes either way."""
        ip("-n", self.bridge_ns, "link", "set", self.hosts[name].bridge_port, "down")

    def link_up(self, name: str) -> None:
        ip("-n", self.bridge_ns, "link", "set", self.hosts[name].bridge_port, "up")

    def link_is_up(self, name: str) -> bool:
        out = ip("-n", self.bridge_ns, "-o", "link", "show", self.hosts[name].bridge_port)
        return "UP" in out.split("<", 1)[1].split(">", 1)[0].split(",")

    # ---- teardown ---------------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """This run's namespaces and root link that still exist (empty after `close()`)."""
        mine = [ns for ns in netns_names() if ns.startswith(self.prefix + "-")]
        return mine + [link for link in root_links() if link == self.root_link]

    def close(self) -> None:
        """Remove the root-side veth (explicitly: a namespace's veths go with it, but the kernel
        destroys them asynchronously), then every namespace of this run; release the slot. Does
        nothing unless this object opened them (the names are the process's)."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(NetnsError, OSError, subprocess.SubprocessError):
            if self.root_link in root_links():
                ip("link", "del", self.root_link, check=False)
        with contextlib.suppress(NetnsError, OSError, subprocess.SubprocessError):
            for ns in netns_names():
                if ns.startswith(self.prefix + "-"):
                    ip("netns", "del", ns, check=False)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            _OPEN_PREFIXES.discard(self.prefix)

    def __enter__(self) -> HostNetwork:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
