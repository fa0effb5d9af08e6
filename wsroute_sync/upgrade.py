"""The server's side of the opening handshake: what an upgrade request gets from the
server's options and hooks (the 101 and a message stream, or a refusal), and how a
client we will not serve is answered.

The protocol's rules are :mod:`wsroute_sync.handshake`'s; this module adds the server's
policy (paths, origins, subprotocols, compression) and runs the user's hooks
(``check_origin``, ``authenticate``), whose failures are logged and refused with 500.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, NamedTuple, Optional, Union

from .errors import HandshakeRejected
from .http import HTTPRequest
from .handshake import accept_upgrade, check_upgrade, rejection_response
from .options import ServerOptions
from .stream import MessageStream

__all__ = ["Upgrade", "negotiate", "answer_and_close"]

_Logger = Union[logging.Logger, logging.LoggerAdapter]  # type: ignore[type-arg]

# How long a refused or plain-HTTP client gets to read our answer before the socket is
# closed, and how much of what it still sends is read meanwhile.
_ANSWER_LINGER_SECONDS = 1.0
_ANSWER_DRAIN_BYTES = 1 << 20


class Upgrade(NamedTuple):
    """An accepted upgrade: the 101 to send, and the connection's state after it."""

    response: bytes
    stream: MessageStream
    subprotocol: Optional[str]
    #: What the ``authenticate`` hook returned (``None`` without one).
    identity: Any


def negotiate(request: HTTPRequest, options: ServerOptions, logger: _Logger,
              connection_id: str) -> Union[Upgrade, bytes]:
    """The answer to an upgrade request: an :class:`Upgrade`, or the whole HTTP response
    refusing it (logged at WARNING)."""
    try:
        try:
            check_upgrade(
                request,
                paths=options.path,
                allowed_origins=options.allowed_origins,
                check_origin=options.check_origin,
            )
        except HandshakeRejected:
            raise
        except Exception as exc:  # only the check_origin hook runs user code here
            logger.error("connection %s: check_origin hook failed", connection_id,
                         exc_info=True)
            raise HandshakeRejected(500, "origin check failed") from exc
        identity = None
        if options.authenticate is not None:
            identity = _authenticate(options.authenticate, request, logger)
        try:
            response, ws, subprotocol, deflate = accept_upgrade(
                request, subprotocols=options.subprotocols, compression=options.compression
            )
        except ValueError as exc:
            # wsproto parses extension parameters with int() and lets the error out:
            # "permessage-deflate; client_max_window_bits=abc" is the client's fault.
            raise HandshakeRejected(400, "invalid Sec-WebSocket-Extensions") from exc
    except HandshakeRejected as exc:
        logger.warning(
            "connection %s: handshake refused with %d: %s", connection_id, exc.status,
            exc.reason,
        )
        return rejection_response(exc, head_only=request.method == "HEAD")
    stream = MessageStream(ws, max_message_size=options.max_message_size, extensions=deflate)
    return Upgrade(response, stream, subprotocol, identity)


def _authenticate(hook: Callable[[HTTPRequest], Any], request: HTTPRequest,
                 logger: _Logger) -> Any:
    """Run an ``authenticate`` hook: the identity, or ``HandshakeRejected`` (403 for a
    falsy identity, 500 when the hook fails)."""
    try:
        identity = hook(request)
    except HandshakeRejected:
        raise
    except Exception as exc:
        logger.error("authenticate hook failed", exc_info=True)
        raise HandshakeRejected(500, "authentication failed") from exc
    if not identity:
        raise HandshakeRejected(403, "forbidden")
    return identity


def answer_and_close(sock: socket.socket, response: bytes, *, close: bool = True) -> None:
    """Write an HTTP answer to a client we will not serve, then half-close and read what
    it still sends for a moment before closing (blocking, in the calling thread).

    Closing a socket with unread input makes the kernel send RST, which can destroy our
    answer before the client reads it; draining first lets the client see it.
    """
    try:
        sock.settimeout(_ANSWER_LINGER_SECONDS)
        sock.sendall(response)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _ANSWER_LINGER_SECONDS
        drained = 0
        while drained < _ANSWER_DRAIN_BYTES and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except (OSError, ValueError):
        pass
    finally:
        if close:
            sock.close()
