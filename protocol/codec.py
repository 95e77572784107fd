"""Encoding and decoding of message envelopes.

Wire format of one envelope (one ZeroMQ frame): a msgpack array `[v, t, body]` where `v` is
PROTOCOL_VERSION, `t` the type tag (the message class name) and `body` a msgpack map of the
message's fields (fields equal to their default are left out). Decoding checks, in this order:
size (before parsing anything), envelope shape, version, type tag, then the body's field types
and value ranges — and raises only `ProtocolError` subclasses, whatever the bytes.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta

from protocol.base import MESSAGE_TYPES, Message
from protocol.errors import (
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    UnknownMessageType,
    ValidationError,
    VersionMismatch,
)
from protocol.fields import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Id

M = TypeVar("M", bound=Message)

Allowed = Any
"""A message class, a tuple of them, a `Union[...]` / `A | B` of them, or None for any message.
Abstract bases count too: `RequestMessage` accepts every request type."""


class _Envelope(msgspec.Struct, array_like=True):
    v: int
    t: Annotated[str, Meta(max_length=64)]
    body: msgspec.Raw  # parsed later, with the decoder of the type `t` names


class _MsgIdProbe(msgspec.Struct):
    msg_id: Id | None = None


_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)
_probe_decoder = msgspec.msgpack.Decoder(_MsgIdProbe)
_body_decoders: dict[type, msgspec.msgpack.Decoder] = {}
_allowed_cache: dict[Any, tuple[type, ...]] = {}


def _resolve_allowed(allowed: Allowed) -> tuple[type, ...]:
    try:
        return _allowed_cache[allowed]
    except (KeyError, TypeError):
        pass
    out: list[type] = []

    def add(a: Any) -> None:
        if isinstance(a, tuple):
            for x in a:
                add(x)
        elif typing.get_origin(a) in (typing.Union, types.UnionType):
            for x in typing.get_args(a):
                add(x)
        elif isinstance(a, type) and issubclass(a, Message):
            out.append(a)
        else:
            raise TypeError(f"allowed must be Message classes, tuples or unions of them, not {a!r}")

    add(Message if allowed is None else allowed)
    resolved = tuple(out)
    try:
        _allowed_cache[allowed] = resolved
    except TypeError:
        pass
    return resolved


def _body_decoder(cls: type) -> msgspec.msgpack.Decoder:
    dec = _body_decoders.get(cls)
    if dec is None:
        dec = _body_decoders[cls] = msgspec.msgpack.Decoder(cls)
    return dec


def _probe_msg_id(body: msgspec.Raw) -> str | None:
    """The msg_id of a body that failed validation, if readable: lets the ErrorReply correlate."""
    try:
        return _probe_decoder.decode(body).msg_id
    except Exception:  # noqa: BLE001 - a best effort on hostile input
        return None


def _probe_oversized(data: bytes | bytearray | memoryview) -> str | None:
    """The msg_id of an envelope refused for its size, so the sender's request fails at once
    instead of timing out. Safe on hostile input: the body stays a Raw view and the probe skips
    every field but msg_id without building it (the socket's ZMQ_MAXMSGSIZE bounds the scan)."""
    try:
        return _probe_msg_id(_envelope_decoder.decode(data).body)
    except Exception:  # noqa: BLE001 - a best effort on hostile input
        return None


def _nbytes(data: bytes | bytearray | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def encode(msg: Message, max_bytes: int | None = None) -> bytes:
    """Serialize `msg` into one envelope frame. With `max_bytes`, raise MessageTooLarge beyond it.

    Field constraints are checked by the receiver, not here (see `validate`).
    """
    cls = type(msg)
    if MESSAGE_TYPES.get(cls.__name__) is not cls:
        raise TypeError(f"{cls.__name__} is not a registered protocol message")
    try:
        data = _encoder.encode((PROTOCOL_VERSION, cls.__name__, msg))
    except (msgspec.EncodeError, TypeError, OverflowError, ValueError) as exc:
        raise ValidationError(f"cannot encode {cls.__name__}: {exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise MessageTooLarge(len(data), max_bytes)
    return data


def decode(data: bytes | bytearray | memoryview, allowed: Allowed = None,
           max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """Parse one envelope frame into a message whose type is in `allowed`.

    Raises MessageTooLarge, MalformedMessage, VersionMismatch, UnknownMessageType or
    ValidationError — never anything else, for any input.
    """
    try:
        size = _nbytes(data)
    except Exception as exc:  # noqa: BLE001 - e.g. a non-buffer object
        raise MalformedMessage(f"not a byte buffer: {type(data).__name__}") from exc
    if size > max_bytes:
        raise MessageTooLarge(size, max_bytes, reply_to=_probe_oversized(data))
    try:
        env = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedMessage(f"not a message envelope: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - RecursionError on deep nesting, and anything unforeseen
        raise MalformedMessage(f"not a message envelope: {type(exc).__name__}") from None
    if env.v != PROTOCOL_VERSION:
        raise VersionMismatch(env.v, PROTOCOL_VERSION, reply_to=_probe_msg_id(env.body))
    cls = MESSAGE_TYPES.get(env.t)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {env.t!r}", reply_to=_probe_msg_id(env.body))
    try:
        accepted = _resolve_allowed(allowed)
    except TypeError as exc:
        raise ProtocolError(str(exc)) from None  # a caller bug, still typed
    if not issubclass(cls, accepted):
        names = ", ".join(sorted(a.__name__ for a in accepted))
        raise UnknownMessageType(f"message type {env.t!r} is not accepted here (expected {names})",
                                 reply_to=_probe_msg_id(env.body))
    try:
        return _body_decoder(cls).decode(env.body)
    except msgspec.ValidationError as exc:
        err: ProtocolError = ValidationError(f"invalid {env.t}: {exc}", reply_to=_probe_msg_id(env.body))
    except msgspec.DecodeError as exc:
        err = MalformedMessage(f"malformed {env.t}: {exc}")
    except Exception as exc:  # noqa: BLE001 - RecursionError, and anything unforeseen
        err = MalformedMessage(f"malformed {env.t}: {type(exc).__name__}")
    err.msg_type = env.t  # the receiver may act on whom it concerns (e.g. a bad KvEvents: resync)
    raise err


def decode_as(data: bytes | bytearray | memoryview, cls: type[M], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> M:
    """`decode` restricted to exactly one message class, typed for checkers."""
    return decode(data, cls, max_bytes)


def validate(msg: Message) -> None:
    """Raise ValidationError when `msg` would be rejected by a receiver (encode + decode)."""
    decode(encode(msg), type(msg), max_bytes=1 << 62)
