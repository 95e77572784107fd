"""`kvferry keys generate DIR`: CurveZMQ keypairs for every role of a cluster.

    kvferry keys generate DIR [--services scheduler,frontend,worker,client] [--force]

Writes `NAME.key` (public) and `NAME.key_secret` (both halves) per name, mode 0600, in DIR (created
0700). Point every service at DIR with `[cluster] curve_keys_dir` (KVFERRY_CLUSTER_CURVE_KEYS_DIR);
see protocol/security.py for which process needs which file.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="CurveZMQ keys for encrypted, authenticated ZeroMQ sockets",
                       description="Manage the CurveZMQ keys named by [cluster] curve_keys_dir.")
    keys = p.add_subparsers(dest="keys_command", metavar="ACTION", title="actions")
    keys.required = True
    g = keys.add_parser("generate", help="write a keypair per role (or per --services name)",
                        description="Write NAME.key (public) and NAME.key_secret (mode 0600) for each name into "
                                    "DIR. Every *.key in DIR is a client the services accept.")
    g.add_argument("directory", metavar="DIR", help="key directory (created with mode 0700)")
    g.add_argument("--services", default=None, metavar="NAMES",
                   help="comma-separated key names (default: scheduler,frontend,worker,client); extra names "
                        "are more client identities, e.g. one per SDK user")
    g.add_argument("--force", action="store_true", help="replace existing key files")
    g.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from protocol.security import ROLES, KeyFileError, generate_keys

    names = ROLES if args.services is None else tuple(n.strip() for n in args.services.split(",") if n.strip())
    try:
        written = generate_keys(args.directory, names, force=args.force)
    except (KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
