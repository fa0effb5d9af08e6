"""The ``ctx`` a handler receives: the request's route and parameters, and its connection.

A new :class:`Context` is made for each message (it is small: four slots); everything
about the connection is read through to the :class:`~wsroute_sync.ServerConnection`.
"""

from __future__ import annotations

import time
import threading
from typing import Any, Callable, Dict, List, Optional, Protocol, cast

from .connection import ServerConnection
from .http import Headers

__all__ = ["Context", "ServerView"]


class ServerView(Protocol):
    """What a handler can do with its server through ``ctx.server`` (a
    :class:`~wsroute_sync.Server`; this names the part handlers use)."""

    @property
    def connections(self) -> List[ServerConnection]: ...

    def broadcast(self, message: Any, *, room: Optional[str] = None,
                  predicate: Optional[Callable[[ServerConnection], bool]] = None,
                  timeout: Optional[float] = None) -> int: ...

    def send_to(self, connection_id: str, message: Any) -> bool: ...

    def stats(self) -> Dict[str, Any]: ...

    def close(self, timeout: Optional[float] = 10.0) -> None: ...


class Context:
    """What a handler knows about the message it is handling.

    Attributes:
        route: the route the client named.
        params: the decoded ``Params`` value (the handler's ``message`` argument holds
            the same value as UTF-8 JSON bytes), so a handler need not parse twice.
        connection: the :class:`~wsroute_sync.ServerConnection` the message came on.
        deadline: ``time.monotonic()`` value by which the handler should be done
            (``handler_timeout``), or ``None``. Python cannot stop a thread, so this is
            cooperative: check :meth:`time_left` in long work; overruns are logged.
    """

    __slots__ = ("route", "params", "connection", "deadline")

    def __init__(
        self,
        route: str,
        params: Any,
        connection: ServerConnection,
        deadline: Optional[float] = None,
    ) -> None:
        self.route = route
        self.params = params
        self.connection = connection
        self.deadline = deadline

    def time_left(self) -> Optional[float]:
        """Seconds until :attr:`deadline` (negative once past), or ``None`` without one."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()

    @property
    def expired(self) -> bool:
        """True once the handler deadline has passed."""
        return self.deadline is not None and time.monotonic() > self.deadline

    # Read-through to the connection.

    @property
    def connection_id(self) -> str:
        return self.connection.id

    @property
    def remote_address(self) -> Any:
        return self.connection.remote_address

    @property
    def path(self) -> str:
        return self.connection.path

    @property
    def query(self) -> str:
        return self.connection.query

    @property
    def query_params(self) -> Dict[str, Any]:
        request = self.connection.request
        return request.query_params if request is not None else {}

    @property
    def headers(self) -> Headers:
        request = self.connection.request
        assert request is not None  # handlers only run after the handshake
        return request.headers

    @property
    def server(self) -> ServerView:
        return cast(ServerView, self.connection.server)

    @property
    def values(self) -> Dict[str, Any]:
        """A dict kept for the life of the connection, for the handlers' own state."""
        return self.connection.values

    @property
    def identity(self) -> Any:
        """What the server's ``authenticate`` hook returned for this connection."""
        return self.connection.identity

    @property
    def subprotocol(self) -> Optional[str]:
        return self.connection.subprotocol

    @property
    def closed(self) -> threading.Event:
        """Set when the connection closes or the server shuts down."""
        return self.connection.closed

    def join(self, room: str) -> None:
        """Join ``room`` (see ``ServerConnection.join``): ``broadcast(m, room=room)``."""
        self.connection.join(room)

    def leave(self, room: str) -> None:
        """Leave ``room``; leaving a room not joined does nothing."""
        self.connection.leave(room)

    def send(self, message: Any) -> None:
        """Push an extra message to this client (thread-safe; see ServerConnection.send)."""
        self.connection.send(message)

    def __repr__(self) -> str:
        return f"<Context route={self.route!r} connection={self.connection.id}>"
