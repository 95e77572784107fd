"""`kvferry ctl`: ask the running scheduler about the cluster, or tell it to move requests around.

    kvferry ctl status [--json]                  every instance and every request with its instance (and
                                                 the policy, instance-seconds, the scaling state)
    kvferry ctl migrate REQUEST --to ID [--wait S]
                                                 live-migrate a running request to instance ID; with
                                                 --wait, until the request is listed on ID
    kvferry ctl drain ID [--wait S]              stop dispatching to instance ID and migrate its requests
                                                 off (the worker is told to drain); with --wait, until
                                                 it reports no requests
    kvferry ctl undrain ID                       dispatch to it again (stops the drain migrations)
    kvferry ctl role ID ROLE                     serve as prefill, decode or mixed from now on
                                                 (prefill/decode disaggregation)

The scheduler is found at --scheduler ENDPOINT, else from --base-port / --config / KVFERRY_*. With
CurveZMQ on, ctl connects with the `client` keypair of --curve-keys DIR (or [cluster] curve_keys_dir).
Exit status: 0 done; 1 the scheduler or the worker refused (unknown instance or request, busy,
incompatible instances, ...), or --wait ran out; 2 no answer or bad usage (`error: ...` on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from services.scheduler.client import AskFailed, ask, session

WAIT_POLL_S = 0.1  # --wait polls the scheduler's status this often


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ctl", help="inspect and steer a running cluster (status, migrate, drain, undrain)",
                       description="Talk to the running scheduler: show the cluster, migrate a request, drain "
                                   "or undrain an instance.")
    ctl = p.add_subparsers(dest="ctl_command", metavar="ACTION", title="actions")
    ctl.required = True

    def common(q: argparse.ArgumentParser, timeout_s: float = 2.0) -> None:
        q.add_argument("--scheduler", metavar="ENDPOINT", help="the scheduler's endpoint, e.g. tcp://127.0.0.1:17100")
        q.add_argument("--base-port", type=int, metavar="P", help="cluster base port (the scheduler is at P)")
        q.add_argument("--config", metavar="FILE", help="TOML config file ([cluster] section)")
        q.add_argument("--curve-keys", metavar="DIR", help="CurveZMQ key directory (its client keypair; default: "
                       "[cluster] curve_keys_dir from --config / KVFERRY_CLUSTER_CURVE_KEYS_DIR)")
        q.add_argument("--timeout", type=float, default=timeout_s, metavar="S",
                       help=f"seconds to wait for the scheduler's answer (default: {timeout_s:g})")

    s = ctl.add_parser("status", help="every instance and request", description="Show every instance (blocks, "
                       "cached blocks and those in the scheduler's prefix index, running, waiting, freeness, "
                       "alive, draining) and every request with its instance.")
    s.add_argument("--json", action="store_true", help="print the scheduler's StatusReply as one JSON object "
                   "(infinite freeness as the strings \"inf\" / \"-inf\")")
    common(s)
    s.set_defaults(func=run_status)
    m = ctl.add_parser("migrate", help="live-migrate a running request to another instance",
                       description="Move a running request, with its KV cache, to instance ID while it keeps "
                                   "generating. Prints `<migration id>: <request> <source> -> <destination>` "
                                   "once the source worker has started the migration.")
    m.add_argument("request", metavar="REQUEST_ID", help="the request id, as `kvferry ctl status` shows it")
    m.add_argument("--to", required=True, metavar="ID", dest="instance", help="the destination instance")
    m.add_argument("--wait", type=float, metavar="S", help="then wait up to S seconds until the request is "
                   "listed on ID (exit 1 if not)")
    common(m, timeout_s=5.0)
    m.set_defaults(func=run_migrate)
    for name, helptext in (("drain", "stop dispatching to an instance and migrate its requests off"),
                           ("undrain", "dispatch to a drained instance again")):
        d = ctl.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        d.add_argument("instance", metavar="ID", help="the instance (worker) id, as `kvferry ctl status` shows it")
        if name == "drain":
            d.add_argument("--wait", type=float, metavar="S", help="then wait up to S seconds until the instance "
                           "reports no requests (exit 1 if not)")
        common(d)
        d.set_defaults(func=run_drain, draining=name == "drain")
    r = ctl.add_parser("role", help="change an instance's prefill/decode role",
                       description="Serve as prefill (new requests, handed off to a decode instance once "
                                   "prefilled), decode (hand-offs only) or mixed (both) from now on.")
    r.add_argument("instance", metavar="ID", help="the instance (worker) id")
    r.add_argument("role", choices=("mixed", "prefill", "decode"))
    common(r)
    r.set_defaults(func=run_role)


async def _wait_until(ask: Callable[[Any], Awaitable[Any]], include_requests: bool, wait_s: float,
                      done: Callable[[Any], str | None], what: str) -> str:
    """Poll StatusRequest until `done(reply)` returns a message (returned), or raise AskFailed(1)
    after `wait_s` seconds; the message then says `what` was not reached."""
    import asyncio

    from protocol import StatusRequest

    deadline = time.monotonic() + wait_s
    while True:
        reply = await ask(StatusRequest(include_requests=include_requests))
        message = done(reply)
        if message is not None:
            return message
        left = deadline - time.monotonic()
        if left <= 0:
            raise AskFailed(f"{what} within {wait_s:g} s", 1)
        await asyncio.sleep(min(WAIT_POLL_S, left))


def _fail(exc: AskFailed) -> int:
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


def _fmt_ago(now_ms: int, then_ms: int) -> str:
    """`12.3s ago`, `4m05s ago`, `2h07m ago`: how long ago a wall-clock time was."""
    s = max(0.0, (now_ms - then_ms) / 1000)
    if s < 60:
        return f"{s:.1f}s ago"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s ago"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m ago"


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
        registered = _fmt_ago(now_ms, i.registered_ms) if i.registered_ms else "-"
        rows.append([i.worker_id, "yes" if i.alive else "NO", "yes" if i.draining else "no",
                     getattr(i, "role", "mixed"), i.engine,
                     f"{i.used_blocks}/{i.total_blocks}", str(i.free_blocks),
                     f"{i.cached_blocks}/{i.indexed_blocks}", str(i.num_running),
                     str(i.num_waiting), _fmt_freeness(i.freeness), age, registered, str(i.pid or "-"),
                     i.endpoints.control])
    out = [f"scheduler {reply.scheduler_id}  policy {reply.policy}  instances {len(reply.instances)}  "
           f"alive {sum(i.alive for i in reply.instances)}  requests {len(reply.requests)}  "
           f"instance-seconds {getattr(reply, 'instance_seconds', 0.0):.1f}"]
    sc = getattr(reply, "scaling", None)
    if sc is not None:
        last = "none" if sc.last_action == "none" else (
            f"{sc.last_action} {(now_ms - sc.last_action_ms) / 1000:.1f}s ago")
        out.append(f"scaling {sc.min_instances}..{sc.max_instances} instances  average freeness "
                   f"{_fmt_freeness(sc.average_freeness)}  last action {last}  ups {sc.scale_ups}  downs "
                   f"{sc.scale_downs}  retiring {', '.join(sc.retiring) or '-'}  manager {sc.manager_id or '-'}")
    out.append("")
    if rows:
        out.append(_table(rows, ["INSTANCE", "ALIVE", "DRAINING", "ROLE", "ENGINE", "USED/TOTAL", "FREE",
                                 "CACHED/INDEXED",
                                 "RUNNING",
                                 "WAITING", "FREENESS", "LAST REPORT", "REGISTERED", "PID", "CONTROL"]))
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
        reply = ask(args, StatusRequest())
    except AskFailed as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(status_to_json(reply), indent=2))
    else:
        print(format_status(reply))
    return 0


# ---- role ---------------------------------------------------------------------------------------

def run_role(args: argparse.Namespace) -> int:
    from protocol import SetInstanceRole

    msg = SetInstanceRole(worker_id=args.instance, role=args.role)
    if not _valid(msg, f"instance id {args.instance!r}"):
        return 2
    try:
        reply = ask(args, msg)
    except AskFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    print(reply.detail, flush=True)
    return 0


# ---- drain / undrain -----------------------------------------------------------------------------

def _valid(msg: Any, what: str) -> bool:
    """Validate locally: an id the protocol rejects (spaces, too long, ...) is a usage error."""
    from protocol.codec import validate
    from protocol.errors import ProtocolError

    try:
        validate(msg)
    except ProtocolError as exc:
        print(f"error: invalid {what}: {exc}", file=sys.stderr)
        return False
    return True


def _bad_wait(args: argparse.Namespace) -> bool:
    if getattr(args, "wait", None) is not None and not args.wait > 0:
        print("error: --wait must be positive", file=sys.stderr)
        return True
    return False


def run_drain(args: argparse.Namespace) -> int:
    from protocol import DrainInstance, UndrainInstance

    msg = (DrainInstance if args.draining else UndrainInstance)(worker_id=args.instance)
    if not _valid(msg, f"instance id {args.instance!r}") or _bad_wait(args):
        return 2
    wait_s = getattr(args, "wait", None)

    def drained(reply: Any) -> str | None:
        inst = next((i for i in reply.instances if i.worker_id == args.instance), None)
        if inst is None:
            return f"{args.instance}: left the cluster"
        if not inst.alive:
            raise AskFailed(f"{args.instance} died with {inst.num_running + inst.num_waiting} requests on it", 1)
        if inst.num_running == 0 and inst.num_waiting == 0:
            return f"{args.instance}: drained (no requests)"
        return None

    async def body(ask: Callable[[Any], Awaitable[Any]]) -> None:
        reply = await ask(msg)
        print(reply.detail or ("draining" if args.draining else "undrained"), flush=True)
        if wait_s is not None:
            print(await _wait_until(ask, False, wait_s, drained, f"{args.instance} still had requests"))

    try:
        session(args, body)
    except AskFailed as exc:
        return _fail(exc)
    return 0


# ---- migrate -------------------------------------------------------------------------------------

def run_migrate(args: argparse.Namespace) -> int:
    from protocol import MigrateRequestTo

    msg = MigrateRequestTo(request_id=args.request, dst_worker_id=args.instance)
    if not _valid(msg, "request or instance id") or _bad_wait(args):
        return 2
    last_seen: list[str] = []  # where the request was at the latest poll

    def arrived(reply: Any) -> str | None:
        where = [r.worker_id for r in reply.requests if r.request_id == args.request]
        last_seen[:] = where
        return f"{args.request} is on {args.instance}" if args.instance in where else None

    async def body(ask: Callable[[Any], Awaitable[Any]]) -> None:
        reply = await ask(msg)
        print(reply.detail, flush=True)
        if args.wait is not None:
            try:
                print(await _wait_until(ask, True, args.wait, arrived, f"{args.request} did not reach {args.instance}"))
            except AskFailed as exc:
                if exc.status == 1:
                    where = ", ".join(last_seen) if last_seen else "no instance (finished or aborted?)"
                    raise AskFailed(f"{exc}; it is listed on {where}", 1) from None
                raise

    try:
        session(args, body)
    except AskFailed as exc:
        return _fail(exc)
    return 0
