"""The opening handshake's decisions, sans-I/O: what the server answers to a request head.

Whether a request asks for WebSocket at all, whether it is a valid handshake the server's
policy (paths, origins) admits, and, if so, the ``101`` response with the subprotocol
and permessage-deflate chosen, and wsproto's frame-level connection for what follows;
else the refusal's HTTP answer. upgrade.py does the I/O around these decisions.
"""

from __future__ import annotations

import base64
import binascii
from typing import Callable, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from wsproto.connection import Connection
from wsproto.extensions import PerMessageDeflate
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import generate_accept_token, split_comma_header

from .errors import HandshakeRejected
from .frames import NegotiatedConnection
from .http import HTTPRequest, http_response

__all__ = [
    "is_upgrade_request",
    "check_upgrade",
    "default_origin_check",
    "accept_upgrade",
    "rejection_response",
]


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
    """Accept a request that :func:`check_upgrade` passed, with wsproto's parts.

    Returns the ``101`` response bytes, wsproto's frame-level :class:`Connection`,
    the chosen subprotocol and whether permessage-deflate was negotiated.

    wsproto's ``H11Handshake`` would parse the request a second time through an h11
    client and server pair (about two thirds of a handshake's CPU); the request is
    already parsed and checked, so its pieces are used directly: wsproto's accept
    token and extension negotiation, and its ``Connection`` for the frames. The
    response is the one ``H11Handshake`` writes (``tests/test_protocol.py`` compares).
    """
    key = request.headers["sec-websocket-key"].strip().encode("latin-1")
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + generate_accept_token(key),
    ]
    subprotocol = _pick_subprotocol(request, subprotocols)
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii"))
    negotiated: Optional[PerMessageDeflate] = None
    if compression == "deflate":
        offers = [
            offer
            for value in request.headers.get_all("sec-websocket-extensions")
            for offer in split_comma_header(value.encode("latin-1"))
        ]
        extension = PerMessageDeflate()
        accepted = server_extensions_handshake(offers, [extension])
        if accepted:
            lines.append(b"Sec-WebSocket-Extensions: " + accepted)
            negotiated = extension
    response = b"\r\n".join(lines) + b"\r\n\r\n"
    return response, NegotiatedConnection(negotiated), subprotocol, negotiated is not None


def rejection_response(exc: HandshakeRejected, *, head_only: bool = False) -> bytes:
    """The HTTP answer to a refused handshake: status, its headers, the reason as text."""
    body = (exc.reason or "") + "\n" if exc.reason else ""
    return http_response(exc.status, body, headers=exc.headers, head_only=head_only)
