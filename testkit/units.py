"""The command lines of deploy/systemd's units, as systemd would run them on one host.

Tests that start services "the way a host does" read ExecStart= and the environment from the unit
files instead of copying them, so a change to a unit is what the test runs. Specifiers %i (the
instance), %l (the short host name) and %% are expanded; Environment= comes first and
EnvironmentFile= overrides it (systemd's precedence). The installed paths (/opt/kvferry/venv/bin/
kvferry, /etc/kvferry/kvferry.toml) are replaced by the caller's.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNIT_DIR = ROOT / "deploy" / "systemd"
ENV_FILE = UNIT_DIR / "kvferry.env"
INSTALLED_KVFERRY = "/opt/kvferry/venv/bin/kvferry"
INSTALLED_CONFIG = "/etc/kvferry/kvferry.toml"
UNITS = {"scheduler": "kvferry-scheduler.service", "frontend": "kvferry-frontend.service",
         "worker": "kvferry-worker@.service"}


def read_environment_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile= (comments and blank lines skipped, quotes removed)."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"')
    return env


@dataclass(frozen=True)
class UnitCommand:
    """One unit's ExecStart argv and the environment systemd would give it."""

    unit: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def unit_command(service: str, *, hostname: str, kvferry: str, config: str, env_text: str | None = None,
                 instance: str = "", keep_env: tuple[str, ...] = ("KVFERRY_", "CUDA_VISIBLE_DEVICES")) -> UnitCommand:
    """The ExecStart of `service` ("scheduler", "frontend", "worker"; `instance` = %i, the worker
    index) on a host named `hostname`, with `kvferry` and `config` in place of the installed
    paths. Its environment: the unit's Environment= variables whose names start with one of
    `keep_env` (the rest, HOME and cache directories, name systemd-managed directories), then
    the environment file (`env_text` if given, else deploy/systemd/kvferry.env's)."""
    unit = UNITS[service]
    text = (UNIT_DIR / unit).read_text()
    specifiers = {"%i": instance, "%l": hostname.split(".")[0], "%%": "%"}

    def expand(s: str) -> str:
        return re.sub(r"%[il%]", lambda m: specifiers[m.group(0)], s)

    env: dict[str, str] = {}
    for value in re.findall(r"^Environment=(.*)$", text, re.MULTILINE):
        env.update(kv.split("=", 1) for kv in shlex.split(expand(value)))  # type: ignore[misc]
    env = {k: v for k, v in env.items() if k.startswith(keep_env)}
    if re.search(r"^EnvironmentFile=", text, re.MULTILINE):  # after Environment=: it wins
        env.update(read_environment_file(ENV_FILE.read_text() if env_text is None else env_text))
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", text, re.MULTILINE)
    argv = shlex.split(expand(exec_start))
    if argv[0] != INSTALLED_KVFERRY or INSTALLED_CONFIG not in argv:
        raise ValueError(f"{unit}: ExecStart no longer runs {INSTALLED_KVFERRY} with {INSTALLED_CONFIG}: {argv}")
    argv = [kvferry if a == INSTALLED_KVFERRY else config if a == INSTALLED_CONFIG else a for a in argv]
    return UnitCommand(unit, argv, env)
