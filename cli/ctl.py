"""`kvferry ctl`: ask the running scheduler about the cluster, or tell it to drain an instance.

    kvferry ctl status [--json]      every instance and every request with its instance
    kvferry ctl drain ID             stop dispatching to instance ID (the worker is told to drain)
    kvferry ctl undrain ID           dispatch to it again

The scheduler is found at --scheduler ENDPOINT, else from --base-port / --config / KVFERRY_*.
Exit status: 0 done; 1 the scheduler refused (unknown instance, ...); 2 no answer or bad usage
(`error: ...` on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ctl", help="inspect and steer a running cluster (status, drain, undrain)",
                       description="Talk to the running scheduler: show the cluster, drain or undrain an instance.")
    ctl = p.add_subparsers(dest="ctl_command", metavar="ACTION", title="actions")
    ctl.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--scheduler", metavar="ENDPOINT", help="the scheduler's endpoint, e.g. tcp://127.0.0.1:17100")
        q.add_argument("--base-port", type=int, metavar="P", help="cluster base port (the scheduler is at P)")
        q.add_argument("--config", metavar="FILE", help="TOML config file ([cluster] section)")
        q.add_argument("--timeout", type=float, default=2.0, metavar="S",
                       help="seconds to wait for the scheduler (default: 2)")

    s = ctl.add_parser("status", help="every instance and request", description="Show every instance (blocks, "
                       "running, waiting, freeness, alive, draining) and every request with its instance.")
    s.add_argument("--json", action="store_true", help="print the scheduler's StatusReply as one JSON object "
                   "(infinite freeness as the strings \"inf\" / \"-inf\")")
    common(s)
    s.set_defaults(func=run_status)
    for name, helptext in (("drain", "stop dispatching to an instance and tell its worker to drain"),
                           ("undrain", "dispatch to a drained instance again")):
        d = ctl.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        d.add_argument("instance", metavar="ID", help="the instance (worker) id, as `kvferry ctl status` shows it")
        common(d)
        d.set_defaults(func=run_drain, draining=name == "drain")


class _Failed(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _endpoint(args: argparse.Namespace) -> str:
    if args.scheduler:
        return args.scheduler
    from services.config import ConfigFileError, load_config

    try:
        cfg = load_config(args.config, overrides={"cluster": {"base_port": args.base_port}})
    except ConfigFileError as exc:
        raise _Failed(str(exc), 2) from exc
    return cfg.cluster.scheduler()


def _ask(args: argparse.Namespace, msg: Any) -> Any:
    """Send `msg` to the scheduler and return its reply (bounded by --timeout)."""
    import asyncio

    import zmq
    import zmq.asyncio

    from protocol import SchedulerReplies
    from protocol.errors import RemoteError, RequestTimeout
    from protocol.sockets import MessageSocket, request

    if not args.timeout > 0:
        raise _Failed("--timeout must be positive", 2)
    endpoint = _endpoint(args)

    async def exchange() -> Any:
        ctx = zmq.asyncio.Context()
        try:
            sock = MessageSocket.connect(ctx, zmq.DEALER, endpoint, SchedulerReplies)
            try:
                return await request(sock, msg, timeout_s=args.timeout)
            finally:
                sock.close()
        finally:
            ctx.destroy(linger=0)

    try:
        return asyncio.run(exchange())
    except RequestTimeout:
        raise _Failed(f"the scheduler at {endpoint} did not answer within {args.timeout:g} s", 2) from None
    except RemoteError as exc:
        raise _Failed(f"the scheduler refused: {exc}", 1) from None
    except zmq.ZMQError as exc:
        raise _Failed(f"cannot reach the scheduler at {endpoint}: {exc}", 2) from None


def _fail(exc: _Failed) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return exc.status


# ---- status --------------------------------------------------------------------------------------

def status_to_json(reply: Any) -> dict[str, Any]:
    """The StatusReply as plain JSON data (non-finite floats become "inf" / "-inf" / "nan")."""
    import msgspec

    def fix(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x

    data = fix(msgspec.to_builtins(reply))
    data.setdefault("policy", "")
    data["instances"] = [{**d, "used_blocks": d["total_blocks"] - d["free_blocks"]} for d in data.get("instances", [])]
    # RequestLocation travels array-like; name its fields for readers of the JSON.
    data["requests"] = [dict(zip(("request_id", "worker_id", "priority", "num_tokens", "running"), r))
                        if isinstance(r, list) else r for r in data.get("requests", [])]
    return data


def _fmt_freeness(f: float) -> str:
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return f"{f:.1f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def format_status(reply: Any, now_ms: int | None = None) -> str:
    """The readable form: an instance table, then a request table."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    rows = []
    for i in reply.instances:
        age = f"{(now_ms - i.last_report_ms) / 1000:.1f}s ago" if i.last_report_ms else "never"
        rows.append([i.worker_id, "yes" if i.alive else "NO", "yes" if i.draining else "no", i.engine,
                     f"{i.used_blocks}/{i.total_blocks}", str(i.free_blocks), str(i.num_running),
                     str(i.num_waiting), _fmt_freeness(i.freeness), age, i.endpoints.control])
    out = [f"scheduler {reply.scheduler_id}  policy {reply.policy}  instances {len(reply.instances)}  "
           f"alive {sum(i.alive for i in reply.instances)}  requests {len(reply.requests)}", ""]
    if rows:
        out.append(_table(rows, ["INSTANCE", "ALIVE", "DRAINING", "ENGINE", "USED/TOTAL", "FREE", "RUNNING",
                                 "WAITING", "FREENESS", "LAST REPORT", "CONTROL"]))
    else:
        out.append("no instances registered")
    if reply.requests:
        out.append("")
        out.append(_table([[r.request_id, r.worker_id, str(r.priority), str(r.num_tokens),
                            "running" if r.running else "waiting"] for r in reply.requests],
                          ["REQUEST", "INSTANCE", "PRIORITY", "TOKENS", "STATE"]))
    return "\n".join(out)


def run_status(args: argparse.Namespace) -> int:
    from protocol import StatusRequest

    try:
        reply = _ask(args, StatusRequest())
    except _Failed as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(status_to_json(reply), indent=2))
    else:
        print(format_status(reply))
    return 0


# ---- drain / undrain -----------------------------------------------------------------------------

def run_drain(args: argparse.Namespace) -> int:
    from protocol import DrainInstance, UndrainInstance
    from protocol.codec import validate
    from protocol.errors import ProtocolError

    msg = (DrainInstance if args.draining else UndrainInstance)(worker_id=args.instance)
    try:
        validate(msg)
    except ProtocolError as exc:  # an id the protocol rejects (spaces, too long, ...)
        print(f"error: invalid instance id {args.instance!r}: {exc}", file=sys.stderr)
        return 2
    try:
        reply = _ask(args, msg)
    except _Failed as exc:
        return _fail(exc)
    print(reply.detail or ("draining" if args.draining else "undrained"))
    return 0
