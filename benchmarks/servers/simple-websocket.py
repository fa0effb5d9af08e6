"""simple-websocket on raw sockets: a plain accept loop and a thread per connection.

simple_websocket.Server normally takes its socket from a WSGI server's environ
(Werkzeug, Gunicorn). Here the accept loop reads the HTTP upgrade request
itself and hands the socket over the way Werkzeug does ("werkzeug.socket"),
so no WSGI server's cost is added. simple-websocket then runs its own reader
thread per connection, next to the handler thread started here.
"""

from __future__ import annotations

import socket
from typing import Any

import simple_websocket  # type: ignore[import-untyped]  # no stubs
from _common import dispatch, serve_threads

#: Upper bound on the upgrade request's size; a normal one is ~250 bytes.
MAX_REQUEST_HEAD = 16 * 1024


def read_environ(sock: socket.socket) -> dict[str, Any] | None:
    """Read the HTTP/1.1 upgrade request and build the environ simple-websocket expects."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk or len(head) + len(chunk) > MAX_REQUEST_HEAD:
            return None
        head += chunk
    request_head, _, rest = head.partition(b"\r\n\r\n")
    if rest:
        # A client must wait for 101 before sending frames (RFC 6455 section
        # 4.1); bytes here would be lost by simple-websocket, so refuse.
        return None
    lines = request_head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "werkzeug.socket": sock,
    }
    for line in lines[1:]:
        name, _, value = line.partition(":")
        environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
    return environ


def handle(sock: socket.socket) -> None:
    try:
        environ = read_environ(sock)
        if environ is None:
            sock.close()
            return
        ws = simple_websocket.Server(environ)
        while True:
            message = ws.receive()
            if message is None:  # only with a timeout; kept for completeness
                continue
            ws.send(dispatch(message))
    except simple_websocket.ConnectionClosed:
        pass  # simple-websocket's reader thread already answered Close and closed the socket
    except OSError:
        sock.close()


def main() -> None:
    serve_threads(__doc__ or "", handle)


if __name__ == "__main__":
    main()
