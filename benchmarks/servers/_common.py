"""Pieces every benchmark server shares, so the peers differ only in their I/O.

Each peer does the same JSON routing work wsroute_sync does for a request:
parse the envelope, look the route up in a dict, re-encode the Params the
handler returns. Keeping that in one place is what makes the comparison about
the WebSocket stacks and not about who wrote a faster echo.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import signal
import socket
import sys
import threading
from typing import Any, Callable

__all__ = [
    "BACKLOG", "dispatch", "free_port", "parse_args", "prepare_process", "ready", "serve_threads",
]

#: One listen() backlog for every server we configure. The peers' defaults
#: differ (socketserver uses 5, socket.create_server 128); 10,000 connections
#: arriving at once should measure accept loops, not SYN retransmit timers.
BACKLOG = 1024


def _echo(params: Any) -> Any:
    return params


_ROUTES: dict[str, Callable[[Any], Any]] = {"echo": _echo}


def dispatch(raw: str | bytes) -> str:
    """Route one JSON envelope and return the reply as JSON text.

    A malformed envelope gets an error object back rather than an exception,
    so the load generator reports it as a wrong reply instead of the peer
    silently dropping the connection.
    """
    try:
        envelope = json.loads(raw)
        handler = _ROUTES[envelope["Route"]]
        params = envelope["Params"]
    except (ValueError, KeyError, TypeError) as exc:
        return json.dumps({"error": f"bad envelope: {exc!r}"})
    return json.dumps(handler(params))


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = pick a free one)"
    )
    return parser.parse_args()


def prepare_process() -> None:
    """Per-process setup every benchmark server does before it listens.

    Lifts the soft fd limit to the hard one, because 10,000 sockets need it
    (done in the benchmark's processes only; a library must not change its
    host process's limits). And asks the kernel to kill this server if
    bench.py dies without cleaning up, so no orphan keeps listening.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def free_port() -> int:
    """A port the kernel considers free right now (for servers that can't report theirs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ready(port: int) -> None:
    """Print the line bench.py waits for; flushed because stdout is a pipe."""
    print(f"READY port={port}", flush=True)
    sys.stdout.flush()


def serve_threads(description: str, handle: Callable[[socket.socket], None]) -> None:
    """The hand-written peers' server: ``--port``, listen, a daemon thread per connection.

    ``TCP_NODELAY`` on every accepted socket: replies are single writes, but Nagle would
    hold the last segment of a 64 KiB reply until the client's delayed ACK (websockets
    sets it itself; Werkzeug and Gunicorn do not, which matters only for that scenario).
    Daemon threads: SIGTERM ends the process at once, which is all a peer needs.
    """
    args = parse_args(description)
    prepare_process()
    listener = socket.create_server(("127.0.0.1", args.port), backlog=BACKLOG)
    ready(listener.getsockname()[1])
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handle, args=(sock,), daemon=True).start()
