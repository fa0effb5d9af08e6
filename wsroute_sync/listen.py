"""Listening sockets: parse an address, bind it (alone, or reserving a port that worker
processes share), set what accepted sockets inherit, and name it as a URL."""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import Any, Optional, Tuple

__all__ = [
    "parse_address", "open_listener", "reserve_port", "prepare_listener", "url_for", "timeval",
    "LISTEN_BACKLOG", "UNKNOWN_TIMEOUT", "ACCEPT_PAUSE_SECONDS",
]

LISTEN_BACKLOG = 1024
#: The read timeout of an accepted socket whose SO_RCVTIMEO is not known (it did not
#: inherit one from a listener :func:`prepare_listener` set up).
UNKNOWN_TIMEOUT = -1.0
#: When ``accept()`` fails (out of file descriptors, most likely), accepting pauses this
#: long rather than spin on a connection it cannot take (the accept loop and followers).
ACCEPT_PAUSE_SECONDS = 0.1


def parse_address(addr: str) -> Tuple[socket.AddressFamily, Any]:
    """Parse ``":8080"``, ``"host:port"``, ``"[::1]:port"`` or ``"unix:/path"``.

    An empty host listens on every interface (IPv6 and IPv4 where the system has a dual
    stack), as Go's ``net.Listen("tcp", ":8080")`` does.
    """
    if not isinstance(addr, str):
        raise TypeError(f"address must be a string like ':8080', not {type(addr).__name__}")
    if addr.startswith("unix:"):
        path = addr[len("unix:"):]
        if not path:
            raise ValueError("unix: address needs a path, e.g. 'unix:/tmp/app.sock'")
        return socket.AF_UNIX, path
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        raise ValueError(f"address {addr!r} has no port; use ':8080' or 'host:8080'")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"address {addr!r} has an invalid port {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], port)
    if ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets: '[{host}]:{port}'")
    return socket.AF_INET, (host, port)


def open_listener(addr: str, *, reuse_port: bool = False) -> Tuple[socket.socket, Any]:
    """Bind and listen on ``addr`` (see :func:`parse_address`): the non-blocking listening
    socket and the bound address (a path for ``unix:``).

    ``reuse_port``: several processes share the port (``SO_REUSEPORT``, the workers).
    """
    family, address = parse_address(addr)
    if family == socket.AF_UNIX:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(address):
                os.unlink(address)  # a stale socket file from an earlier run
            listener.bind(address)
            listener.listen(LISTEN_BACKLOG)
        except BaseException:
            listener.close()
            raise
        bound: Any = address
    else:
        host, port = address
        if host == "":
            if socket.has_dualstack_ipv6():
                listener = socket.create_server(
                    ("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                    backlog=LISTEN_BACKLOG, reuse_port=reuse_port,
                )
            else:  # pragma: no cover - depends on the system
                listener = socket.create_server(("0.0.0.0", port), backlog=LISTEN_BACKLOG,
                                                reuse_port=reuse_port)
        else:
            infos = socket.getaddrinfo(host, port, family=0, type=socket.SOCK_STREAM)
            listener = socket.create_server(
                infos[0][4][:2], family=infos[0][0], backlog=LISTEN_BACKLOG,
                reuse_port=reuse_port,
            )
        bound = listener.getsockname()[:2]
    listener.setblocking(False)
    return listener, bound


def url_for(address: Any, *, tls: bool) -> str:
    """The URL clients use for a bound ``address`` (``(host, port)``, or a unix path)."""
    if isinstance(address, str):
        return f"ws+unix://{address}"
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    return f"{'wss' if tls else 'ws'}://{host}:{port}/"


def reserve_port(host: str, port: int) -> Tuple[socket.socket, str]:
    """Bind, without listening, a socket that shares its port (``SO_REUSEPORT``), so that
    the port stays taken while the processes that listen on it come and go.

    Returns the socket and the address for :func:`open_listener` with
    ``reuse_port=True`` (``":port"`` for every interface, ``"host:port"``,
    ``"[host]:port"``), naming the port bound (port 0 picks one). Raises ``OSError``.
    """
    if host == "":
        family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
        sockaddr: Any = ("", port) if family == socket.AF_INET6 else ("0.0.0.0", port)
    else:
        infos = socket.getaddrinfo(host, port, family=0, type=socket.SOCK_STREAM)
        family, sockaddr = infos[0][0], infos[0][4][:2]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if host == "" and family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    if host == "":
        return sock, f":{bound_port}"
    if ":" in bound_host:
        return sock, f"[{bound_host}]:{bound_port}"
    return sock, f"{bound_host}:{bound_port}"


def timeval(seconds: Optional[float]) -> bytes:
    # SO_RCVTIMEO takes a struct timeval; zero means "block forever".
    if seconds is None:
        return struct.pack("ll", 0, 0)
    whole = int(seconds)
    micros = int((seconds - whole) * 1e6)
    if whole == 0 and micros == 0:
        micros = 1  # a tiny timeout must not turn into "forever"
    return struct.pack("ll", whole, micros)


def prepare_listener(listener: socket.socket) -> bool:
    """Set on the listener what every accepted socket needs; ``True`` if they inherit it.

    Linux copies a listening socket's TCP_NODELAY to the sockets ``accept()`` returns,
    which saves a system call per connection (a measurable share of a short connection's
    cost); their SO_RCVTIMEO stays 0, reads without a timeout, which is what a connection
    thread wants until it closes. Elsewhere each socket sets its own.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        if listener.family != socket.AF_UNIX:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # pragma: no cover - every Linux TCP socket has it
        return False
    return True
