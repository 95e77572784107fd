"""Base classes of all messages, the type registry, message ids and deadlines.

Three kinds of message:
- `Message`: one-way (load reports, heartbeats, token batches).
- `RequestMessage`: expects a reply; carries `msg_id` and `deadline_ms`.
- `ReplyMessage`: answers a request; carries `reply_to` (the request's `msg_id`).

Every concrete subclass registers itself under its class name, which is the type tag on the wire.

Deadlines are absolute wall-clock epoch milliseconds (`time.time()`), not monotonic time:
monotonic clocks have an arbitrary origin per process (and per host), so they mean nothing to the
receiver. Wall clocks of one host agree; across hosts they agree to NTP accuracy, which is far
below our timeouts. The receiver checks `expired(msg)` and drops work whose requester gave up.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, ClassVar

import msgspec

from protocol.fields import EpochMs, Id

DEFAULT_TIMEOUT_S = 10.0

MESSAGE_TYPES: dict[str, type["Message"]] = {}


class Message(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Base of every message. Subclasses are msgspec Structs: construct with keyword arguments."""

    __abstract__: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("__abstract__", False):
            return
        tag = cls.__name__
        old = MESSAGE_TYPES.get(tag)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"message type tag {tag!r} is already used by {old.__module__}.{old.__qualname__}")
        MESSAGE_TYPES[tag] = cls

    @classmethod
    def tag(cls) -> str:
        """The type tag on the wire."""
        return cls.__name__


# ---- message ids ---------------------------------------------------------------------------------

def _new_prefix() -> str:
    return os.urandom(6).hex()


_prefix = _new_prefix()
_counter = itertools.count(1)


def _reseed_after_fork() -> None:
    # A forked child would otherwise hand out the parent's ids again.
    global _prefix, _counter
    _prefix = _new_prefix()
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed_after_fork)


def new_msg_id() -> str:
    """A process-unique, globally unique-enough id: 48 random bits per process plus a counter."""
    return f"{_prefix}-{next(_counter):x}"


# ---- deadlines -----------------------------------------------------------------------------------

def now_ms() -> int:
    """Wall-clock time in epoch milliseconds, the unit of every deadline on the wire."""
    return int(time.time() * 1000)


def deadline_in(seconds: float) -> int:
    """The deadline `seconds` from now, in epoch milliseconds."""
    return now_ms() + int(seconds * 1000)


def _default_deadline() -> int:
    return deadline_in(DEFAULT_TIMEOUT_S)


class RequestMessage(Message, kw_only=True, frozen=True):
    """A message that expects a reply. `deadline_ms` (epoch ms, wall clock) defaults to 10 s from now."""

    __abstract__: ClassVar[bool] = True

    msg_id: Id = msgspec.field(default_factory=new_msg_id)
    deadline_ms: EpochMs = msgspec.field(default_factory=_default_deadline)


class ReplyMessage(Message, kw_only=True, frozen=True):
    """An answer to a `RequestMessage`; `reply_to` is that request's `msg_id`."""

    __abstract__: ClassVar[bool] = True

    reply_to: Id


def expired(msg: Message, now: int | None = None, slack_ms: int = 0) -> bool:
    """True when `msg` carries a deadline and it has passed (plus `slack_ms` for clock skew).

    One-way messages and replies carry no deadline and never expire.
    """
    deadline = getattr(msg, "deadline_ms", None)
    if deadline is None:
        return False
    return (now_ms() if now is None else now) > deadline + slack_ms


def remaining_s(msg: Message) -> float | None:
    """Seconds left until `msg`'s deadline (negative when past); None when it has none."""
    deadline = getattr(msg, "deadline_ms", None)
    return None if deadline is None else (deadline - now_ms()) / 1000.0
