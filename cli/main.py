"""`kvferry` entry point: one argparse parser whose subcommands live in their own modules.

Each module named in COMMANDS defines `register(subparsers)`, which adds its subparser and sets
`func` (a callable taking the parsed args and returning an exit status). Modules keep heavy imports
(torch, the engine) inside their functions so that `kvferry --help` stays fast.
To add a command: write cli/<name>.py with `register` and append its module name here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = (
    "cli.frontend",
    "cli.up",
    "cli.demo",
    "cli.scheduler",
    "cli.ctl",
    "cli.worker",
    "cli.generate",
    "cli.bench",
    "cli.config",
    "cli.keys",
)


class CLIError(Exception):
    """A usage problem found after parsing (bad --prompt-ids, ...): `error: ...`, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvferry",
        description="kvferry: LLM serving over many engine instances with live migration of running requests.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import faulthandler

    # A crash or a watchdog's SIGABRT (systemd, `kvferry up`) prints every thread's stack to stderr
    # (not where stderr is no file, e.g. captured in process by a test).
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError and a ValueError
        pass
    from engine.errors import EngineError  # after parsing: `--help` does not import torch

    try:
        status = args.func(args)
    except (EngineError, CLIError) as exc:
        _flush_stdout()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _flush_stdout()
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kvferry generate ... | head`
        sys.stderr.close()
        return 1
    return int(status or 0)


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
