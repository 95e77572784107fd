"""Typed errors of the wire protocol.

Decoding raises only `ProtocolError` subclasses, whatever the input. Each class has a stable
`code` string: it travels in `ErrorReply.code`, so the peer can tell what went wrong without
parsing the human-readable message.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every protocol error.

    `reply_to` is the msg_id of the offending request when it could be read (so an ErrorReply
    still correlates), `peer` the ROUTER identity it came from (set by the socket wrappers), and
    `msg_type` the type tag when the envelope named a known type whose body is bad.
    """

    code = "protocol_error"
    msg_type: str | None = None

    def __init__(self, message: str, *, reply_to: str | None = None, peer: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reply_to = reply_to
        self.peer = peer


class MalformedMessage(ProtocolError):
    """The bytes are not a protocol envelope: random bytes, truncated msgpack, bad frame layout."""

    code = "malformed"


class UnknownMessageType(ProtocolError):
    """The type tag names no message, or one this socket does not accept."""

    code = "unknown_type"


class VersionMismatch(ProtocolError):
    """The envelope's protocol version differs from ours."""

    code = "version_mismatch"

    def __init__(self, got: object, expected: int, *, reply_to: str | None = None, peer: bytes | None = None) -> None:
        super().__init__(f"protocol version {got!r} is not supported (this process speaks {expected})",
                         reply_to=reply_to, peer=peer)
        self.got = got
        self.expected = expected


class MessageTooLarge(ProtocolError):
    """The message exceeds the size limit; checked before any parsing."""

    code = "too_large"

    def __init__(self, size: int, limit: int, *, reply_to: str | None = None, peer: bytes | None = None) -> None:
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes", reply_to=reply_to, peer=peer)
        self.size = size
        self.limit = limit


class ValidationError(ProtocolError):
    """The envelope is fine but a field has the wrong type, is missing, or is out of range."""

    code = "invalid"


class RequestTimeout(ProtocolError, TimeoutError):
    """No reply arrived before the request's timeout (also an `asyncio`/builtin `TimeoutError`)."""

    code = "timeout"


class RemoteError(ProtocolError):
    """The peer answered a request with an `ErrorReply`; `code` is the peer's error code."""

    def __init__(self, code: str, message: str, *, reply_to: str | None = None) -> None:
        super().__init__(f"{code}: {message}", reply_to=reply_to)
        self.code = code  # instance attribute shadows the class default
        self.remote_message = message
