"""`kvferry config show`: the effective configuration (file, then KVFERRY_* environment, then --set).

Prints every section in TOML (the format of the file it reads, so the output can be saved as a
config file) or JSON. Secrets (`api_key`) are masked unless --show-secrets.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from services.config import to_toml

SECTIONS = ("cluster", "scheduler", "worker", "frontend")
SECRET_KEYS = {"api_key"}
MASK = "********"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the effective configuration",
                       description="Configuration commands. Every service reads one TOML file (sections "
                                   "[cluster], [scheduler], [worker], [frontend]), then KVFERRY_<SECTION>_<KEY> "
                                   "environment variables, then its flags.")
    csub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    csub.required = True
    show = csub.add_parser("show", help="print the effective configuration (file + environment + --set)",
                           description="Print the configuration the services would run with: defaults, then "
                                       "--config FILE, then KVFERRY_* environment variables, then --set. "
                                       "TOML by default.")
    show.add_argument("--config", metavar="FILE", help="TOML config file")
    show.add_argument("--section", choices=SECTIONS,
                      help="print only this section")
    show.add_argument("--json", action="store_true", help="JSON instead of TOML")
    show.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a setting, as a service's flag would (VALUE parsed like an environment "
                           "value); repeatable")
    show.add_argument("--show-secrets", action="store_true", help="print api_key instead of masking it")
    show.set_defaults(func=run_show)


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """`["worker.model=smollm2", "cluster.base_port=18000"]` -> {"worker": {"model": "smollm2"}, ...}."""
    from services.config import ConfigFileError, _env_value

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigFileError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        if section not in SECTIONS:
            raise ConfigFileError(f"--set {item!r}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
        out.setdefault(section, {})[name] = _env_value(raw)
    return out


def effective(path: str | None, sets: list[str], show_secrets: bool = False) -> dict[str, dict[str, Any]]:
    """The merged configuration as plain data, secrets masked unless `show_secrets`."""
    from services.config import load_config

    data = load_config(path, overrides=parse_sets(sets)).to_dict()
    if not show_secrets:
        for section in data.values():
            for key in SECRET_KEYS & set(section):
                if section[key]:
                    section[key] = MASK
    return data


def run_show(args: argparse.Namespace) -> int:
    from services.config import ConfigFileError

    try:
        data = effective(args.config, args.set, args.show_secrets)
    except (ConfigFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.section:
        data = {args.section: data[args.section]}
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if args.json else to_toml(data))
    return 0
