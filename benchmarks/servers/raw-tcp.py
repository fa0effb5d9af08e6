"""Raw TCP, thread per connection, newline-delimited JSON: the ceiling of this design.

Same threads-and-blocking-sockets architecture as the WebSocket servers and the
same JSON routing work, with no WebSocket framing, masking or handshake at all.
Whatever wsroute_sync loses against this is the price of the protocol stack.
"""

from __future__ import annotations

import socket

from _common import dispatch, serve_threads

#: Longest request line accepted; the 64 KiB scenario needs well under this.
MAX_LINE = 1 << 20


def handle(sock: socket.socket) -> None:
    with sock, sock.makefile("rb") as rfile:
        while True:
            line = rfile.readline(MAX_LINE)
            if not line:  # EOF: the client half-closed, which is our close handshake
                return
            sock.sendall(dispatch(line).encode() + b"\n")


def main() -> None:
    serve_threads(__doc__ or "", handle)


if __name__ == "__main__":
    main()
