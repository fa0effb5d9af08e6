"""The WebSocket protocol, sans-I/O: handshake decisions and whole messages.

wsproto does the protocol work (RFC 6455 framing, masking, UTF-8 validation, close
codes, permessage-deflate); this module decides what the server answers to a request
head, and turns wsproto's per-frame events into whole messages and control outcomes
under the server's limits. It imports neither ``socket`` nor ``threading``: bytes in,
bytes and values out.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union, cast
from urllib.parse import urlsplit

from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake
from wsproto.connection import ConnectionType
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .errors import HandshakeRejected
from .http import HTTPRequest, http_response

__all__ = [
    "Message",
    "PingReceived",
    "PongReceived",
    "CloseReceived",
    "ProtocolFailure",
    "is_upgrade_request",
    "check_upgrade",
    "default_origin_check",
    "accept_upgrade",
    "rejection_response",
    "MessageStream",
    "CLOSE_GOING_AWAY",
]

Message = Union[str, bytes]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


def is_upgrade_request(request: HTTPRequest) -> bool:
    """Whether the client asks for WebSocket at all (``Upgrade: websocket``).

    Requests without it are plain HTTP: health checks, a browser opening the URL, a
    proxy probing. They get a plain HTTP answer (426 by default), not a handshake error.
    """
    return any(
        token.strip().lower() == "websocket"
        for value in request.headers.get_all("upgrade")
        for token in value.split(",")
    )


def default_origin_check(request: HTTPRequest) -> bool:
    """gorilla/websocket's rule: no ``Origin`` (not a browser), or its host equals ``Host``.

    A browser always sends ``Origin`` on a WebSocket handshake (RFC 6455 4.1 item 8); a
    page from another site must not be able to use a visitor's cookies to talk to us
    (cross-site WebSocket hijacking), hence the same-host rule.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host")
    if host is None:
        return False
    try:
        origin_host = urlsplit(origin).netloc
    except ValueError:
        return False
    return origin_host.lower() == host.lower()


def check_upgrade(
    request: HTTPRequest,
    *,
    paths: Optional[Sequence[str]] = None,
    allowed_origins: Optional[Sequence[str]] = None,
    check_origin: Optional[Callable[[HTTPRequest], bool]] = None,
) -> None:
    """Raise :class:`HandshakeRejected` with the status RFC 6455 4.2.1 calls for.

    Checks the request as wsproto would and more strictly where wsproto is lenient
    (the key's form, the HTTP version), then the server's own policy: path and origin.
    """
    if request.method != "GET":
        # RFC 6455 4.1: "The method of the request MUST be GET".
        raise HandshakeRejected(405, "WebSocket handshakes use GET", headers=[("Allow", "GET")])
    if request.http_version != "1.1":
        raise HandshakeRejected(505, "WebSocket handshakes need HTTP/1.1")
    headers = request.headers
    if "host" not in headers:
        raise HandshakeRejected(400, "missing Host header")
    if not any(
        token.strip().lower() == "upgrade"
        for value in headers.get_all("connection")
        for token in value.split(",")
    ):
        raise HandshakeRejected(
            426,
            "missing 'Connection: Upgrade'",
            headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")],
        )
    versions = headers.get_all("sec-websocket-version")
    if versions != ["13"]:
        # RFC 6455 4.4: answer 426 naming the version we speak.
        raise HandshakeRejected(
            426 if versions else 400,
            "unsupported Sec-WebSocket-Version" if versions else "missing Sec-WebSocket-Version",
            headers=[("Sec-WebSocket-Version", "13")],
        )
    keys = headers.get_all("sec-websocket-key")
    if len(keys) != 1:
        raise HandshakeRejected(400, "missing Sec-WebSocket-Key" if not keys else
                                "more than one Sec-WebSocket-Key")
    try:
        # RFC 6455 4.1 item 7: a base64-encoded 16-byte nonce.
        raw = base64.b64decode(keys[0].strip().encode("latin-1"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeRejected(400, "invalid Sec-WebSocket-Key")
    if paths is not None and request.path not in paths:
        raise HandshakeRejected(404, f"no WebSocket endpoint at {request.path[:200]}")
    if allowed_origins is not None:
        origin = request.headers.get("origin")
        if "*" not in allowed_origins and origin is not None and origin not in allowed_origins:
            raise HandshakeRejected(403, "origin not allowed")
    elif not (check_origin or default_origin_check)(request):
        raise HandshakeRejected(403, "origin not allowed")


def _pick_subprotocol(request: HTTPRequest, supported: Optional[Sequence[str]]) -> Optional[str]:
    if not supported:
        return None
    offered = [
        token.strip()
        for value in request.headers.get_all("sec-websocket-protocol")
        for token in value.split(",")
    ]
    # The server's order of preference decides; with no overlap the header is simply
    # left out (RFC 6455 4.2.2 item 5.4), as gorilla does, and the client decides.
    for name in supported:
        if name in offered:
            return name
    return None


def accept_upgrade(
    request: HTTPRequest,
    *,
    subprotocols: Optional[Sequence[str]] = None,
    compression: Optional[str] = None,
) -> Tuple[bytes, Connection, Optional[str], bool]:
    """Have wsproto accept a checked request.

    Returns the ``101`` response bytes, wsproto's frame-level :class:`Connection`,
    the chosen subprotocol and whether permessage-deflate was negotiated.
    """
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.initiate_upgrade_connection(request.headers.raw(), request.target)
    except RemoteProtocolError as exc:  # pragma: no cover - check_upgrade catches these
        raise HandshakeRejected(400, str(exc)) from exc
    for event in handshake.events():
        assert isinstance(event, Request)
    subprotocol = _pick_subprotocol(request, subprotocols)
    extensions: List[Extension] = []
    if compression == "deflate":
        extensions.append(PerMessageDeflate())
    response = handshake.send(AcceptConnection(subprotocol=subprotocol, extensions=extensions))
    connection = handshake.connection
    assert connection is not None
    deflate = any(isinstance(ext, PerMessageDeflate) and ext.enabled() for ext in extensions)
    return response, connection, subprotocol, deflate


def rejection_response(exc: HandshakeRejected, *, head_only: bool = False) -> bytes:
    """The HTTP answer to a refused handshake: status, its headers, the reason as text."""
    body = (exc.reason or "") + "\n" if exc.reason else ""
    return http_response(exc.status, body, headers=exc.headers, head_only=head_only)


class PingReceived:
    """The peer pinged: answer with :meth:`MessageStream.pong`."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class PongReceived:
    """The peer answered a ping (or sent an unsolicited pong, RFC 6455 5.5.3)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class CloseReceived:
    """The peer sent a Close frame; ``closed`` is true when it answered ours."""

    __slots__ = ("code", "reason", "closed")

    def __init__(self, code: int, reason: str, closed: bool) -> None:
        self.code = code
        self.reason = reason
        self.closed = closed


class ProtocolFailure:
    """The peer broke the protocol or a limit: send Close ``code`` and drop TCP.

    RFC 6455 7.1.7 "Fail the WebSocket Connection": no waiting for the peer's Close.
    """

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


Outcome = Union[str, bytes, PingReceived, PongReceived, CloseReceived, ProtocolFailure]


class MessageStream:
    """Whole messages in, frames out, on top of a wsproto :class:`Connection`.

    ``receive(data)`` returns what the bytes completed: messages (``str`` for text,
    ``bytes`` for binary) and control outcomes, in order. Sending methods return the
    bytes to write. wsproto objects are not thread-safe, so the caller serialises the
    sending methods (the connection holds a lock); ``receive`` is called by one thread.
    """

    __slots__ = ("_ws", "_max_size", "_parts", "_size", "_text")

    def __init__(self, ws: Connection, *, max_message_size: Optional[int] = None) -> None:
        self._ws = ws
        self._max_size = max_message_size
        self._parts: List[Any] = []
        self._size = 0
        self._text = False

    @property
    def open(self) -> bool:
        """True until either side has started the closing handshake."""
        return self._ws.state is ConnectionState.OPEN

    @property
    def state(self) -> ConnectionState:
        return self._ws.state

    def receive(self, data: Optional[bytes]) -> List[Outcome]:
        """Feed bytes read from the socket (``None`` for end of stream)."""
        ws = self._ws
        out: List[Outcome] = []
        if ws.state is ConnectionState.CLOSED:
            return out
        ws.receive_data(data)
        max_size = self._max_size
        for event in ws.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                payload = event.data  # type: ignore[attr-defined]
                if event.message_finished and not self._parts:  # type: ignore[attr-defined]
                    # The common case, one frame per message: no copy, no join.
                    if max_size is not None and len(payload) > max_size:
                        out.append(self._too_big(len(payload)))
                        return out
                    if ws.state is ConnectionState.OPEN:
                        out.append(payload if kind is TextMessage else bytes(payload))
                    continue
                self._parts.append(payload)
                self._size += len(payload)
                self._text = kind is TextMessage
                if max_size is not None and self._size > max_size:
                    out.append(self._too_big(self._size))
                    return out
                if event.message_finished:  # type: ignore[attr-defined]
                    joined: Message = "".join(self._parts) if self._text else b"".join(
                        self._parts
                    )
                    self._parts = []
                    self._size = 0
                    # RFC 6455 1.4: after sending Close, data frames are read and dropped.
                    if ws.state is ConnectionState.OPEN:
                        out.append(joined)
            elif kind is Ping:
                out.append(PingReceived(event.payload))  # type: ignore[attr-defined]
            elif kind is Pong:
                out.append(PongReceived(event.payload))  # type: ignore[attr-defined]
            elif kind is CloseConnection:
                code = event.code  # type: ignore[attr-defined]
                reason = event.reason or ""  # type: ignore[attr-defined]
                # Re-read: processing this Close moved wsproto's state (cast: mypy
                # would keep the narrowing from the check at the top).
                state = cast(ConnectionState, ws.state)
                if state is ConnectionState.REMOTE_CLOSING:
                    out.append(CloseReceived(code, reason, closed=False))
                elif state is ConnectionState.CLOSED and data is not None:
                    out.append(CloseReceived(code, reason, closed=True))
                elif data is None:
                    out.append(CloseReceived(CloseReason.ABNORMAL_CLOSURE, "", closed=True))
                else:
                    # wsproto reports a ParseFailed as a CloseConnection without moving
                    # its state: the peer broke the protocol (1002, 1007...).
                    out.append(ProtocolFailure(code, reason))
                return out
        return out

    def _too_big(self, size: int) -> ProtocolFailure:
        self._parts = []
        self._size = 0
        return ProtocolFailure(
            CLOSE_TOO_BIG, f"message of {size}+ bytes exceeds the limit of {self._max_size}"
        )

    def send(self, data: Message) -> bytes:
        """A data frame: text for ``str``, binary for bytes-like.

        Raises wsproto's ``LocalProtocolError`` once closing has started.
        """
        return self._ws.send(
            TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        )

    def ping(self, payload: bytes = b"") -> bytes:
        return self._ws.send(Ping(payload=payload))

    def pong(self, payload: bytes) -> bytes:
        return self._ws.send(Pong(payload=payload))

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
        """The Close frame to start or answer the closing handshake; ``b""`` if too late."""
        state = self._ws.state
        if state is not ConnectionState.OPEN and state is not ConnectionState.REMOTE_CLOSING:
            return b""
        # RFC 6455 5.5: control frames carry at most 125 bytes; 2 go to the code.
        encoded = reason.encode("utf-8")
        if len(encoded) > 123:
            reason = encoded[:123].decode("utf-8", "ignore")
        try:
            return self._ws.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:  # pragma: no cover - state checked above
            return b""
