"""wsroute_sync (ours), imported from this working tree, doing the echo route.

bench.py skips this server, and says so, while the package can't be imported.

Fan-out (routes ``fanout_start``/``fanout_stop``): a ticker thread calls the
public ``server.broadcast(message)`` once per tick.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import Ticker, affinity, free_port, parse_args, prepare_process, ready

# Benchmark the checkout this file lives in, not whatever copy happens to be
# installed in site-packages; or, for bench.py --baseline, the copy of another
# revision it names.
sys.path.insert(0, os.environ.get("WSROUTE_SYNC_TREE") or str(Path(__file__).resolve().parents[2]))

#: Exit status that tells bench.py "cannot run here", as opposed to a crash.
EXIT_SKIP = 3

#: How long to wait for serve() to start listening before giving up.
READY_TIMEOUT_S = 20.0


def announce_when_listening(port: int) -> None:
    """Print the ready line once the port accepts connections.

    serve() blocks and reports nothing, so readiness is observed from outside:
    one TCP connect that is closed straight away (the server sees a client
    that left before its handshake).
    """
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                ready(port)
                return
        except OSError:
            time.sleep(0.02)
    print(
        f"wsroute-sync: not listening on {port} after {READY_TIMEOUT_S}s",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    args = parse_args(__doc__ or "", cpu_affinity=True)
    try:
        from wsroute_sync import Server
    except ImportError as exc:
        print(f"SKIP wsroute_sync cannot be imported: {exc}", flush=True)
        sys.exit(EXIT_SKIP)
    prepare_process()

    # No _common.dispatch here: wsroute_sync parses the envelope, routes and
    # re-encodes itself; that is the work the peers reproduce with dispatch.
    server = Server(max_connections=20000, **affinity(args.cpu_affinity))

    @server.route("echo")
    def echo(ctx: object, message: bytes) -> bytes:  # message = Params as UTF-8 JSON
        return message

    ticker = Ticker(server.broadcast)  # a str goes out as one text frame to every client

    @server.route("fanout_start")
    def fanout_start(ctx: Any, message: bytes) -> dict[str, str]:
        return ticker.start(ctx.params)

    @server.route("fanout_stop")
    def fanout_stop(ctx: Any, message: bytes) -> dict[str, str]:
        return ticker.stop()

    # Server.serve() takes "host:port" and (per its contract) doesn't report
    # the bound port, so port 0 is resolved here; the tiny race with another
    # process taking the port in between is acceptable for a benchmark.
    port = args.port or free_port()
    threading.Thread(target=announce_when_listening, args=(port,), daemon=True).start()
    server.serve(f"127.0.0.1:{port}")


if __name__ == "__main__":
    main()
