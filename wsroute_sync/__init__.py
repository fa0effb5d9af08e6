"""wsroute_sync: a threaded, synchronous WebSocket server with JSON route dispatch.

    from wsroute_sync import Server

    server = Server(max_connections=1000)

    @server.route("echo")
    def echo(ctx, message: bytes) -> bytes:
        return message

    server.serve(":8080")
"""

from .auth import basic_auth
from .backplane import Backplane, BackplaneMessage, RedisBackplane
from .client import Client
from .connection import ServerConnection
from .context import Context
from .errors import (
    ClientTimeout,
    ConnectionClosed,
    HandlerError,
    HandshakeRejected,
    RouteError,
    WSRouteError,
)
from .http import Headers, HTTPRequest
from .functional import new_server, with_logger, with_max_connections, with_option
from .options import ServerOptions
from .routing import error_envelope
from .server import Server

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Server",
    "ServerConnection",
    "ServerOptions",
    "Context",
    "Headers",
    "HTTPRequest",
    "new_server",
    "with_max_connections",
    "with_logger",
    "with_option",
    "error_envelope",
    "basic_auth",
    "WSRouteError",
    "HandlerError",
    "HandshakeRejected",
    "ConnectionClosed",
    "RouteError",
    "ClientTimeout",
    "Client",
    "Backplane",
    "BackplaneMessage",
    "RedisBackplane",
]
