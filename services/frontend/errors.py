"""Why the frontend could not start a request, as an HTTP status and a protocol ErrorCode."""

from __future__ import annotations

from protocol.common import ErrorCode


class RouteError(Exception):
    """A request could not be started; `status` is the HTTP status, `code` the protocol ErrorCode."""

    STATUS = {ErrorCode.INVALID: 400, ErrorCode.OVERLOADED: 429, ErrorCode.UNAVAILABLE: 503,
              ErrorCode.REFUSED: 503, ErrorCode.EXPIRED: 504}

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = self.STATUS.get(code, 500)
