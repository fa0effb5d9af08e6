"""Keepalive: one thread pings every connection each ping_interval and fails those that
stop answering (wsroute_sync/keepalive.py).

The contention cases (Pings due while another thread writes a large reply, on ws and
wss, parsed by python-websockets) are in test_contention.py; the 1011 for a client that
never answers is in test_hostile.py.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any, List, Tuple

from websockets.sync.client import connect

from conftest import TIMEOUT, _wait_for, make_server, running
from wsroute_sync.keepalive import Keepalive
from wsroute_sync.sender import Progress
from rawclient import OP_PING, OP_PONG, OP_TEXT, RawClient, handshake_request


def test_pings_come_every_interval_and_pongs_keep_the_connection() -> None:
    interval = 0.2
    server = make_server(ping_interval=interval, ping_timeout=1.0)
    with running(server), RawClient.connect(server.address) as raw:
        seen: List[float] = []
        for n in range(3):
            opcode, payload, _, _, _ = raw.recv_frame()
            assert opcode == OP_PING
            seen.append(time.monotonic())
            raw.send_frame(OP_PONG, payload)
        # Each Ping a full interval after the one before (the first after the open).
        gaps = [b - a for a, b in zip(seen, seen[1:])]
        assert all(gap >= interval * 0.9 for gap in gaps), gaps
        raw.send_text('{"Route":"echo","Params":7}')
        while True:  # a Ping may come first
            opcode, payload, _, _, _ = raw.recv_frame()
            if opcode != OP_PING:
                break
            raw.send_frame(OP_PONG, payload)
        assert (opcode, payload) == (OP_TEXT, b"7")
        assert server.connections[0].open


def test_one_thread_pings_every_connection() -> None:
    """Fifty connections opened together are each pinged, and answered, by one keepalive
    thread: connection threads are not woken by timers, and the server runs one thread
    per connection plus a fixed few."""
    count = 50
    server = make_server(ping_interval=0.3, ping_timeout=2 * TIMEOUT)
    with running(server):
        raws = [RawClient.connect(server.address) for _ in range(count)]
        try:
            assert _wait_for(lambda: server.active_connections == count)
            for raw in raws:
                opcode, payload, _, _, _ = raw.recv_frame()
                assert opcode == OP_PING
                raw.send_frame(OP_PONG, payload)
            keepalive = [t for t in threading.enumerate() if t.name == "wsroute_sync-keepalive"]
            assert len(keepalive) == 1
            for raw in raws:
                raw.send_text('{"Route":"echo","Params":1}')
            for raw in raws:
                opcode, payload, _, _, _ = raw.recv_frame()
                while opcode == OP_PING:
                    raw.send_frame(OP_PONG, payload)
                    opcode, payload, _, _, _ = raw.recv_frame()
                assert (opcode, payload) == (OP_TEXT, b"1")
            assert all(c.open for c in server.connections)
        finally:
            for raw in raws:
                raw.close()
    assert not [t for t in threading.enumerate() if t.name == "wsroute_sync-keepalive"]


def test_ended_connections_are_not_kept_for_their_next_ping() -> None:
    """A connection that ends is forgotten at once, not when its next Ping falls due: with
    churn, ping_interval's worth of dead connections would otherwise stay in memory."""
    server = make_server(ping_interval=60 * TIMEOUT)
    refs: List[Any] = []

    @server.route("ref")
    def ref(ctx: Any, message: bytes) -> str:
        refs.append(weakref.ref(ctx.connection))
        return "ok"

    with running(server):
        for _ in range(20):
            with connect(server.url, open_timeout=TIMEOUT) as ws:
                ws.send('{"Route":"ref"}')
                assert ws.recv(timeout=TIMEOUT) == "ok"
        assert _wait_for(lambda: server.active_connections == 0)

        def all_gone() -> bool:
            gc.collect()
            return all(r() is None for r in refs)

        assert len(refs) == 20
        assert _wait_for(all_gone)


def test_a_client_reading_a_long_reply_slowly_is_not_failed() -> None:
    """A Ping due while the connection writes a long reply waits behind it, so a client
    reading slowly all along cannot answer it within ping_timeout; it is not failed for
    that: the wait for its Pong starts over while bytes move."""
    size = 8 << 20
    ping_timeout = 0.3
    server = make_server(ping_interval=0.1, ping_timeout=ping_timeout)
    replying = threading.Event()

    @server.route("big")
    def big(ctx: Any, message: bytes) -> bytes:
        # Small socket buffers on both sides: the Ping, once written, reaches the client
        # soon (what is buffered ahead of it takes ~0.03 s to read, far below the
        # timeout), while the reply takes seconds.
        sock = socket.socket(fileno=os.dup(ctx.connection.fileno()))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        finally:
            sock.close()
        replying.set()
        return b"x" * size

    with running(server), RawClient(server.address) as raw:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.send_raw(handshake_request("x"))
        assert raw.read_response() == 101
        raw.send_text('{"Route":"big"}')
        assert replying.wait(TIMEOUT)
        received = bytearray()
        started = time.monotonic()
        while len(received) < size:
            chunk = raw.sock.recv(65536)
            assert chunk, "closed mid-reply"
            received += chunk
            threading.Event().wait(0.005)  # a slow reader: ~12 MB/s at most (seconds)
        elapsed = time.monotonic() - started
        assert elapsed > 2 * ping_timeout, elapsed  # the case this test is about
        raw.buffer = bytes(received)
        opcode, payload, _, _, _ = raw.recv_frame()
        while opcode == OP_PING:  # one may have gone out before the reply
            raw.send_frame(OP_PONG, payload)
            opcode, payload, _, _, _ = raw.recv_frame()
        assert opcode == OP_TEXT and len(payload) == size
        opcode, payload, _, _, _ = raw.recv_frame()
        assert opcode == OP_PING  # the one that waited behind the reply
        raw.send_frame(OP_PONG, payload)
        raw.send_text('{"Route":"echo","Params":2}')
        opcode, payload, _, _, _ = raw.recv_frame()
        while opcode == OP_PING:
            raw.send_frame(OP_PONG, payload)
            opcode, payload, _, _, _ = raw.recv_frame()
        assert (opcode, payload) == (OP_TEXT, b"2")
        assert server.connections[0].close_code is None


class _EndsWhilePinged:
    """Stands in for a connection (the three calls keepalive makes); ``end_on_ping``
    discards itself from inside its Ping, as a connection that ends while the keepalive
    thread is pinging it does."""

    def __init__(self, keepalive: Keepalive, end_on_ping: bool) -> None:
        self.id = "fake"
        self.keepalive = keepalive
        self.end_on_ping = end_on_ping
        self.pings = 0
        self.pinged = threading.Event()

    def ping_nowait(self) -> Tuple[Progress, int]:
        self.pings += 1
        if self.end_on_ping:
            self.keepalive.discard(self)
        self.pinged.set()
        return Progress.DONE, 0

    def progress(self, ticket: int) -> Progress:
        return Progress.DONE

    def expire_ping(self) -> bool:
        return True


def test_a_connection_that_ends_while_it_is_pinged_is_not_pinged_again() -> None:
    """It used to be put back in line with the others pinged in the same batch, and held
    (with its socket) until its next turn, one ping_interval later."""
    keepalive = Keepalive("wsroute_sync-keepalive-test", logging.getLogger("test"),
                          interval=0.05, timeout=None)
    ending = _EndsWhilePinged(keepalive, end_on_ping=True)
    staying = _EndsWhilePinged(keepalive, end_on_ping=False)
    try:
        keepalive.add(ending)
        keepalive.add(staying)
        assert ending.pinged.wait(TIMEOUT)
        # Three more rounds for the one that stays: the one that ended had its turn in
        # each of them, had it been put back.
        for _ in range(3):
            staying.pinged.clear()
            assert staying.pinged.wait(TIMEOUT)
        assert ending.pings == 1
        ref = weakref.ref(ending)
        del ending
        gc.collect()
        assert ref() is None
    finally:
        keepalive.stop()
