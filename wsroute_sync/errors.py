"""The exception tree of wsroute_sync.

Every exception the library raises on purpose derives from :class:`WSRouteError`::

    WSRouteError
    ├── HandlerError            raised by a handler to choose the error message
    ├── HandshakeRejected       the opening handshake was refused (carries an HTTP status)
    ├── ConnectionClosed        sending on, or reading from, a closed connection
    ├── RouteError              the client's server answered with an error envelope
    └── ClientTimeout           the client waited longer than its timeout

Exceptions keep what a caller needs as attributes (``status``, ``code``...) and build
their text in ``__str__``, so that a log line and a program see the same facts.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

__all__ = [
    "WSRouteError",
    "HandlerError",
    "HandshakeRejected",
    "ConnectionClosed",
    "RouteError",
    "ClientTimeout",
]


class WSRouteError(Exception):
    """Base class of every exception raised by wsroute_sync."""


class HandlerError(WSRouteError):
    """Raise from a handler to answer the client with ``{"code":1,"msg":<message>,...}``.

    Any other exception escaping a handler is logged with its traceback and the client
    receives a generic message, so that internals never leak; this one is the way for a
    handler to say what went wrong in words meant for the client.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class HandshakeRejected(WSRouteError):
    """The opening handshake was refused with an HTTP ``status``.

    Raised by authentication hooks (see ``Server(authenticate=...)``) to refuse a
    request; ``headers`` are added to the response (e.g. ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        reason: str = "",
        *,
        headers: Optional[Sequence[Tuple[str, str]]] = None,
    ) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = list(headers or ())

    def __str__(self) -> str:
        return f"handshake rejected with HTTP {self.status}" + (
            f": {self.reason}" if self.reason else ""
        )


class ConnectionClosed(WSRouteError):
    """The WebSocket connection is closed; ``code`` and ``reason`` say how, if known."""

    def __init__(self, code: Optional[int] = None, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        if self.code is None:
            return "connection closed"
        return f"connection closed with code {self.code}" + (
            f" ({self.reason})" if self.reason else ""
        )


class RouteError(WSRouteError):
    """The server answered a call with an error envelope ``{"code":..,"msg":..}``."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(code, msg)
        self.code = code
        self.msg = msg

    def __str__(self) -> str:
        return f"server error {self.code}: {self.msg}"


class ClientTimeout(WSRouteError, TimeoutError):
    """A client operation did not complete within its timeout."""
