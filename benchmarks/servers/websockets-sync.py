"""websockets.sync.server (python-websockets' threaded server) doing the echo route.

One thread per connection from the library's own accept loop, plus the
connection's background reader thread.

Fan-out (routes ``fanout_start``/``fanout_stop``): what a websockets.sync user
writes, as the library has no broadcast of its own for the threaded API: the
handler keeps the open connections in a set, and a ticker thread loops over
them calling ``send``.
"""

from __future__ import annotations

import threading

from _common import BACKLOG, Ticker, dispatch, parse_args, prepare_process, ready, register
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

CONNECTIONS: set[ServerConnection] = set()
CONNECTIONS_LOCK = threading.Lock()


def send_all(message: str) -> None:
    with CONNECTIONS_LOCK:
        targets = list(CONNECTIONS)
    for ws in targets:
        try:
            ws.send(message)
        except ConnectionClosed:
            pass


def handler(ws: ServerConnection) -> None:
    with CONNECTIONS_LOCK:
        CONNECTIONS.add(ws)
    try:
        # A text request arrives as str, and send(str) answers with a text frame,
        # matching wsroute_sync's "reply in the request's frame type".
        for message in ws:
            ws.send(dispatch(message))
    finally:
        with CONNECTIONS_LOCK:
            CONNECTIONS.discard(ws)


def main() -> None:
    args = parse_args(__doc__ or "")
    prepare_process()
    ticker = Ticker(send_all)
    register("fanout_start", ticker.start)
    register("fanout_stop", ticker.stop)
    with serve(
        handler,
        "127.0.0.1",
        args.port,
        # The load generator never offers permessage-deflate; saying so keeps
        # the handshake identical across peers.
        compression=None,
        # The default keepalive adds a third thread per connection: 30,000
        # threads for the 10k scenario, past this machine's pid_max (32768).
        # No other peer pings by default, so none pings here either.
        ping_interval=None,
        # Larger than the 64 KiB scenario's frames (default 1 MiB is fine,
        # stated for clarity).
        max_size=2**20,
        backlog=BACKLOG,
    ) as server:
        ready(server.socket.getsockname()[1])
        server.serve_forever()


if __name__ == "__main__":
    main()
