"""One configuration for every service: a TOML file, then environment overrides, then flags.

TOML sections: [cluster] (protocol.ClusterAddresses fields), [scheduler], [worker], [frontend],
[supervisor] (`kvferry up` only).
Environment: KVFERRY_<SECTION>_<FIELD>, e.g. KVFERRY_CLUSTER_BASE_PORT=18000,
KVFERRY_WORKER_MODEL=smollm2. Values from the environment are parsed as TOML scalars where they
parse (numbers, booleans), else taken as strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from policy.config import PolicyConfig, named_policy
from protocol.addresses import ClusterAddresses


class ConfigFileError(ValueError):
    """A config file or override is invalid; the message names the setting."""


@dataclass
class SchedulerConfig:
    """The global scheduler's settings. The policy thresholds map onto policy.PolicyConfig (see
    `policy_config`); `policy` picks one of the named policies of policy.config."""

    scheduler_id: str = "scheduler-0"
    metrics_port: int = 0  # Prometheus /metrics and /health over HTTP on [cluster] http_host; 0: off
    policy: str = "kvferry"  # rr | load (no migration, INFaaS++) | prefix (cache hits) | kvferry (everything) | kvferry-nopri
    heartbeat_interval_ms: int = 500
    heartbeat_timeout_ms: int = 2000  # a worker silent this long is removed from dispatch
    report_interval_ms: int = 50  # workers report load at most this often
    migration_interval_ms: int = 50  # the migration round (load balancing with kvferry*, drains) runs this often
    max_migrations_per_instance: int = 1  # in flight out of, and into, each instance
    migration_ack_timeout_ms: int = 2000  # a source must accept or refuse a MigrateCommand within this
    migration_timeout_ms: int = 60_000  # an accepted migration with no MigrationResult by then is forgotten
    # Block hashes the prefix index keeps per instance (its least recently stored dropped beyond):
    # bounds the index's memory (~100 bytes an entry); keep it at least the workers' KV blocks.
    prefix_index_max_entries: int = 131_072
    # Policy thresholds (design §3), in freeness units (decode steps the batch can still take).
    migrate_out_below: float = 3.0  # kvferry*: an instance below this is a load-balancing migration source
    migrate_in_above: float = 30.0  # ... and one above this a destination
    # kvferry: an instance serving a high-priority request is kept at about this much other load
    # (tokens of KV): normal requests keep off it and migrate away (policy.freeness)
    priority_load_cap_tokens: int = 1600
    high_priority_below: int = 0  # a request with priority below this is high priority
    # Auto-scaling: keep the average freeness within [scale_up_below, scale_down_above]. The
    # scheduler decides; a pool manager (`kvferry up --scaling`) starts and stops the workers.
    scaling: bool = False
    scale_up_below: float = 10.0
    scale_down_above: float = 60.0
    scale_interval_ms: int = 10_000  # at least this long between two scaling actions
    scale_min_instances: int = 1
    scale_max_instances: int = 1
    # Prefill/decode disaggregation by the workers' roles ([worker] role): "fixed" honours them
    # (with every worker mixed, as by default, that is today's behaviour), "adaptive" also lends
    # decode workers to prefill under a backlog and back (policy.pd), "off" ignores them.
    pd_mode: str = "fixed"
    pd_prefill_backlog_tokens: int = 8192

    def policy_config(self) -> PolicyConfig:
        """The PolicyConfig of the named `policy` with these thresholds. Raises ValueError on an
        unknown policy name or inconsistent thresholds."""
        if self.migration_interval_ms <= 0 or self.scale_interval_ms <= 0:
            raise ValueError("scheduler intervals must be positive")
        if self.priority_load_cap_tokens < 0:
            raise ValueError(f"priority_load_cap_tokens must be >= 0, not {self.priority_load_cap_tokens}")
        if self.migrate_out_below > self.migrate_in_above:
            raise ValueError(f"migrate_out_below ({self.migrate_out_below}) is above migrate_in_above "
                             f"({self.migrate_in_above})")
        if self.scale_up_below >= self.scale_down_above:
            raise ValueError(f"scale_up_below ({self.scale_up_below}) must be below scale_down_above "
                             f"({self.scale_down_above}), or scaling would flap")
        if not 1 <= self.scale_min_instances <= self.scale_max_instances:
            raise ValueError(f"need 1 <= scale_min_instances ({self.scale_min_instances}) <= scale_max_instances "
                             f"({self.scale_max_instances})")
        if self.pd_mode not in ("off", "fixed", "adaptive"):
            raise ValueError(f"pd_mode must be off, fixed or adaptive, not {self.pd_mode!r}")
        return named_policy(
            self.policy, pd_mode=self.pd_mode, pd_prefill_backlog_tokens=self.pd_prefill_backlog_tokens,
            migrate_out_below=self.migrate_out_below, migrate_in_above=self.migrate_in_above,
            priority_load_cap_tokens=self.priority_load_cap_tokens, high_priority_below=self.high_priority_below,
            migration_interval_s=self.migration_interval_ms / 1000.0,
            max_migrations_per_instance=self.max_migrations_per_instance,
            scale_up_below=self.scale_up_below, scale_down_above=self.scale_down_above,
            scale_interval_s=self.scale_interval_ms / 1000.0, min_instances=self.scale_min_instances,
            max_instances=self.scale_max_instances)


@dataclass
class WorkerConfig:
    index: int = 0  # picks the worker's endpoints from [cluster]
    worker_id: str = ""  # default: worker-<index>
    engine: str = "torch"  # torch | vllm | sim
    role: str = "mixed"  # mixed | prefill (new requests, handed off once prefilled) | decode (hand-offs only)
    model: str = "tiny"  # tiny | smollm2 | a model folder | a .gguf file (sim: a latency profile name)
    device: str = "cpu"
    dtype: str = "bfloat16"
    block_size: int = 16
    num_blocks: int = 0  # 0: derived from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 256  # queued requests beyond this are refused (overloaded)
    prefix_caching: bool = True  # reuse the KV of a prompt's cached full blocks (torch and sim engines)
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0: torch's default
    frontend_timeout_s: float = 5.0  # a frontend that heartbeated, then fell silent this long: abort its requests
    stop_deadline_s: float = 20.0  # SIGTERM drains (migrates requests away) at most this long, then stops
    metrics_port: int = 0  # Prometheus /metrics and /health on [cluster] http_host, port metrics_port + index; 0: off
    # An engine step (or engine command) running this long means the engine thread is stuck: /health
    # turns 503 and the service manager's watchdog pings stop, so systemd / `kvferry up` restart the
    # worker. Longer than the longest legitimate step (a max_num_batched_tokens prefill). 0: off.
    watchdog_s: float = 60.0
    # Live migration (design §5).
    migration_path: str = "auto"  # auto (shm on one host, else frames) | shm | frames
    max_migrations_out: int = 2  # concurrent migrations with this worker as source
    max_migrations_in: int = 2  # ... and as destination
    migration_final_blocks: int = 2  # last stage once at most this many complete blocks are left to copy
    migration_max_stages: int = 8  # ... or after this many pre-copy stages
    migration_timeout_s: float = 10.0  # a migration peer silent this long: abort (reservations are freed)
    migration_chunk_bytes: int = 16 << 20  # KV bytes per MigrateBlocks
    migration_shm_bytes: int = 64 << 20  # shm staging buffer per outgoing migration
    migration_precopy_nice: int = 19  # CPU priority of pre-copy threads (decode steps keep their cores)

    @property
    def resolved_id(self) -> str:
        return self.worker_id or f"worker-{self.index}"


@dataclass
class FrontendConfig:
    index: int = 0
    frontend_id: str = ""  # default: frontend-<index>
    model: str = "tiny"  # for the tokenizer and chat template; must match the workers'
    served_model_name: str = ""  # the `model` name clients use; default: the model's name
    max_inflight: int = 1024
    request_timeout_s: float = 600.0
    dispatch_timeout_s: float = 1.0
    # Failures (design §6): a worker that answers no Ping for worker_timeout_s (or that the scheduler
    # declares dead) loses its requests; each is resumed elsewhere at most max_resumes times.
    worker_timeout_s: float = 3.0
    max_resumes: int = 3
    max_queued_bytes: int = 256 << 20  # token ids held for requests in flight (8 B per prompt + max token); beyond: 429
    max_prompt_tokens: int = 32768
    max_tokens_limit: int = 8192
    max_body_bytes: int = 4 << 20
    api_key: str = ""
    # The router's timings (services/frontend/router.py).
    heartbeat_interval_s: float = 0.5  # heartbeat + Ping to every known worker and every worker holding a request
    status_interval_s: float = 1.0  # the scheduler's instance list, refreshed
    add_timeout_s: float = 5.0  # a worker's answer to AddRequest
    max_add_attempts: int = 3  # workers tried per dispatch (each refusal or timeout excludes that worker)
    abort_timeout_s: float = 2.0  # a worker's answer to AbortRequest
    tombstone_s: float = 30.0  # an aborted request's late tokens are ignored (and its abort re-sent) this long
    gap_timeout_s: float = 2.0  # tokens buffered behind a gap this long: the missing batch was dropped; resume
    silent_s: float = 5.0  # a request with no new token this long is looked up in the scheduler's view ...
    unlisted_s: float = 1.0  # ... and resumed when no live worker lists it for this long

    @property
    def resolved_id(self) -> str:
        return self.frontend_id or f"frontend-{self.index}"


@dataclass
class SupervisorConfig:
    """How `kvferry up` supervises its processes (systemd's Restart=on-failure for a local cluster):
    a child that exits without being asked is restarted after `restart_delay_s`, doubling per
    consecutive failure up to `restart_delay_max_s` (reset once it has served `restart_delay_max_s`);
    one that starts more than `start_limit_burst` times within `start_limit_interval_s` is given up.
    (The interval is longer than systemd's 10 s default because the delays grow: 0.5+1+2+4+8 s.)
    `watchdog_s`: a child that sends no watchdog ping (services.sd_notify) for this long is killed
    (SIGABRT: Python dumps its threads' stacks, then SIGKILL) and restarted; 0: no watchdog."""

    restart: bool = True
    restart_delay_s: float = 0.5
    restart_delay_max_s: float = 10.0
    start_limit_burst: int = 5
    start_limit_interval_s: float = 60.0
    watchdog_s: float = 10.0
    kill_timeout_s: float = 5.0  # after SIGABRT (watchdog) or SIGTERM (stop), then SIGKILL

    def validate(self) -> None:
        if self.restart_delay_s < 0 or self.restart_delay_max_s < self.restart_delay_s:
            raise ValueError("need 0 <= restart_delay_s <= restart_delay_max_s")
        if self.start_limit_burst < 1 or self.start_limit_interval_s <= 0:
            raise ValueError("start_limit_burst must be at least 1 and start_limit_interval_s positive")
        if self.watchdog_s < 0 or self.kill_timeout_s <= 0:
            raise ValueError("watchdog_s must be >= 0 and kill_timeout_s positive")


@dataclass
class KvferryConfig:
    cluster: ClusterAddresses = field(default_factory=ClusterAddresses)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"cluster": ClusterAddresses, "scheduler": SchedulerConfig, "worker": WorkerConfig,
             "frontend": FrontendConfig, "supervisor": SupervisorConfig}


def _coerce(section: str, name: str, value: Any, typ: Any) -> Any:
    want = {"int": int, "float": float, "str": str, "bool": bool}.get(str(typ).replace("<class '", "").rstrip("'>"))
    if want is None:
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigFileError(f"[{section}] {name}: expected {want.__name__}, got {value!r}")
    return value


def _apply(section: str, current: Any, values: Mapping[str, Any]) -> Any:
    known = {f.name: f for f in fields(current)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigFileError(f"[{section}] unknown setting {key!r} (known: {', '.join(sorted(known))})")
        changes[key] = _coerce(section, key, value, known[key].type) if key != "overrides" else dict(value)
    try:
        return dataclasses.replace(current, **changes)
    except (TypeError, ValueError) as exc:
        raise ConfigFileError(f"[{section}] {exc}") from exc


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> KvferryConfig:
    """File, then KVFERRY_* environment, then `overrides` (from command-line flags)."""
    cfg = KvferryConfig()
    layers: list[dict[str, dict[str, Any]]] = []
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigFileError(f"{path}: {exc}") from exc
        unknown = set(data) - set(_SECTIONS)
        if unknown:
            raise ConfigFileError(f"{path}: unknown sections {sorted(unknown)} (known: {sorted(_SECTIONS)})")
        layers.append(data)
    env_layer: dict[str, dict[str, Any]] = {}
    for key, raw in (os.environ if env is None else env).items():
        if not key.startswith("KVFERRY_"):
            continue
        parts = key[len("KVFERRY_"):].lower().split("_", 1)
        if len(parts) == 2 and parts[0] in _SECTIONS:
            env_layer.setdefault(parts[0], {})[parts[1]] = _env_value(raw)
    layers.append(env_layer)
    if overrides:
        layers.append({s: {k: v for k, v in vals.items() if v is not None} for s, vals in overrides.items()})
    for layer in layers:
        for section, values in layer.items():
            if not isinstance(values, Mapping):
                raise ConfigFileError(f"[{section}] must be a table")
            setattr(cfg, section, _apply(section, getattr(cfg, section), values))
    return cfg


# ---- a small TOML writer (tomllib only reads): tables of scalars and of flat sub-tables ---------------

def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """`{section: {key: value or {key: value}}}` as TOML; sub-tables as [section.sub]."""
    lines: list[str] = []
    for section, values in data.items():
        if lines:
            lines.append("")
        lines.append(f"[{_key(section)}]")
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines += [f"{_key(k)} = {_scalar(v)}" for k, v in values.items() if k not in tables]
        for name, table in tables.items():
            lines.append(f"\n[{_key(section)}.{_key(name)}]")
            lines += [f"{_key(k)} = {_scalar(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
