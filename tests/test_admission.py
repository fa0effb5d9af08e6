"""Admission: sockets wait for their TLS handshake and request head in a selector, with no
thread and no slot; bad heads are answered there, the rest handed on whole.

Two kinds of test: a real selector loop in a thread over TCP on 127.0.0.1 (the harness
below: listener + selector + PendingHandshakes, as the server's accept loop uses them),
and direct calls with a fake clock over socket pairs, for deadlines and bounds.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import ssl
import threading
import time
from typing import Any, Iterator, List, Optional, Tuple

import pytest

from conftest import TIMEOUT, ListHandler
from wsroute_sync.admission import PendingHandshakes
from wsroute_sync.limits import default_max_pending
from wsroute_sync.http import HTTPRequest, http_response

HEAD = b"GET /chat?room=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\r\n"


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Harness:
    """An accept loop in a thread: listener, wake-up pair, selector, PendingHandshakes.

    Each complete head is put on ``heads`` as ``(request, rest, is_tls, sock timeout)`` and
    answered with 200 through ``refuse()`` (the way the server answers 503 and 429).
    """

    def __init__(self, *, ssl_context: Optional[ssl.SSLContext] = None,
                 handshake_timeout: Optional[float] = TIMEOUT, max_header_size: int = 16384,
                 max_pending: Optional[int] = 100, logger: Any = None,
                 on_head_raises: bool = False) -> None:
        self.heads: "queue.Queue[Tuple[HTTPRequest, bytes, bool, Optional[float]]]" = (
            queue.Queue())
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.wake_r, self.wake_w = socket.socketpair()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.on_head_raises = on_head_raises
        self.pending = PendingHandshakes(
            self.selector, ssl_context=ssl_context, handshake_timeout=handshake_timeout,
            max_header_size=max_header_size, max_pending=max_pending,
            logger=logger if logger is not None else logging.getLogger("test.admission"),
            on_head=self.on_head,
        )
        self.stopping = False
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self.run, name="test-admission-loop")
        self.thread.start()

    def on_head(self, sock: socket.socket, remote: Any, request: HTTPRequest,
                rest: bytes) -> None:
        self.heads.put((request, rest, isinstance(sock, ssl.SSLSocket), sock.gettimeout()))
        if self.on_head_raises:
            raise RuntimeError("on_head failed")
        self.pending.refuse(sock, http_response(200, f"{request.path} {len(rest)}\n"))

    def run(self) -> None:
        try:
            while not self.stopping:
                for key, events in self.selector.select(self.pending.timeout()):
                    if key.data == "listener":
                        while True:
                            try:
                                sock, remote = self.listener.accept()
                            except BlockingIOError:
                                break
                            self.pending.add(sock, remote)
                    elif key.data == "wake":
                        self.wake_r.recv(64)
                    else:
                        assert self.pending.owns(key)
                        self.pending.handle(key, events)
                self.pending.expire()
        except BaseException as exc:  # pragma: no cover - reported by close()
            self.error = exc
        finally:
            self.pending.close()
            self.selector.close()
            self.listener.close()

    def close(self) -> None:
        self.stopping = True
        self.wake_w.send(b"x")
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()
        self.wake_r.close()
        self.wake_w.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def harness_factory() -> Iterator[Any]:
    made: List[Harness] = []

    def make(**options: Any) -> Harness:
        harness = Harness(**options)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def connect(address: Any) -> socket.socket:
    sock = socket.create_connection(address, timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset ends it too)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# Through a real selector loop.


def test_a_complete_head_is_handed_on_with_the_bytes_after_it(harness_factory: Any) -> None:
    harness = harness_factory()
    with connect(harness.address) as client:
        client.sendall(HEAD + b"\x81\x05early")
        request, rest, is_tls, timeout = harness.heads.get(timeout=TIMEOUT)
        assert (request.method, request.path, request.query) == ("GET", "/chat", "room=1")
        assert request.headers["upgrade"] == "websocket"
        assert request.remote_address == client.getsockname()
        assert rest == b"\x81\x05early"
        # Still blocking, as the connection thread reads it: admission read the head
        # with MSG_DONTWAIT instead of switching the socket to non-blocking and back.
        assert not is_tls and timeout is None
        assert read_to_eof(client).startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_head_dribbled_one_byte_at_a_time(harness_factory: Any) -> None:
    harness = harness_factory()
    with connect(harness.address) as client:
        for i in range(len(HEAD)):
            client.send(HEAD[i:i + 1])
        request, rest, _, _ = harness.heads.get(timeout=TIMEOUT)
        assert request.path == "/chat" and rest == b""
        assert read_to_eof(client).endswith(b"/chat 0\n")


@pytest.mark.parametrize("junk", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on a plain port
    b"\x00\x01\x02\x03garbage",
    b"\x80\x2e\x01\x00\x02\x00\x15",  # an SSLv2-style hello
    b"GET\x00/ HTTP/1.1\r\n",
])
def test_junk_is_refused_with_400_at_once(harness_factory: Any, junk: bytes) -> None:
    harness = harness_factory()  # handshake_timeout = TIMEOUT: an answer before it is prompt
    with connect(harness.address) as client:
        started = time.monotonic()
        client.sendall(junk)
        answer = read_to_eof(client)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert time.monotonic() - started < TIMEOUT / 2
    assert harness.heads.empty()


def test_a_malformed_head_gets_its_status(harness_factory: Any) -> None:
    harness = harness_factory()
    with connect(harness.address) as client:
        client.sendall(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")
        assert read_to_eof(client).startswith(b"HTTP/1.1 505 ")


def test_an_oversize_head_gets_431(harness_factory: Any) -> None:
    harness = harness_factory(max_header_size=1024)
    with connect(harness.address) as client:
        # No blank line ever comes: refused once the head passes the limit.
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000)
        answer = read_to_eof(client)
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert b"larger than 1024 bytes" in answer


def test_a_request_line_over_the_limit_gets_414(harness_factory: Any) -> None:
    """RFC 9112 3: a request-target longer than the server will parse gets 414, also
    before the line ends; a long head after a short request line stays 431 (above)."""
    harness = harness_factory(max_header_size=1024)
    for tail in (b"", b" HTTP/1.1\r\nHost: x\r\n\r\n"):
        with connect(harness.address) as client:
            client.sendall(b"GET /" + b"p" * 5000 + tail)
            answer = read_to_eof(client)
            assert answer.startswith(b"HTTP/1.1 414 ")
            assert b"request line longer than 1024 bytes" in answer


def test_a_head_not_finished_in_time_gets_408(harness_factory: Any) -> None:
    harness = harness_factory(handshake_timeout=0.3)
    with connect(harness.address) as client, connect(harness.address) as silent:
        started = time.monotonic()
        client.sendall(HEAD[:20])
        assert read_to_eof(client).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert read_to_eof(silent).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started >= 0.25
    assert harness.heads.empty()


def test_a_client_that_hangs_up_early_gets_nothing(harness_factory: Any) -> None:
    harness = harness_factory()
    with connect(harness.address) as client:
        client.sendall(HEAD[:10])
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b""


def test_on_head_failing_is_logged_and_the_socket_closed(harness_factory: Any) -> None:
    logger = logging.getLogger("test.admission.failing")
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        harness = harness_factory(logger=logger, on_head_raises=True)
        with connect(harness.address) as client:
            client.sendall(HEAD)
            assert read_to_eof(client) == b""
        with connect(harness.address) as client:  # the loop goes on
            client.sendall(HEAD)
            assert read_to_eof(client) == b""
        assert harness.heads.qsize() == 2
        assert sum("on_head failed" in m for m in handler.messages(logging.ERROR)) == 2
    finally:
        logger.removeHandler(handler)


def test_tls_handshake_then_head(harness_factory: Any, tls: Any) -> None:
    server_ctx, client_ctx = tls
    harness = harness_factory(ssl_context=server_ctx)
    with client_ctx.wrap_socket(connect(harness.address), server_hostname="127.0.0.1") as conn:
        conn.sendall(HEAD + b"after")
        request, rest, is_tls, timeout = harness.heads.get(timeout=TIMEOUT)
        assert request.path == "/chat" and rest == b"after"
        assert is_tls and timeout == 0.0
        assert read_to_eof(conn).startswith(b"HTTP/1.1 200 OK\r\n")


def test_tls_head_larger_than_one_read_is_not_stranded(harness_factory: Any,
                                                       tls: Any) -> None:
    # One TLS record carries up to 16 KiB; the head is read 4 KiB at a time, so most of
    # it waits inside the TLS object, where no selector sees it.
    server_ctx, client_ctx = tls
    harness = harness_factory(ssl_context=server_ctx)
    big = HEAD[:-2] + b"X-Pad: " + b"p" * 12000 + b"\r\n\r\n"
    with client_ctx.wrap_socket(connect(harness.address), server_hostname="127.0.0.1") as conn:
        conn.sendall(big)
        request, _, _, _ = harness.heads.get(timeout=TIMEOUT)
        assert len(request.headers["x-pad"]) == 12000


def test_tls_client_that_never_says_hello_is_closed(harness_factory: Any,
                                                    tls: Any) -> None:
    server_ctx, _ = tls
    harness = harness_factory(ssl_context=server_ctx, handshake_timeout=0.3)
    with connect(harness.address) as client:
        started = time.monotonic()
        assert read_to_eof(client) == b""  # closed without an answer: TLS never started
        assert time.monotonic() - started >= 0.25


def test_plain_http_on_a_tls_port_fails_the_handshake(harness_factory: Any,
                                                      tls: Any) -> None:
    server_ctx, _ = tls
    harness = harness_factory(ssl_context=server_ctx)
    with connect(harness.address) as client:
        client.sendall(HEAD)
        assert not read_to_eof(client).startswith(b"HTTP/1.1 200")
    assert harness.heads.empty()


def test_loop_closes_everything_it_holds(harness_factory: Any) -> None:
    before = _fd_count()
    harness = Harness(handshake_timeout=TIMEOUT)
    clients = [connect(harness.address) for _ in range(5)]
    try:
        clients[0].sendall(b"\x00junk")  # refused and lingering while the client reads
        deadline = time.monotonic() + TIMEOUT
        while len(harness.pending) + harness.pending.lingering < 5:
            assert time.monotonic() < deadline
            harness.thread.join(0.01)
        harness.close()
        assert read_to_eof(clients[0]).startswith(b"HTTP/1.1 400 ")
        assert [read_to_eof(c) for c in clients[1:]] == [b""] * 4  # closed, no answer
    finally:
        for client in clients:
            client.close()
    assert _fd_count() == before


# Direct calls, with a fake clock.


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def direct() -> Iterator[Any]:
    """``make(**options)`` -> (pending, clock, heads, selector); all closed afterwards."""
    made: List[Any] = []

    def make(**options: Any) -> Tuple[PendingHandshakes, FakeClock, List[Any], Any]:
        selector = selectors.DefaultSelector()
        clock = FakeClock()
        heads: List[Any] = []
        options.setdefault("handshake_timeout", 10.0)
        options.setdefault("max_header_size", 16384)
        options.setdefault("max_pending", 100)
        pending = PendingHandshakes(
            selector, ssl_context=None, logger=options.pop("logger", None),
            on_head=lambda sock, remote, request, rest: heads.append((sock, request, rest)),
            clock=clock, **options,
        )
        made.append((selector, pending, heads))
        return pending, clock, heads, selector

    yield make
    for selector, pending, heads in made:
        pending.close()
        assert not selector.get_map()
        selector.close()
        for sock, _, _ in heads:
            sock.close()


def pair() -> Tuple[socket.socket, socket.socket]:
    server, client = socket.socketpair()
    client.settimeout(TIMEOUT)
    return server, client


def test_a_head_already_there_is_handed_on_inside_add(direct: Any) -> None:
    pending, _, heads, _ = direct()
    server, client = pair()
    with client:
        client.sendall(HEAD)
        pending.add(server, "")
        assert len(heads) == 1 and heads[0][1].path == "/chat"
        assert len(pending) == 0


def test_a_head_begun_by_a_follower_thread_is_finished_here(direct: Any) -> None:
    # What a follower read (follow.py) comes with the socket; the rest is awaited in
    # the selector, without reading again first (the follower's read found no more).
    pending, _, heads, selector = direct()
    server, client = pair()
    with client:
        pending.add(server, "", HEAD[:10])
        assert len(pending) == 1 and not heads
        client.sendall(HEAD[10:] + b"\x81")
        for key, events in selector.select(TIMEOUT):
            pending.handle(key, events)
        assert len(heads) == 1 and heads[0][1].path == "/chat" and heads[0][2] == b"\x81"
        assert len(pending) == 0 and not selector.get_map()


@pytest.mark.parametrize("head, status", [
    (b"\x16\x03\x01\x02\x00", b" 400 "),  # a TLS hello, at once
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b" 400 "),  # complete and bad
    (b"GET / HTTP/1.1\r\nX: " + b"x" * 20000, b" 431 "),  # over max_header_size
], ids=["tls-hello", "bad", "oversize"])
def test_a_head_handed_over_bad_is_answered_at_once(direct: Any, head: bytes,
                                                    status: bytes) -> None:
    pending, _, heads, _ = direct()
    server, client = pair()
    with client:
        pending.add(server, "", head)
        assert not heads and len(pending) == 0 and pending.lingering == 1
        assert status in client.recv(4096).split(b"\r\n", 1)[0] + b" "


def test_deadline_then_408_then_linger(direct: Any) -> None:
    pending, clock, _, _ = direct(handshake_timeout=10.0)
    server, client = pair()
    with client:
        assert pending.timeout() is None
        pending.add(server, "")
        assert len(pending) == 1
        assert pending.timeout() == pytest.approx(10.0)
        clock.now += 9.9
        pending.expire()
        assert len(pending) == 1
        clock.now += 0.1
        assert pending.timeout() == 0.0
        pending.expire()
        assert len(pending) == 0 and pending.lingering == 1
        assert client.recv(4096).startswith(b"HTTP/1.1 408 ")
        assert client.recv(4096) == b""  # half-closed after the answer
        assert pending.timeout() is not None and pending.timeout() > 0  # lingering
        clock.now += 60
        pending.expire()
        assert pending.lingering == 0 and pending.timeout() is None


def test_no_handshake_timeout_means_no_deadline(direct: Any) -> None:
    pending, clock, _, _ = direct(handshake_timeout=None)
    server, client = pair()
    with client:
        pending.add(server, "")
        assert pending.timeout() is None
        clock.now += 1e6
        pending.expire()
        assert len(pending) == 1


def test_the_oldest_pending_socket_is_dropped_first(direct: Any) -> None:
    logger = logging.getLogger("test.admission.drop")
    handler = ListHandler()
    logger.addHandler(handler)
    pending, clock, heads, selector = direct(max_pending=2, logger=logger)
    socks = [pair() for _ in range(4)]
    try:
        for i, (server, _) in enumerate(socks[:3]):
            pending.add(server, f"client-{i}")
            clock.now += 1
        assert len(pending) == 2
        assert socks[0][1].recv(1) == b""  # the oldest: closed, no answer
        assert pending.dropped == 1
        assert any("dropp" in m for m in handler.messages(logging.WARNING))
        # The two newest are still served.
        for _, client in socks[1:3]:
            client.sendall(HEAD)
        for key, events in selector.select(0):
            pending.handle(key, events)
        assert len(heads) == 2 and len(pending) == 0
        # A head that arrives with the socket needs no room: nothing is dropped.
        socks[3][1].sendall(HEAD)
        pending.add(socks[3][0], "client-3")
        assert pending.dropped == 1 and len(heads) == 3
    finally:
        logger.removeHandler(handler)
        for _, client in socks:
            client.close()


def test_refuse_from_the_receiver_answers_and_lingers(direct: Any) -> None:
    pending, _, _, selector = direct()
    server, client = pair()
    with client:
        client.sendall(b"more request bytes")
        pending.refuse(server, http_response(503, "full\n", headers=[("Retry-After", "1")]))
        assert pending.lingering == 1
        answer = client.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in answer
        client.close()
        deadline = time.monotonic() + TIMEOUT
        while pending.lingering:  # what the client sent is drained, then its hang-up
            assert time.monotonic() < deadline
            for key, events in selector.select(TIMEOUT):
                pending.handle(key, events)


def test_close_leaves_no_file_descriptors() -> None:
    before = _fd_count()
    selector = selectors.DefaultSelector()
    pending = PendingHandshakes(selector, ssl_context=None, handshake_timeout=10.0,
                                max_header_size=16384, max_pending=100, logger=None,
                                on_head=lambda *args: None)
    clients = []
    for i in range(10):
        server, client = pair()
        clients.append(client)
        if i % 3 == 0:
            client.sendall(b"\x00junk")  # refused at once, then lingering
        pending.add(server, "")
    assert len(pending) == 6 and pending.lingering == 4
    pending.close()
    assert len(pending) == 0 and pending.lingering == 0 and not selector.get_map()
    late, late_client = pair()
    pending.add(late, "")  # after close(): closed at once
    assert late.fileno() == -1
    late_client.close()
    selector.close()
    for i, client in enumerate(clients):
        answer = read_to_eof(client)
        assert answer.startswith(b"HTTP/1.1 400 ") if i % 3 == 0 else answer == b""
        client.close()
    assert _fd_count() == before


def test_refusal_warnings_are_throttled(direct: Any) -> None:
    # A flood of junk must not flood the logs: one WARNING a second per kind, the rest
    # at DEBUG, and the next WARNING says how many there were.
    logger = logging.getLogger("test.admission.throttle")
    logger.setLevel(logging.DEBUG)
    handler = ListHandler()
    logger.addHandler(handler)
    pending, clock, _, _ = direct(logger=logger)
    clients = []
    try:
        for i in range(4):
            if i == 3:
                clock.now += 1.5
            server, client = pair()
            clients.append(client)
            client.sendall(b"\x00junk")
            pending.add(server, f"junk-{i}")
        warnings = handler.messages(logging.WARNING)
        assert len(warnings) == 2 and pending.refused == 4
        assert "bad request from junk-0, answered 400" in warnings[0]
        assert "junk-3" in warnings[1] and "2 more like it" in warnings[1]
        debug = [r.getMessage() for r in handler.records if r.levelno == logging.DEBUG]
        assert sum("bad request from junk-" in m for m in debug) == 2
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        for client in clients:
            client.close()


def test_default_max_pending_follows_the_fd_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    resource = pytest.importorskip("resource")
    for soft, expected in [(1024, 64), (4096, 4096 - 1000 - 512 - 256),
                           (1 << 20, 16384), (resource.RLIM_INFINITY, 16384)]:
        monkeypatch.setattr(resource, "getrlimit", lambda which, soft=soft: (soft, soft))
        assert default_max_pending(1000) == expected
    with pytest.raises(TypeError):
        default_max_pending("1000")  # type: ignore[arg-type]


def test_options_are_checked() -> None:
    selector = selectors.DefaultSelector()
    try:
        good: Any = dict(ssl_context=None, handshake_timeout=1.0, max_header_size=1024,
                         max_pending=10, logger=None, on_head=lambda *args: None)
        for name, value, error in [("max_pending", 0, ValueError),
                                   ("max_pending", 1.5, TypeError),
                                   ("handshake_timeout", 0, ValueError),
                                   ("handshake_timeout", "1", TypeError),
                                   ("max_header_size", True, TypeError),
                                   ("on_head", None, TypeError),
                                   ("ssl_context", object(), TypeError)]:
            with pytest.raises(error):
                PendingHandshakes(selector, **{**good, name: value})
        assert len(PendingHandshakes(selector, **{**good, "max_pending": None})) == 0
    finally:
        selector.close()
