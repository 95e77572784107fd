"""Asking the running scheduler from outside the cluster: `kvferry ctl` and `bench serve`.

`args` is anything with the attributes `scheduler` (its endpoint, or None: from the config),
`base_port`, `config` (a TOML file or None), `timeout` (seconds per answer) and optionally
`curve_keys` (a key directory; else [cluster] curve_keys_dir): parsed flags, for example.
Every failure is an AskFailed with the exit status for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


class AskFailed(Exception):
    """No usable answer: `status` 2 no answer or bad settings, 1 the scheduler refused."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def scheduler_endpoint(args: Any) -> str:
    if args.scheduler:
        return args.scheduler
    from services.config import ConfigFileError, load_config

    try:
        cfg = load_config(args.config, overrides={"cluster": {"base_port": args.base_port}})
    except ConfigFileError as exc:
        raise AskFailed(str(exc), 2) from exc
    return cfg.cluster.scheduler()


def client_keys(args: Any) -> Any:
    """ctl's Curve keys (the `client` keypair), or None when Curve is off."""
    from protocol.security import KeyFileError, load_keys
    from services.config import ConfigFileError, load_config

    directory = getattr(args, "curve_keys", None)
    if directory is None:
        try:
            directory = load_config(args.config).cluster.curve_keys_dir
        except ConfigFileError as exc:
            raise AskFailed(str(exc), 2) from exc
    if not directory:
        return None
    try:
        return load_keys(directory, "client")
    except KeyFileError as exc:
        raise AskFailed(str(exc), 2) from exc


def ask(args: Any, msg: Any) -> Any:
    """Send `msg` to the scheduler and return its reply (bounded by --timeout)."""
    async def one(ask: Callable[[Any], Awaitable[Any]]) -> Any:
        return await ask(msg)

    return session(args, one)


def session(args: Any, body: Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]]) -> Any:
    """Run `body(ask)` over one connection to the scheduler; `ask(msg)` returns the reply to `msg`
    (each bounded by --timeout). Failures become AskFailed with the exit status to use."""
    import asyncio

    import zmq
    import zmq.asyncio

    from protocol import SchedulerReplies
    from protocol.errors import RemoteError, RequestTimeout
    from protocol.security import use_curve
    from protocol.sockets import MessageSocket, request

    if not args.timeout > 0:
        raise AskFailed("--timeout must be positive", 2)
    endpoint = scheduler_endpoint(args)
    keys = client_keys(args)

    async def exchange() -> Any:
        ctx = use_curve(zmq.asyncio.Context(), keys)
        try:
            sock = MessageSocket.connect(ctx, zmq.DEALER, endpoint, SchedulerReplies, server_role="scheduler")
            try:
                return await body(lambda msg: request(sock, msg, timeout_s=args.timeout))
            finally:
                sock.close()
        finally:
            ctx.destroy(linger=0)

    try:
        return asyncio.run(exchange())
    except RequestTimeout:
        raise AskFailed(f"the scheduler at {endpoint} did not answer within {args.timeout:g} s", 2) from None
    except RemoteError as exc:
        raise AskFailed(f"the scheduler refused: {exc}", 1) from None
    except zmq.ZMQError as exc:
        raise AskFailed(f"cannot reach the scheduler at {endpoint}: {exc}", 2) from None
