"""Raw TCP, thread per connection, newline-delimited JSON: the ceiling of this design.

Same threads-and-blocking-sockets architecture as the WebSocket servers and the
same JSON routing work, with no WebSocket framing, masking or handshake at all.
Whatever wsroute_sync loses against this is the price of the protocol stack.
"""

from __future__ import annotations

import socket
import threading

from _common import BACKLOG, dispatch, parse_args, prepare_process, ready

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
    args = parse_args(__doc__ or "")
    prepare_process()
    listener = socket.create_server(("127.0.0.1", args.port), backlog=BACKLOG)
    ready(listener.getsockname()[1])
    while True:
        sock, _ = listener.accept()
        # Replies are single writes, but a 64 KiB reply ends in a short
        # segment that Nagle would hold back until the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Daemon threads: SIGTERM ends the process at once, which is all a
        # benchmark peer needs.
        threading.Thread(target=handle, args=(sock,), daemon=True).start()


if __name__ == "__main__":
    main()
