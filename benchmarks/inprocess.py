"""Python cost of wsroute_sync's own work, measured in one process without a network.

    python benchmarks/inprocess.py            # every measurement, best of 5 each
    WSROUTE_SYNC_PURE_WSPROTO=1 python benchmarks/inprocess.py   # wsproto for every frame

What bench.py cannot separate: how much of a round trip or a connection is our Python,
as opposed to system calls, the GIL and the scheduler. Rows:

* ``receive``, ``dispatch``, ``send``: one 64-byte echo request through
  ``MessageStream.receive``, a ``Dispatcher`` (envelope parsing, lookup, the handler,
  the reply; a bare ``ctx``) and ``MessageStream.send``;
* ``serve loop``: ``Server.serve_socket`` on a fake socket whose ``recv`` returns one
  request frame per call and whose ``send`` drops the reply: the whole per-message
  path (the one handshake is spread over 20,000 messages);
* ``connection``: one connection's whole server-side life on a real loopback socket,
  run synchronously by ``Server.serve_socket`` (handshake, one request, the closing
  handshake), minus the same client-side work without a server;
* ``raw-tcp json``: the JSON work the raw-TCP peer does per request (loads + dumps),
  for scale.

Numbers are per item, best of five batches. A script with fixed inputs, not a test.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import Request  # noqa: E402

from wsroute_sync import Server  # noqa: E402
from wsroute_sync.http import parse_request_head  # noqa: E402
from wsroute_sync.metrics import ConnectionMetrics  # noqa: E402
from wsroute_sync.routing import Dispatcher, resolve_handler  # noqa: E402
from wsroute_sync.handshake import accept_upgrade  # noqa: E402
from wsroute_sync.stream import MessageStream  # noqa: E402

KEY = b"\x11\x22\x33\x44"
REQUEST = json.dumps({"Route": "echo", "Params": {"message": "x" * 64}},
                     separators=(",", ":")).encode()


def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (RFC 6455 5.2), payloads under 126 bytes."""
    n = len(payload)
    body = bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | n)) + KEY + body


FRAME = masked(1, REQUEST)
CLIENT_HEAD = WSConnection(ConnectionType.CLIENT).send(Request(host="example.com", target="/"))


def best_of(fn: Callable[[], Any], n: int, per: int = 1) -> float:
    """Seconds per item: ``fn`` handles ``per`` items; best of five batches of ``n``."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / (n * per))
    return best


def make_server() -> Server:
    server = Server(max_connections=100_000)

    @server.route("echo")
    def echo(ctx: Any, message: bytes) -> bytes:
        return message

    return server


def new_stream() -> MessageStream:
    _, ws, _, _ = accept_upgrade(parse_request_head(CLIENT_HEAD))
    return MessageStream(ws, max_message_size=1 << 20)


class _Conn:
    metrics = ConnectionMetrics()


class _FakeSocket:
    """recv() and recv_into() return the request frame ``n`` times, then end of stream;
    what is sent is counted and dropped; the rest does nothing."""

    family = socket.AF_INET

    def __init__(self, n: int) -> None:
        self.n = n
        self.sent = 0

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.n:
            self.n -= 1
            return FRAME
        return b""

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        data = self.recv(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def send(self, data: bytes, flags: int = 0) -> int:
        self.sent += 1
        return len(data)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self.sent += 1

    def fileno(self) -> int:
        return -1

    def __getattr__(self, name: str) -> Callable[..., None]:
        # settimeout, setsockopt, setblocking, shutdown, close...: nothing to do.
        return lambda *args, **kwargs: None


def serve_loop(server: Server, n: int) -> None:
    sock = _FakeSocket(n)
    request = parse_request_head(CLIENT_HEAD, ("127.0.0.1", 1))
    server.serve_socket(sock, ("127.0.0.1", 1), request)  # type: ignore[arg-type]
    if sock.sent < n:  # the 101 and the n replies (the Close may be counted too)
        raise SystemExit(f"serve loop answered {sock.sent} of {n} requests")


def connection_costs(server: Server, n: int) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    head = (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Upgrade: websocket\r\n\r\n" % port
    )
    data = head + FRAME + masked(8, (1000).to_bytes(2, "big"))

    def with_server() -> None:
        client = socket.create_connection(("127.0.0.1", port))
        sock, addr = listener.accept()
        client.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        end = received.index(b"\r\n\r\n") + 4
        request = parse_request_head(received[:end], addr)
        server.serve_socket(sock, addr, request, rest=received[end:])
        client.close()

    def without_server() -> None:
        client = socket.create_connection(("127.0.0.1", port))
        sock, _ = listener.accept()
        client.sendall(data)
        sock.recv(4096)
        sock.close()
        client.close()

    try:
        return best_of(with_server, n) - best_of(without_server, n)
    finally:
        listener.close()


def echo_dispatcher() -> Dispatcher:
    routes = {"echo": resolve_handler(lambda ctx, message: message)}
    return Dispatcher(routes.get, lambda route, params, connection, deadline: connection,
                      logger=logging.getLogger("inprocess"), handler_timeout=None)


def main() -> None:
    server = make_server()
    handle = echo_dispatcher().dispatch
    stream = new_stream()
    conn = _Conn()
    text = REQUEST.decode()
    rows = [
        ("receive", best_of(lambda: stream.receive(FRAME), 40_000)),
        ("dispatch", best_of(lambda: handle(conn, text), 40_000)),
        ("send", best_of(lambda: stream.send(text), 40_000)),
        ("serve loop", best_of(lambda: serve_loop(server, 20_000), 1, per=20_000)),
        ("connection", connection_costs(server, 2_000)),
        ("raw-tcp json", best_of(lambda: json.dumps(json.loads(REQUEST)["Params"]), 40_000)),
    ]
    print(f"Python {sys.version.split()[0]}, 64-byte echo request, per item:")
    for name, seconds in rows:
        print(f"  {name:14s} {seconds * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
