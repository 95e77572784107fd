"""CurveZMQ for every kvferry socket: key files, the one helper that secures a socket, ZAP.

Keys are per role, in one directory (`[cluster] curve_keys_dir`; `kvferry keys generate DIR`):

    DIR/scheduler.key  DIR/scheduler.key_secret     the scheduler (its ROUTER; its DEALERs to workers)
    DIR/frontend.key   DIR/frontend.key_secret      frontends (SDK ROUTER, token PULL; DEALERs out)
    DIR/worker.key     DIR/worker.key_secret        workers (control and migration ROUTERs; DEALERs, PUSH)
    DIR/client.key     DIR/client.key_secret        SDK clients, `kvferry ctl`, the pool manager
    DIR/<name>.key     (optional) more client identities, e.g. one per SDK user

Files use ZeroMQ's certificate format (zmq.auth.load_certificate reads them) and mode 0600. Every
process of a role shares that role's keypair: it serves with it and connects with it. A process
needs its own role's `.key_secret` and the `.key` (public) files; a client needs the public key of
the role it connects to and its own keypair. Every binding socket is a Curve server whose ZAP
handler accepts exactly the public keys of the `*.key` files in the directory (re-read when a
file is added or removed), so removing `alice.key` locks alice out without a restart.

Which keys a process uses is attached to its ZeroMQ context (`use_curve(ctx, keys)`, once where the
context is created); `secure(sock, server=..., server_role=...)` then configures each socket before
it binds or connects, and is a no-op on a context without keys (Curve off: nothing changes).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85

log = logging.getLogger("kvferry.security")

ROLES = ("scheduler", "frontend", "worker", "client")
"""The keypairs `kvferry keys generate` writes by default."""
SERVER_ROLES = ("scheduler", "frontend", "worker")
"""Roles that bind sockets: clients connect with one of their public keys as the server key."""

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class KeyFileError(ValueError):
    """A key directory or key file is missing or unreadable; the message names the file."""


# ---- key files -----------------------------------------------------------------------------------

def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise KeyFileError(f"key name {name!r}: use lowercase letters, digits, '_', '.', '-' (a file name)")
    return name


def _write_private(path: Path, text: str, force: bool) -> None:
    """Create `path` with mode 0600 from the start (no window where a secret is world-readable)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists (use --force to replace it)") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(fd, 0o600)  # O_TRUNC keeps an existing file's mode
        f.write(text)


def _certificate(name: str, public: bytes, secret: bytes | None) -> str:
    lines = [f"#   kvferry CurveZMQ {'secret' if secret else 'public'} key of {name!r} "
             f"(`kvferry keys generate`){'; keep it private' if secret else ''}",
             "metadata", f'    name = "{name}"', "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def generate_keys(directory: str | os.PathLike[str], names: Iterable[str] = ROLES, *,
                  force: bool = False) -> list[Path]:
    """Write a new keypair per name (`NAME.key` public, `NAME.key_secret` both halves, mode 0600)
    into `directory` (created with mode 0700). Refuses to overwrite unless `force`. Returns the
    files written."""
    names = [_check_name(n) for n in names]
    if not names:
        raise KeyFileError("no key names given")
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not force:
        for n in names:
            for suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX):
                if (d / f"{n}{suffix}").exists():
                    raise KeyFileError(f"{d / (n + suffix)} exists (use --force to replace it)")
    written = []
    for n in names:
        public, secret = zmq.curve_keypair()
        for suffix, text in ((SECRET_SUFFIX, _certificate(n, public, secret)),
                             (PUBLIC_SUFFIX, _certificate(n, public, None))):
            path = d / f"{n}{suffix}"
            _write_private(path, text, force)
            written.append(path)
    return written


def _valid_key(key: bytes | None, path: Path, what: str) -> bytes:
    if key is None or len(key) != 40:
        raise KeyFileError(f"{path}: no valid {what} key (40 Z85 characters)")
    try:
        z85.decode(key)
    except (ValueError, KeyError, TypeError):
        raise KeyFileError(f"{path}: the {what} key is not Z85") from None
    return key


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None
    return _valid_key(public, path, "public"), None if secret is None else _valid_key(secret, path, "secret")


def read_public_key(directory: str | os.PathLike[str], name: str) -> bytes:
    """The Z85 public key in `directory/NAME.key`."""
    return _read_certificate(Path(directory) / f"{_check_name(name)}{PUBLIC_SUFFIX}")[0]


def read_keypair(directory: str | os.PathLike[str], name: str) -> tuple[bytes, bytes]:
    """(public, secret) from `directory/NAME.key_secret`."""
    path = Path(directory) / f"{_check_name(name)}{SECRET_SUFFIX}"
    public, secret = _read_certificate(path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key")
    with contextlib.suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("secret key file %s is readable by others (chmod 600 it)", path)
    return public, secret


@dataclass(frozen=True)
class CurveKeys:
    """What one process needs: its own keypair, the public keys of the servers it connects to (by
    role), and for serving, the directory whose `*.key` files list the clients it accepts."""

    public: bytes
    secret: bytes
    server_keys: Mapping[str, bytes] = field(default_factory=dict)
    allow_dir: str | None = None
    name: str = ""

    def server_key(self, role: str) -> bytes:
        key = self.server_keys.get(role)
        if key is None:
            where = f" ({self.allow_dir}/{role}{PUBLIC_SUFFIX})" if self.allow_dir else ""
            raise KeyFileError(f"no public key for {role!r} servers{where}")
        return key


_loaded: dict[tuple[str, str], CurveKeys] = {}
_loaded_lock = threading.Lock()


def load_keys(directory: str | os.PathLike[str], name: str) -> CurveKeys:
    """Keys of a process with identity `name` (a role) from `directory` (cached per process).
    Raises KeyFileError when its secret key file or the directory is missing."""
    d = str(Path(directory).resolve())
    with _loaded_lock:
        keys = _loaded.get((d, name))
        if keys is not None:
            return keys
        if not os.path.isdir(d):
            raise KeyFileError(f"curve key directory {d} does not exist (kvferry keys generate {directory})")
        public, secret = read_keypair(d, name)
        servers = {}
        for role in SERVER_ROLES:
            path = Path(d) / f"{role}{PUBLIC_SUFFIX}"
            if path.exists():
                servers[role] = _read_certificate(path)[0]
        keys = _loaded[(d, name)] = CurveKeys(public, secret, servers, d, name)
        return keys


def curve_keys(cluster: Any, role: str) -> CurveKeys | None:
    """The keys of a `role` process under `cluster` (protocol.ClusterAddresses): None when
    `curve_keys_dir` is empty (Curve off)."""
    directory = getattr(cluster, "curve_keys_dir", "")
    return load_keys(directory, role) if directory else None


# ---- contexts and sockets ------------------------------------------------------------------------

_context_keys: "weakref.WeakKeyDictionary[zmq.Context, CurveKeys]" = weakref.WeakKeyDictionary()


def use_curve(ctx: zmq.Context, keys: CurveKeys | None) -> zmq.Context:
    """Make every socket that `secure` configures on `ctx` use Curve with `keys` (None: no-op).
    Call once, where the process creates its context. Returns `ctx`."""
    if keys is not None:
        _context_keys[ctx] = keys
    return ctx


def curve_of(ctx: zmq.Context) -> CurveKeys | None:
    """The keys attached to `ctx`, or None (Curve off)."""
    return _context_keys.get(ctx)


def secure(sock: zmq.Socket, *, server: bool, server_role: str | None = None) -> None:
    """Configure `sock` as a Curve server (a socket that binds) or client (one that connects to a
    `server_role` socket) when its context has keys (`use_curve`); otherwise leave it alone.
    Call before bind/connect. Every kvferry socket factory calls this."""
    keys = curve_of(sock.context)
    if keys is None:
        return
    if server:
        if keys.allow_dir is None:
            raise KeyFileError("these Curve keys have no key directory: they cannot serve (no client list)")
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, _zap_domain(keys.allow_dir))
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never accept anyone
        _zap_handler(sock.context).allow(keys.allow_dir)
        return
    if server_role is None:
        # A socket left out by mistake would silently fail the handshake: fail loudly instead.
        raise ValueError("Curve is on: a connecting socket must name the role of its server (server_role=...)")
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key(server_role))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


# ---- ZAP: which clients a server accepts ---------------------------------------------------------

def _zap_domain(directory: str) -> str:
    # One handler per context may serve sockets of several key directories (tests): the domain
    # names the directory.
    return "kvferry-" + hashlib.sha256(directory.encode()).hexdigest()[:16]


class _AllowList:
    """The public keys of the `*.key` files in a directory, re-read when the directory changes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._stamp: int | None = None
        self._keys: frozenset[bytes] = frozenset()

    def keys(self) -> frozenset[bytes]:
        try:
            stamp = os.stat(self.directory).st_mtime_ns
        except OSError:
            return frozenset()  # the directory is gone: nobody gets in
        if stamp != self._stamp:
            keys = set()
            for path in sorted(Path(self.directory).glob(f"*{PUBLIC_SUFFIX}")):
                try:
                    keys.add(z85.decode(_read_certificate(path)[0]))
                except KeyFileError as exc:
                    log.warning("curve: skipping %s", exc)
            self._keys, self._stamp = frozenset(keys), stamp
        return self._keys


class _ZapHandler:
    """A ZAP handler (RFC 27) on its own thread, for one context: accepts a CURVE client whose
    public key is in the allow-list of the socket's domain, refuses everything else.

    Its socket is created outside the context's socket list, so `ctx.destroy()` does not close it
    under the thread; `ctx.term()` wakes the thread with ETERM and it closes the socket itself."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.domains: dict[str, _AllowList] = {}
        self.sock = zmq.Socket(ctx, zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self._last_log = 0.0
        self.thread = threading.Thread(target=self._run, name="kvferry-zap", daemon=True)
        self.thread.start()

    def allow(self, directory: str) -> None:
        domain = _zap_domain(directory)
        if domain not in self.domains:
            self.domains[domain] = _AllowList(directory)

    def _run(self) -> None:
        try:
            while True:
                try:
                    request = self.sock.recv_multipart()
                except zmq.ContextTerminated:
                    return
                try:
                    self.sock.send_multipart(self._answer(request))
                except zmq.ContextTerminated:
                    return
        finally:
            self.sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = request[:6]
        credentials = request[6:]
        allow = self.domains.get(domain.decode("utf-8", "replace"))
        ok = (version == b"1.0" and mechanism == b"CURVE" and allow is not None and len(credentials) == 1
              and credentials[0] in allow.keys())
        if ok:
            return [b"1.0", request_id, b"200", b"OK", z85.encode(credentials[0]), b""]
        now = time.monotonic()
        if now - self._last_log > 1.0:  # a scanner must not flood the log
            self._last_log = now
            log.warning("curve: refused a %s client from %s (key not in the allowed list)",
                        mechanism.decode("ascii", "replace"), address.decode("ascii", "replace"))
        return [b"1.0", request_id, b"400", b"not allowed", b"", b""]


_handlers: "weakref.WeakKeyDictionary[zmq.Context, _ZapHandler]" = weakref.WeakKeyDictionary()
_handlers_lock = threading.Lock()


def _zap_handler(ctx: zmq.Context) -> _ZapHandler:
    with _handlers_lock:
        handler = _handlers.get(ctx)
        if handler is None or not handler.thread.is_alive():
            handler = _handlers[ctx] = _ZapHandler(ctx)
        return handler
