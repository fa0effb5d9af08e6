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
import time
from typing import Any, Callable

__all__ = [
    "BACKLOG", "Ticker", "dispatch", "fanout_message", "free_port", "parse_args",
    "prepare_process", "ready", "register", "serve_threads",
]

#: One listen() backlog for every server we configure. The peers' defaults
#: differ (socketserver uses 5, socket.create_server 128); 10,000 connections
#: arriving at once should measure accept loops, not SYN retransmit timers.
BACKLOG = 1024


def _echo(params: Any) -> Any:
    return params


_ROUTES: dict[str, Callable[[Any], Any]] = {"echo": _echo}


def register(name: str, handler: Callable[[Any], Any]) -> None:
    """Add a route to :func:`dispatch` (the fan-out peers add ``fanout_start``/``_stop``)."""
    _ROUTES[name] = handler


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


def parse_args(description: str, *, cpu_affinity: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = pick a free one)"
    )
    if cpu_affinity:  # wsroute_sync's servers: its cpu_affinity option
        parser.add_argument(
            "--cpu-affinity", default=None, help="'one' or CPU numbers (default: unbound)"
        )
    return parser.parse_args()


def affinity(value: str | None) -> dict[str, object]:
    """Server keywords for ``--cpu-affinity``: none at all when it is not given, so
    that an older wsroute_sync without the option (bench.py --baseline) runs too."""
    if value is None:
        return {}
    if value == "one":
        return {"cpu_affinity": value}
    return {"cpu_affinity": frozenset(int(cpu) for cpu in value.split(","))}


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


# --------------------------------------------------------------------------- fan-out


def fanout_message(seq: int, size: int = 64) -> str:
    """The broadcast payload: ``{"seq":N,"t":<unix ns>,"pad":"xx.."}``, ``size`` bytes.

    ``t`` is the wall clock (``time.time_ns``, CLOCK_REALTIME) when the tick fired; the
    load generator, on the same host, subtracts it from its receive time. The Go peer
    builds the same bytes (servers/gorilla/main.go).
    """
    head = f'{{"seq":{seq},"t":{time.time_ns()},"pad":"'
    return head + "x" * max(0, size - len(head) - 2) + '"}'


class Ticker:
    """A thread that calls ``send_all(message)`` every ``interval_s`` while started.

    Ticks that a slow ``send_all`` makes it miss are dropped, not bunched up (what Go's
    ``time.Ticker`` does for the gorilla peer): the next one fires as soon as the
    current send ends, and the schedule restarts from there.
    ``start``/``stop`` are the handlers of the ``fanout_start``/``fanout_stop`` routes.
    """

    def __init__(self, send_all: Callable[[str], Any]) -> None:
        self._send_all = send_all
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._seq = 0

    def start(self, params: Any) -> dict[str, str]:
        params = params if isinstance(params, dict) else {}
        interval_s = float(params.get("interval_ms", 20)) / 1000
        size = int(params.get("size", 64))
        with self._lock:
            if self._stop is None:
                self._stop = threading.Event()
                threading.Thread(
                    target=self._run, args=(interval_s, size, self._stop), daemon=True,
                    name="fanout-ticker",
                ).start()
        return {"fanout": "started"}

    def stop(self, params: Any = None) -> dict[str, str]:
        with self._lock:
            if self._stop is not None:
                self._stop.set()
                self._stop = None
        return {"fanout": "stopped"}

    def _run(self, interval_s: float, size: int, stop: threading.Event) -> None:
        next_t = time.monotonic()
        while not stop.is_set():
            self._send_all(fanout_message(self._seq, size))
            self._seq += 1
            next_t += interval_s
            delay = next_t - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            else:
                next_t = time.monotonic()  # late: the missed ticks are dropped
