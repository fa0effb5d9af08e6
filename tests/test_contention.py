"""Push, broadcast and close from several threads at once, on ws:// and wss://.

Every path that touches a connection from another thread is exercised while the
connection's own thread is writing, with clients that read slowly or not at all, and
python-websockets as the client wherever frames matter: it parses and validates every
frame, so a broadcast frame landing inside a reply fails the test. A thread that dies
(``threading.excepthook``) or an ERROR record of the library fails the test too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from typing import Any, Iterator, List, Optional, Tuple

import pytest
from websockets.exceptions import ConnectionClosed as WSConnectionClosed
from websockets.sync.client import ClientConnection, connect

from conftest import TIMEOUT, ListHandler, _wait_for, make_server, running
from rawclient import OP_CLOSE, OP_TEXT, RawClient, encode_frame, handshake_request
from wsroute_sync import Server

BIG = 16 << 20  # larger than both sockets' buffers together: the writer must wait


@pytest.fixture(params=["ws", "wss"])
def scheme(request: Any) -> str:
    return str(request.param)


class Watch:
    """Fails the test if a thread dies or the library logs an ERROR meanwhile."""

    def __init__(self) -> None:
        self.deaths: List[str] = []
        self.log = ListHandler()

    @contextlib.contextmanager
    def active(self) -> Iterator["Watch"]:
        previous = threading.excepthook

        def hook(args: Any) -> None:
            thread = args.thread.name if args.thread is not None else "?"
            self.deaths.append(f"{thread}: {args.exc_type.__name__}: {args.exc_value}")

        threading.excepthook = hook
        logger = logging.getLogger("wsroute_sync")
        logger.addHandler(self.log)
        try:
            yield self
        finally:
            threading.excepthook = previous
            logger.removeHandler(self.log)
        assert not self.deaths, f"threads died: {self.deaths}"
        errors = self.log.messages(logging.ERROR)
        assert not errors, f"ERROR logs: {errors}"


@pytest.fixture
def watch() -> Iterator[Watch]:
    with Watch().active() as w:
        yield w


@contextlib.contextmanager
def serving(server: Server, scheme: str, tls: Tuple[ssl.SSLContext, ssl.SSLContext]
            ) -> Iterator[Server]:
    server.start("127.0.0.1:0", ssl_context=tls[0] if scheme == "wss" else None)
    try:
        yield server
    finally:
        server.close(timeout=TIMEOUT)


def client(server: Server, scheme: str, tls: Tuple[ssl.SSLContext, ssl.SSLContext], *,
           stalled: bool = False, logger: Optional[logging.Logger] = None
           ) -> ClientConnection:
    """A python-websockets client; ``stalled``: one that stops reading its socket as soon
    as one frame waits unread (flow control at zero, a small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if stalled:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(server.address)
    sock.settimeout(None)
    kwargs: Any = {"max_size": None, "open_timeout": TIMEOUT, "close_timeout": TIMEOUT,
                   "logger": logger}
    if stalled:
        kwargs["max_queue"] = 0
    if scheme == "wss":
        kwargs.update(ssl=tls[1], server_hostname="127.0.0.1")
    # Entered, not called bare: websockets 17 deprecates connect() outside a ``with``.
    # The caller closes it.
    ws: ClientConnection = connect(server.url, sock=sock, **kwargs).__enter__()
    return ws


def request(route: str, params: Any = None) -> str:
    return json.dumps({"Route": route, "Params": params})


def big_server(**options: Any) -> Tuple[Server, threading.Event]:
    server = make_server(**options)
    replying = threading.Event()
    payload = b"x" * BIG

    @server.route("big")
    def big(ctx: Any, message: bytes) -> bytes:
        replying.set()
        return payload

    return server, replying


# 1 and 2: a broadcast while the connection's thread writes a large reply to a client
# that stopped reading; then the client reads: every frame whole, each message once.

def test_broadcast_during_a_large_reply(scheme: str, tls: Any, watch: Watch) -> None:
    server, replying = big_server()
    with serving(server, scheme, tls):
        ws = client(server, scheme, tls, stalled=True)
        try:
            ws.send(request("echo", "first"))
            ws.send(request("big"))
            assert replying.wait(TIMEOUT)
            counts: List[int] = []
            threads = [
                threading.Thread(target=lambda i=i: counts.append(
                    server.broadcast(f"b{i}", timeout=4 * TIMEOUT)))
                for i in range(2)
            ]
            for t in threads:
                t.start()
            received = [ws.recv(timeout=TIMEOUT) for _ in range(4)]
            for t in threads:
                t.join(TIMEOUT)
            assert received[0] == '"first"'
            assert sorted(len(m) for m in received[1:]) == [2, 2, BIG]
            assert any(m == "x" * BIG for m in received)
            assert sorted(m for m in received[1:] if len(m) == 2) == ["b0", "b1"]
            assert counts == [1, 1]
        finally:
            ws.close()


def test_broadcast_reaches_every_client(scheme: str, tls: Any, watch: Watch) -> None:
    server = make_server()
    with serving(server, scheme, tls):
        clients = [client(server, scheme, tls) for _ in range(8)]
        try:
            assert _wait_for(lambda: server.active_connections == 8)
            for n in range(20):
                assert server.broadcast({"n": n}) == 8
            for ws in clients:
                assert [json.loads(ws.recv(timeout=TIMEOUT))["n"] for _ in range(20)] == list(
                    range(20))
                ws.send(request("echo", 1))
                assert ws.recv(timeout=TIMEOUT) == "1"
        finally:
            for ws in clients:
                ws.close()


def test_broadcasts_the_socket_takes_in_part_arrive_whole_and_in_order(
        scheme: str, tls: Any, watch: Watch) -> None:
    # A broadcast writes straight to a socket that nothing is queued for; one the socket
    # takes only in part must be finished before the frames queued behind it meanwhile.
    server = make_server()
    size = 4 << 20  # larger than the socket buffers: every send is partial
    with serving(server, scheme, tls):
        ws = client(server, scheme, tls)
        try:
            assert _wait_for(lambda: server.active_connections == 1)
            counts: List[int] = []

            def broadcaster(k: int) -> None:
                for i in range(3):
                    counts.append(server.broadcast(f"{k}:{i}:" + "x" * size, timeout=TIMEOUT))

            threads = [threading.Thread(target=broadcaster, args=(k,)) for k in range(2)]
            for thread in threads:
                thread.start()
            got: List[Tuple[int, int]] = []
            for _ in range(6):
                message = ws.recv(timeout=TIMEOUT)
                assert isinstance(message, str)
                k, i, body = message.split(":", 2)
                assert body == "x" * size
                got.append((int(k), int(i)))
            for thread in threads:
                thread.join(TIMEOUT)
            assert counts == [1] * 6
            for k in range(2):
                assert [i for kk, i in got if kk == k] == [0, 1, 2]
            ws.send(request("echo", 1))
            assert ws.recv(timeout=TIMEOUT) == "1"
        finally:
            ws.close()


# 3: no data frame after our Close, whoever closes and however broadcasts race it.

def frames_until_eof(raw: RawClient) -> List[int]:
    opcodes = []
    while True:
        try:
            opcode, _, _, _, _ = raw.recv_frame()
        except (ConnectionError, EOFError, socket.timeout, OSError):
            return opcodes
        opcodes.append(opcode)
        if opcode == OP_CLOSE:
            # Answer, as a client does, and read what still comes until the end.
            raw.send_frame(OP_CLOSE, b"\x03\xe8")


@pytest.mark.parametrize("closer", ["connection", "server"])
def test_no_data_after_close(closer: str, watch: Watch) -> None:
    for _ in range(10):
        server = make_server()
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                server.broadcast("tick", timeout=TIMEOUT)

        with running(server):
            raw = RawClient.connect(server.address)
            try:
                assert _wait_for(lambda: server.active_connections == 1)
                threads = [threading.Thread(target=hammer) for _ in range(3)]
                for t in threads:
                    t.start()
                if closer == "connection":
                    server.connections[0].close(1000, "bye")
                else:
                    server.close(timeout=TIMEOUT)
                opcodes = frames_until_eof(raw)
                stop.set()
                for t in threads:
                    t.join(TIMEOUT)
            finally:
                stop.set()
                raw.close()
        assert OP_CLOSE in opcodes
        assert opcodes.count(OP_CLOSE) == 1, opcodes
        assert all(op == OP_TEXT for op in opcodes[:opcodes.index(OP_CLOSE)])
        assert opcodes[-1] == OP_CLOSE, f"data after our Close: {opcodes}"


# 4: ctx.closed is set as soon as server.close() starts closing the connection.

def test_ctx_closed_fires_during_server_close(scheme: str, tls: Any, watch: Watch) -> None:
    server = make_server()
    waiting = threading.Event()
    seen: List[bool] = []

    @server.route("wait")
    def wait(ctx: Any, message: bytes) -> None:
        waiting.set()
        seen.append(ctx.closed.wait(6 * TIMEOUT))

    server.start("127.0.0.1:0", ssl_context=tls[0] if scheme == "wss" else None)
    ws = client(server, scheme, tls)
    try:
        ws.send(request("wait"))
        assert waiting.wait(TIMEOUT)
        server.close(timeout=2 * TIMEOUT)
        assert seen == [True]
        with pytest.raises(WSConnectionClosed) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    finally:
        ws.close()
        server.close()


# 5: close(timeout) bounds the whole shutdown, however many clients stopped reading.

def test_close_timeout_bounds_shutdown_with_stalled_clients(scheme: str, tls: Any,
                                                            watch: Watch) -> None:
    server, replying = big_server()
    entered = threading.Semaphore(0)

    @server.route("big2")
    def big2(ctx: Any, message: bytes) -> bytes:
        entered.release()
        return b"y" * (4 << 20)

    server.start("127.0.0.1:0", ssl_context=tls[0] if scheme == "wss" else None)
    clients = []
    try:
        for _ in range(30):
            ws = client(server, scheme, tls, stalled=True)
            clients.append(ws)
            ws.send(request("echo", 0))
            ws.send(request("big2"))
        for _ in range(30):
            assert entered.acquire(timeout=TIMEOUT)
        started = time.monotonic()
        server.close(timeout=1.0)
        elapsed = time.monotonic() - started
        # The documented margin (0.5 s for aborted connections' threads), and scheduling.
        assert elapsed < 1.0 + 0.5 + 0.5, f"close(timeout=1) took {elapsed:.2f}s"
        assert _wait_for(lambda: server.active_connections == 0)
    finally:
        for ws in clients:
            ws.close_socket()
        for ws in clients:
            ws.close()
        server.close()


# 7: once a connection is closing, no further request of it is dispatched.

def test_no_dispatch_after_close() -> None:
    server = make_server()
    calls: List[str] = []

    @server.route("closer")
    def closer(ctx: Any, message: bytes) -> None:
        ctx.connection.close(1000, "done")

    @server.route("count")
    def count(ctx: Any, message: bytes) -> str:
        calls.append("count")
        return "counted"

    with running(server):
        with RawClient.connect(server.address) as raw:
            raw.send_raw(b"".join(
                encode_frame(OP_TEXT, request(route).encode())
                for route in ("closer", "count", "count")
            ))
            opcodes = frames_until_eof(raw)
    assert calls == []
    assert opcodes == [OP_CLOSE]


# 8: a check_origin hook that raises gets a 500, logged with its traceback.

def test_check_origin_hook_that_raises_gets_500() -> None:
    def broken(request: Any) -> bool:
        raise RuntimeError("hook bug")

    server = make_server(check_origin=broken)
    log = ListHandler()
    logging.getLogger("wsroute_sync").addHandler(log)
    try:
        with running(server):
            sock = socket.create_connection(server.address, timeout=TIMEOUT)
            try:
                sock.sendall(handshake_request("127.0.0.1", extra=[("Origin", "http://x")]))
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            finally:
                sock.close()
    finally:
        logging.getLogger("wsroute_sync").removeHandler(log)
    assert answer.startswith(b"HTTP/1.1 500 ")
    errors = [r for r in log.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None
    assert "check_origin" in errors[0].getMessage()


# Suspected by reading, each settled by a test.

def test_close_racing_the_clients_close_sends_one_close(watch: Watch) -> None:
    """Our close() from another thread and the client's Close at the same moment: one
    Close frame from us, never two."""
    server = make_server()
    with running(server):
        for _ in range(30):
            with RawClient.connect(server.address) as raw:
                assert _wait_for(lambda: server.active_connections == 1)
                connection = server.connections[0]
                go = threading.Barrier(2)

                def close_here() -> None:
                    go.wait()
                    connection.close(1000)

                t = threading.Thread(target=close_here)
                t.start()
                go.wait()
                raw.send_frame(OP_CLOSE, b"\x03\xe8")
                opcodes = frames_until_eof(raw)
                t.join(TIMEOUT)
            assert opcodes.count(OP_CLOSE) == 1, opcodes
            assert _wait_for(lambda: server.active_connections == 0)


def test_pong_during_the_closing_handshake_keeps_close_timeout() -> None:
    """A Pong that arrives after our Close does not put the keepalive interval back in
    place of close_timeout: the client's late Close answer still completes the close."""
    server = make_server(ping_interval=0.2, ping_timeout=30, close_timeout=3 * TIMEOUT)
    with running(server):
        with RawClient.connect(server.address) as raw:
            opcode, _, _, _, _ = raw.recv_frame()
            assert opcode == 9  # the keepalive Ping, left unanswered for now
            connection = server.connections[0]
            threading.Thread(target=connection.close, args=(1000, "bye")).start()
            opcode, _, _, _, _ = raw.recv_frame()
            assert opcode == OP_CLOSE
            raw.send_frame(10, b"")  # the Pong, late
            # Well past ping_interval, and well within close_timeout: answer the Close.
            threading.Event().wait(1.0)
            raw.send_frame(OP_CLOSE, b"\x03\xe8")
            assert raw.at_eof()
        assert _wait_for(lambda: server.active_connections == 0)
    assert connection.close_code == 1000


def test_tls_writes_are_bounded_by_write_timeout(tls: Any, watch: Watch) -> None:
    """Over TLS, a client that stops reading is dropped after write_timeout, though the
    connection's reads wait without a timeout (and keepalive is far off)."""
    server, replying = big_server(ping_interval=60 * TIMEOUT, write_timeout=0.5)
    with serving(server, "wss", tls):
        ws = client(server, "wss", tls, stalled=True)
        try:
            ws.send(request("echo", 0))
            ws.send(request("big"))
            assert replying.wait(TIMEOUT)
            assert _wait_for(lambda: server.active_connections == 0, 2 * TIMEOUT)
        finally:
            ws.close_socket()
            ws.close()


def test_messages_out_counts_every_broadcast_exactly(scheme: str, tls: Any,
                                                     watch: Watch) -> None:
    """Broadcast threads and the connection's own thread count into the same counters."""
    server = make_server()
    with serving(server, scheme, tls):
        clients = [client(server, scheme, tls) for _ in range(4)]
        try:
            assert _wait_for(lambda: server.active_connections == 4)
            per_thread = 200

            def blast() -> None:
                for _ in range(per_thread):
                    server.broadcast("m")

            threads = [threading.Thread(target=blast) for _ in range(4)]
            for t in threads:
                t.start()
            for ws in clients:
                for _ in range(4 * per_thread):
                    assert ws.recv(timeout=TIMEOUT) == "m"
            for t in threads:
                t.join(TIMEOUT)
            assert server.stats()["messages_out"] == 4 * 4 * per_thread
        finally:
            for ws in clients:
                ws.close()


def test_send_from_many_threads_while_replying(scheme: str, tls: Any, watch: Watch) -> None:
    """ctx.send from other threads while the connection's thread replies: every message
    arrives whole, once."""
    server = make_server()
    pushers: List[threading.Thread] = []

    @server.route("spawn")
    def spawn(ctx: Any, message: bytes) -> str:
        def push(i: int) -> None:
            for n in range(50):
                ctx.send({"t": i, "n": n, "pad": "p" * (n * 997 % 70000)})

        for i in range(3):
            t = threading.Thread(target=push, args=(i,))
            pushers.append(t)
            t.start()
        return "spawned"

    with serving(server, scheme, tls):
        ws = client(server, scheme, tls)
        try:
            ws.send(request("spawn"))
            for k in range(100):
                ws.send(request("echo", k))
            got: List[Any] = []
            while len(got) < 1 + 100 + 150:
                got.append(ws.recv(timeout=TIMEOUT))
            for t in pushers:
                t.join(TIMEOUT)
            assert "spawned" in got
            assert [m for m in got if m.isdigit()] == [str(k) for k in range(100)]
            pushed = [json.loads(m) for m in got if m.startswith("{")]
            for i in range(3):
                assert [p["n"] for p in pushed if p["t"] == i] == list(range(50))
        finally:
            ws.close()


def test_broadcasts_to_a_stopped_reader_keep_their_timeout(scheme: str, tls: Any,
                                                           watch: Watch) -> None:
    """Two threads broadcast to a client that stopped reading and to one that reads:
    every call returns within its timeout (a queued frame the socket does not take is
    not retried in a loop), the stopped one is dropped, the other gets every message."""
    server = make_server()
    big = "z" * 200_000
    with serving(server, scheme, tls):
        stopped = client(server, scheme, tls, stalled=True)
        reader = client(server, scheme, tls)
        try:
            assert _wait_for(lambda: len(server.connections) == 2)
            slowest: List[float] = []
            got: List[Any] = []
            receiving = threading.Thread(
                target=lambda: got.extend(reader.recv(timeout=4 * TIMEOUT) for _ in range(60)))
            receiving.start()

            def broadcaster() -> None:
                for _ in range(30):
                    started = time.monotonic()
                    server.broadcast(big, timeout=0.3)
                    slowest.append(time.monotonic() - started)

            threads = [threading.Thread(target=broadcaster) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads + [receiving]:
                t.join(8 * TIMEOUT)
                assert not t.is_alive()
            assert max(slowest) < 0.3 + 1.0, f"a broadcast took {max(slowest):.2f}s"
            assert got == [big] * 60
            assert _wait_for(lambda: len(server.connections) == 1)
        finally:
            stopped.close_socket()
            stopped.close()
            reader.close()


# Keepalive: the server's keepalive thread writes Pings to connections other threads
# are writing to.

def count_calls(connection: Any, name: str, calls: int) -> threading.Event:
    """An event set once ``connection.<name>()`` has been called ``calls`` times (the
    method is wrapped on this one instance)."""
    done = threading.Event()
    original = getattr(connection, name)
    count = [0]

    def counted() -> Any:
        result = original()
        count[0] += 1
        if count[0] >= calls:
            done.set()
        return result

    setattr(connection, name, counted)
    return done


class FrameLog(logging.Handler):
    """Counts the frames python-websockets logs as received (its DEBUG "< PING" lines)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.pings = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("< PING"):
            self.pings += 1


def test_keepalive_pings_during_a_large_reply(scheme: str, tls: Any, watch: Watch) -> None:
    """Pings due while the connection's thread writes a large reply to a client that has
    stopped reading wait for it; every frame arrives whole and the Pongs keep the
    connection open."""
    server, replying = big_server(ping_interval=0.05, ping_timeout=30 * TIMEOUT)
    frames = FrameLog()
    client_logger = logging.getLogger("tests.keepalive.client")
    client_logger.setLevel(logging.DEBUG)
    client_logger.propagate = False
    client_logger.addHandler(frames)
    with serving(server, scheme, tls):
        ws = client(server, scheme, tls, stalled=True, logger=client_logger)
        try:
            assert _wait_for(lambda: len(server.connections) == 1)
            connection = server.connections[0]
            tried = count_calls(connection, "ping_nowait", 3)
            ws.send(request("echo", "first"))
            ws.send(request("big"))
            assert replying.wait(TIMEOUT)
            assert tried.wait(TIMEOUT)  # three turns while the reply is stuck
            assert ws.recv(timeout=TIMEOUT) == '"first"'
            assert ws.recv(timeout=TIMEOUT) == "x" * BIG
            again = count_calls(connection, "ping_nowait", 3)
            assert again.wait(TIMEOUT)  # answered: it is pinged again, and stays open
            ws.send(request("echo", "after"))
            assert ws.recv(timeout=TIMEOUT) == '"after"'
            assert frames.pings >= 1
            assert connection.open
        finally:
            ws.close()
            client_logger.removeHandler(frames)


def test_keepalive_fails_a_client_that_stopped_reading(scheme: str, tls: Any,
                                                       watch: Watch) -> None:
    """A client that stops reading mid-reply cannot answer Pings: the keepalive thread
    closes it with 1011 after ping_timeout, well before write_timeout would, and wakes
    the connection's thread from its write."""
    server, replying = big_server(ping_interval=0.1, ping_timeout=0.3,
                                  write_timeout=60 * TIMEOUT)
    with serving(server, scheme, tls):
        ws = client(server, scheme, tls, stalled=True)
        try:
            ws.send(request("echo", 0))
            ws.send(request("big"))
            assert replying.wait(TIMEOUT)
            connection = server.connections[0]
            assert connection.wait_finished(TIMEOUT)
            assert connection.close_code == 1011
            assert connection.close_reason == "keepalive ping timeout"
            assert _wait_for(lambda: server.active_connections == 0)
        finally:
            ws.close_socket()
            ws.close()


# The contention stress test: random interleavings of everything above.

STRESS_SECONDS = float(__import__("os").environ.get("WSROUTE_STRESS_SECONDS", "25"))


class StressClient:
    """One client of the stress test: sends requests, checks every message it reads."""

    def __init__(self, n: int, kind: str, ws: ClientConnection) -> None:
        self.n, self.kind, self.ws = n, kind, ws
        self.outstanding: dict[str, int] = {}  # request id -> expected payload size
        self.replies: dict[str, int] = {}
        self.pushes: dict[str, int] = {}  # request id -> next push number
        self.last: dict[int, int] = {}  # source -> last sequence number seen
        self.closed_early = False
        self.problems: List[str] = []

    def check(self, raw: Any) -> None:
        message = json.loads(raw)
        if "r" in message:
            rid = message["r"]
            if rid not in self.outstanding:
                self.problems.append(f"reply {rid} not expected (twice?)")
                return
            size = self.outstanding.pop(rid)
            if len(message.get("pad", "")) != size:
                self.problems.append(f"reply {rid} damaged: {len(message['pad'])} != {size}")
        elif "p" in message:
            rid, n = message["p"], message["n"]
            if self.pushes.get(rid, 0) != n:
                self.problems.append(f"push {rid}#{n} after #{self.pushes.get(rid)}")
            self.pushes[rid] = n + 1
        elif "seq" in message:
            src, seq = message["src"], message["seq"]
            if seq <= self.last.get(src, -1):
                self.problems.append(f"source {src}: {seq} after {self.last[src]}")
            self.last[src] = seq
        else:
            self.problems.append(f"unexpected message {raw[:80]!r}")

    def drain(self) -> None:
        try:
            while True:
                self.check(self.ws.recv(timeout=0.1))
        except (TimeoutError, WSConnectionClosed):
            pass

    def run(self, stop: threading.Event, rng: Any) -> None:
        ws = self.ws
        try:
            if rng.random() < 0.5:
                self.outstanding[f"{self.n}-join"] = 0
                ws.send(request("join", f"{self.n}-join"))
            k = 0
            while not stop.is_set():
                k += 1
                rid = f"{self.n}-{k}"
                op = rng.choice(["echo", "echo", "big", "push"])
                size = rng.choice([0, 10, 1000, 70000, 400000]) if op == "big" else 0
                self.outstanding[rid] = size
                ws.send(request(op, {"r": rid, "size": size, "count": rng.randint(1, 5)}))
                if self.kind == "stopped" and k > 3:
                    stop.wait()  # stops reading: the server must drop it, not stall
                    return
                if self.kind == "closer" and rng.random() < 0.05:
                    ws.close()
                    return
                while self.outstanding and (len(self.outstanding) > 2 or rng.random() < 0.5):
                    self.check(ws.recv(timeout=4 * TIMEOUT))
                    if self.kind == "slow":
                        stop.wait(rng.random() * 0.01)
            while self.outstanding:  # the end: every reply still owed must come
                self.check(ws.recv(timeout=4 * TIMEOUT))
        except WSConnectionClosed:
            self.closed_early = True


@pytest.mark.timeout(STRESS_SECONDS * 4 + 120)
def test_contention_stress(scheme: str, tls: Any, watch: Watch) -> None:
    import random

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # Keepalive Pings every 50 ms interleave with everything else; 5 s to answer, as a
    # busy client on a loaded machine may need (one that stopped reading is dropped).
    server = make_server(write_timeout=2.0, close_timeout=2.0, ping_interval=0.05,
                         ping_timeout=5.0)
    helpers: List[threading.Thread] = []
    helpers_lock = threading.Lock()

    @server.route("echo")
    def echo(ctx: Any, message: bytes) -> Any:
        return {"r": ctx.params["r"], "pad": ""}

    @server.route("big")
    def big(ctx: Any, message: bytes) -> Any:
        return {"r": ctx.params["r"], "pad": "z" * ctx.params["size"]}

    @server.route("join")
    def join(ctx: Any, message: bytes) -> Any:
        ctx.join("room")
        return {"r": ctx.params, "pad": ""}

    @server.route("push")
    def push(ctx: Any, message: bytes) -> Any:
        rid, count = ctx.params["r"], ctx.params["count"]

        def pusher() -> None:
            from wsroute_sync import ConnectionClosed
            try:
                for n in range(count):
                    ctx.send({"p": rid, "n": n})
            except ConnectionClosed:
                pass

        t = threading.Thread(target=pusher)
        with helpers_lock:
            helpers.append(t)
        t.start()
        return {"r": rid, "pad": ""}

    stop = threading.Event()
    kinds = ["normal"] * 5 + ["slow"] * 3 + ["stopped"] * 2 + ["closer"] * 2
    with serving(server, scheme, tls):
        clients = [StressClient(i, kind, client(server, scheme, tls,
                                                  stalled=kind == "stopped"))
                   for i, kind in enumerate(kinds)]

        def broadcaster(src: int, room: Optional[str]) -> None:
            seq = 0
            while not stop.is_set():
                server.broadcast({"seq": seq, "src": src}, room=room, timeout=1.0)
                seq += 1

        def sender() -> None:
            seq = 0
            while not stop.is_set():
                connections = server.connections
                if connections:
                    server.send_to(rng.choice(connections).id, {"seq": seq, "src": 99})
                    seq += 1
                stop.wait(0.001)

        def closer() -> None:
            while not stop.wait(STRESS_SECONDS / 4):
                connections = [c for c in server.connections]
                if connections:
                    rng.choice(connections).close(1000, "random close")

        workers = [threading.Thread(target=c.run, args=(stop, random.Random(seed + c.n)))
                   for c in clients]
        workers += [threading.Thread(target=broadcaster, args=(0, None)),
                    threading.Thread(target=broadcaster, args=(1, None)),
                    threading.Thread(target=broadcaster, args=(2, "room")),
                    threading.Thread(target=sender), threading.Thread(target=closer)]
        for t in workers:
            t.start()
        stop.wait(STRESS_SECONDS)
        stop.set()
        for t in workers:
            t.join(8 * TIMEOUT)
            assert not t.is_alive(), f"{t.name} still running (seed {seed})"
        with helpers_lock:
            for t in helpers:
                t.join(TIMEOUT)
        for c in clients:
            if c.kind == "stopped":
                c.ws.close_socket()  # it never reads again: no closing handshake to wait for
            else:
                c.drain()  # what is still queued, so that our Close's answer can be read
            c.ws.close()
    problems = [f"client {c.n} ({c.kind}): {p}" for c in clients for p in c.problems]
    assert not problems, f"seed {seed}: {problems[:10]}"
    for c in clients:
        if c.kind in ("normal", "slow") and not c.closed_early:
            assert not c.outstanding, f"seed {seed}: client {c.n} owed {c.outstanding}"
