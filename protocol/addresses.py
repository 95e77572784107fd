"""Every ZeroMQ endpoint of a cluster, derived from one config object.

Defaults: TCP on 127.0.0.1 (nothing listens beyond loopback unless `bind_host` is configured);
`curve_keys_dir` turns on CurveZMQ encryption and authentication (protocol.security).
Port layout from `base_port` (P):

    P                      scheduler (ROUTER)
    P + 1 + 2k, P + 2 + 2k frontend k: SDK endpoint, token ingress (k < MAX_FRONTENDS)
    P + 100 + 2i, P + 101 + 2i   worker i: control, migration

With transport "ipc" the same names become socket files under `ipc_dir`. Any single endpoint
can be pinned in `overrides` under its name ("scheduler", "frontend.0.sdk", "frontend.0.tokens",
"worker.3.control", "worker.3.migration"). Workers announce their endpoints when they register,
so the scheduler's endpoint is the only one every process must know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

MAX_FRONTENDS = 49
_WORKER_PORT_OFFSET = 100
_IPC_PATH_MAX = 107  # sun_path is 108 bytes with the NUL
_ENDPOINT_RE = re.compile(r"^(tcp://[^\s:]+:\d{1,5}|ipc://[^\s]+|inproc://[^\s]+)$")


@dataclass(frozen=True)
class ClusterAddresses:
    """The one place endpoints come from. `host` is what others connect to; `bind_host` is the
    interface services bind (keep 127.0.0.1 unless the cluster spans hosts; then also use CurveZMQ)."""

    transport: Literal["tcp", "ipc"] = "tcp"
    host: str = "127.0.0.1"
    bind_host: str = "127.0.0.1"
    base_port: int = 17100  # below the Linux ephemeral port range
    ipc_dir: str = "/tmp/kvferry"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # CurveZMQ on every socket when set: the directory of `kvferry keys generate` (protocol.security).
    curve_keys_dir: str = ""
    overrides: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.transport not in ("tcp", "ipc"):
            raise ValueError(f"transport must be 'tcp' or 'ipc', not {self.transport!r}")
        if not 1 <= self.base_port <= 65535 - _WORKER_PORT_OFFSET - 2:
            raise ValueError(f"base_port {self.base_port} out of range")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port {self.http_port} out of range")
        for name, ep in self.overrides.items():
            if not _ENDPOINT_RE.match(ep):
                raise ValueError(f"override {name!r}: {ep!r} is not a tcp://host:port, ipc:// or inproc:// endpoint")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClusterAddresses":
        """From a config mapping (TOML table, env-derived dict); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown address settings: {', '.join(sorted(unknown))}")
        return cls(**d)

    # ---- endpoints to connect to -------------------------------------------------------------------

    def _endpoint(self, name: str, port: int) -> str:
        if name in self.overrides:
            return self.overrides[name]
        if self.transport == "ipc":
            path = f"{self.ipc_dir.rstrip('/')}/{name}.sock"
            if len(path) > _IPC_PATH_MAX:
                raise ValueError(f"ipc path {path!r} is longer than {_IPC_PATH_MAX} bytes")
            return f"ipc://{path}"
        if port > 65535:
            raise ValueError(f"{name}: port {port} out of range (base_port {self.base_port})")
        return f"tcp://{self.host}:{port}"

    def scheduler(self) -> str:
        return self._endpoint("scheduler", self.base_port)

    def frontend_sdk(self, k: int = 0) -> str:
        self._check_frontend(k)
        return self._endpoint(f"frontend.{k}.sdk", self.base_port + 1 + 2 * k)

    def frontend_tokens(self, k: int = 0) -> str:
        self._check_frontend(k)
        return self._endpoint(f"frontend.{k}.tokens", self.base_port + 2 + 2 * k)

    def worker_control(self, i: int) -> str:
        return self._endpoint(f"worker.{i}.control", self.base_port + _WORKER_PORT_OFFSET + 2 * i)

    def worker_migration(self, i: int) -> str:
        return self._endpoint(f"worker.{i}.migration", self.base_port + _WORKER_PORT_OFFSET + 1 + 2 * i)

    def http_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    # ---- endpoints to bind -------------------------------------------------------------------------

    def bind(self, endpoint: str) -> str:
        """The address to bind for a connect `endpoint`: tcp host replaced by `bind_host`."""
        if endpoint.startswith("tcp://"):
            _, port = endpoint[6:].rsplit(":", 1)
            return f"tcp://{self.bind_host}:{port}"
        return endpoint

    def scheduler_bind(self) -> str:
        return self.bind(self.scheduler())

    @staticmethod
    def _check_frontend(k: int) -> None:
        if not 0 <= k < MAX_FRONTENDS:
            raise ValueError(f"frontend index {k} out of range [0, {MAX_FRONTENDS})")
