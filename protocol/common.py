"""Messages every service sends or accepts: errors, acknowledgements, liveness."""

from __future__ import annotations

from typing import Literal

from protocol.base import Message, ReplyMessage, RequestMessage, now_ms
from protocol.errors import ProtocolError
from protocol.fields import EpochMs, Id, Incarnation, Seq, Text

Role = Literal["worker", "scheduler", "frontend", "client"]


class ErrorCode:
    """Values of `ErrorReply.code`. The first five mirror `protocol.errors` classes."""

    MALFORMED = "malformed"
    UNKNOWN_TYPE = "unknown_type"
    VERSION_MISMATCH = "version_mismatch"
    TOO_LARGE = "too_large"
    INVALID = "invalid"
    EXPIRED = "expired"  # the request's deadline passed before it was handled
    NOT_FOUND = "not_found"  # unknown request / instance / migration id
    OVERLOADED = "overloaded"  # queue full; retry later or elsewhere
    UNAVAILABLE = "unavailable"  # e.g. no live worker to dispatch to
    REFUSED = "refused"  # understood but not allowed now (draining, duplicate id, ...)
    UNAUTHORIZED = "unauthorized"  # missing or wrong API key (the SDK endpoint with [frontend] api_key)
    INTERNAL = "internal"  # a bug on the answering side


class ErrorReply(Message, kw_only=True, frozen=True):
    """The answer of any replying socket to a request it could not serve.

    `reply_to` is the failed request's msg_id, or None when it could not be read.
    """

    reply_to: Id | None = None
    code: Id
    message: Text = ""


def error_reply(exc: BaseException, reply_to: str | None = None) -> ErrorReply:
    """An ErrorReply for `exc`: ProtocolErrors keep their code (and their reply_to if known)."""
    if isinstance(exc, ProtocolError):
        return ErrorReply(reply_to=reply_to or exc.reply_to, code=exc.code, message=exc.message[:4096])
    return ErrorReply(reply_to=reply_to, code=ErrorCode.INTERNAL, message=f"{type(exc).__name__}: {exc}"[:4096])


class Ack(ReplyMessage, kw_only=True, frozen=True):
    """A generic positive (or soft-negative, `ok=False`) answer to a request that returns no data."""

    ok: bool = True
    detail: Text = ""


class Heartbeat(Message, kw_only=True, frozen=True):
    """One-way liveness signal (worker → scheduler, frontend → worker, ...). `seq` increases by one."""

    sender_id: Id
    role: Role
    seq: Seq = 0
    sent_ms: EpochMs = 0
    # This start of the sender: a process restarted under the same id (a supervisor's restart)
    # says so with its first heartbeat, before any silence gives it away.
    incarnation: Incarnation = ""


class Ping(RequestMessage, kw_only=True, frozen=True):
    """Liveness probe that expects a `Pong` (scheduler → worker, ctl → any service)."""

    sender_id: Id


class Pong(ReplyMessage, kw_only=True, frozen=True):
    """Answer to `Ping`; `sent_ms` is the responder's wall clock (rough skew check)."""

    sender_id: Id
    sent_ms: EpochMs = 0

    @classmethod
    def to(cls, ping: Ping, sender_id: str) -> "Pong":
        return cls(reply_to=ping.msg_id, sender_id=sender_id, sent_ms=now_ms())
