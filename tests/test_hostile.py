"""Hostile input over real sockets: every case gets its specific answer, and nobody else
notices.

Each test runs in an :func:`arena`: a server on 127.0.0.1 port 0 and a well-behaved
*bystander* (a ``websockets`` client) connected before the hostile client arrives. When
the hostile client is done, the arena checks that the bystander still gets correct
replies and that the hostile client's slot was given back (``active_connections`` is
the bystander's alone again); the autouse ``no_leaks`` fixture then checks that threads
and file descriptors are back to their baseline. Timeouts are small (0.2-1 s) so that
the whole file runs in seconds; waits are socket reads with timeouts, events and joins.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import ssl
import struct
import threading
import time
import zlib
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
from websockets.exceptions import ConnectionClosed as WSClosed
from websockets.sync.client import ClientConnection, connect

from conftest import TIMEOUT, ListHandler, _wait_for, allocation_peak, make_server, running
from rawclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawClient,
    encode_frame,
    handshake_request,
)
from wsroute_sync import HandlerError, Server, ServerConnection

#: The small timeouts the arena's server runs with.
HANDSHAKE_TIMEOUT = 0.5
CLOSE_TIMEOUT = 0.5
WRITE_TIMEOUT = 0.5
#: RFC 6455 7.1.1: after the closing handshake (or failing the connection) the server
#: closes TCP first, promptly; "promptly" is taken as within a second.
PROMPT = 1.0

INTERNAL_ERROR = b'{"code":1,"msg":"internal error","data":null}'
_names = itertools.count()


def envelope(msg: str) -> bytes:
    return json.dumps({"code": 1, "msg": msg, "data": None}, separators=(",", ":")).encode()


# The arena.


class Arena:
    """A running server, its bystander, the server's log, and the hostile routes' state."""

    def __init__(self, server: Server, log: ListHandler) -> None:
        self.server = server
        self.log = log
        self.bystander: Optional[ClientConnection] = None
        self.started = threading.Event()  # a blocking handler has started
        self.release = threading.Event()  # ... and may finish
        self.handler_done = threading.Event()  # ... and has finished
        self.handler_outcome: List[str] = []
        self._bystander_n = 0

    @property
    def address(self) -> Tuple[str, int]:
        return self.server.address  # type: ignore[no-any-return]

    @property
    def host(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def url(self, path: str = "/") -> str:
        return f"ws://{self.host}{path}"

    def raw(self) -> RawClient:
        """A TCP connection, no handshake yet."""
        return RawClient(self.address)

    def upgraded(self, **kwargs: Any) -> RawClient:
        """A raw client past the opening handshake."""
        return RawClient.connect(self.address, **kwargs)

    def bystander_ok(self) -> None:
        """The bystander's round trips are still correct."""
        assert self.bystander is not None
        for _ in range(3):
            self._bystander_n += 1
            params = {"n": self._bystander_n, "text": "bystander é ✓"}
            self.bystander.send(json.dumps({"Route": "echo", "Params": params}))
            assert json.loads(self.bystander.recv(timeout=TIMEOUT)) == params

    def wait_freed(self, expected: int = 1) -> None:
        """Every slot but the bystander's is back."""
        assert _wait_for(lambda: self.server.active_connections == expected), (
            f"slot not freed: {self.server.stats()}"
        )

    def connection_of(self, client: RawClient) -> ServerConnection:
        port = client.sock.getsockname()[1]
        (conn,) = [c for c in self.server.connections if c.remote_address[1] == port]
        return conn

    def messages(self, level: int) -> List[str]:
        return self.log.messages(level)


def _hostile_routes(server: Server, arena: Arena) -> None:
    @server.route("fail")
    def fail(ctx: Any, message: bytes) -> None:
        raise RuntimeError("secret internal detail")

    @server.route("refuse")
    def refuse(ctx: Any, message: bytes) -> None:
        raise HandlerError("refused: quota")

    server.register("unsupported", lambda ctx, m: object())
    server.register("surrogate", lambda ctx, m: "\ud800")

    @server.route("shutdown")
    def shutdown(ctx: Any, message: bytes) -> str:
        ctx.server.close()
        return "bye"

    @server.route("slow")
    def slow(ctx: Any, message: bytes) -> str:
        # Overrunning the deadline is the behaviour under test, not synchronisation.
        threading.Event().wait(float(ctx.params))
        return "late"

    @server.route("held")
    def held(ctx: Any, message: bytes) -> str:
        arena.started.set()
        try:
            arena.release.wait(TIMEOUT)
            return "done"
        finally:
            arena.handler_done.set()

    @server.route("flood")
    def flood(ctx: Any, message: bytes) -> None:
        # Pushes 64 KiB messages until the connection is dropped (bounded: 1 GiB).
        chunk = b"x" * 65536
        try:
            for _ in range(16384):
                ctx.send(chunk)
            arena.handler_outcome.append("never dropped")
        except Exception as exc:  # ConnectionClosed is what we expect
            arena.handler_outcome.append(f"{type(exc).__name__}: {exc}")
        finally:
            arena.handler_done.set()

    @server.route("kick")
    def kick(ctx: Any, message: bytes) -> None:
        ctx.connection.close(4000, "kicked")


@contextlib.contextmanager
def arena(bystander: str = "replies", **options: Any) -> Iterator[Arena]:
    """A server with hostile routes and a bystander connected throughout.

    ``bystander="replies"``: afterwards the bystander still gets correct replies;
    ``"going_away"``: the server shut down, the bystander got Close 1001.
    """
    log = ListHandler()
    logger = logging.getLogger(f"test.hostile.{next(_names)}")
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    options.setdefault("handshake_timeout", TIMEOUT)
    options.setdefault("close_timeout", CLOSE_TIMEOUT)
    options.setdefault("write_timeout", WRITE_TIMEOUT)
    server = make_server(logger=logger, **options)
    a = Arena(server, log)
    _hostile_routes(server, a)
    try:
        with running(server):
            try:
                with connect(a.url(), open_timeout=TIMEOUT, close_timeout=TIMEOUT,
                             ping_interval=None) as ws:
                    a.bystander = ws
                    a.bystander_ok()
                    yield a
                    if bystander == "replies":
                        a.wait_freed()
                        a.bystander_ok()
                    else:
                        with pytest.raises(WSClosed) as info:
                            ws.recv(timeout=TIMEOUT)
                        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            finally:
                a.release.set()  # never leave a handler blocked, even when a test failed
    finally:
        logger.removeHandler(log)
    # A server thread that dies of an exception is a bug, whatever the input was.
    assert not [m for m in log.messages(logging.ERROR) if "unexpected error" in m]


def _timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


# 1. Not a WebSocket handshake, or a broken one: a specific HTTP answer.


def _tls_client_hello() -> bytes:
    """A real ClientHello, as a browser opening https:// on our ws:// port sends."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _key(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


def _req(**kwargs: Any) -> Callable[[str], bytes]:
    return lambda host: handshake_request(host, **kwargs)


HTTP_CASES: List[Tuple[str, Callable[[str], bytes], int, bytes, Tuple[Tuple[str, str], ...]]] = [
    ("garbage_binary", lambda h: b"\x00\x01\x02\xffgarbage\r\n\r\n", 400,
     b"malformed HTTP request line", ()),
    ("garbage_text", lambda h: b"hello there, server\r\n\r\n", 400,
     b"malformed HTTP request", ()),
    # No blank line ever comes: refused on the first bytes, not after handshake_timeout.
    ("garbage_without_end", lambda h: bytes(range(256)), 400,
     b"malformed HTTP request line", ()),
    ("tls_client_hello", lambda h: _tls_client_hello(), 400,
     b"TLS handshake received on a plain (ws://) listener", ()),
    ("http10_upgrade", _req(version="HTTP/1.0"), 505, b"HTTP/1.1", ()),
    ("http2_preface", lambda h: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, b"HTTP/1.1", ()),
    ("http3_version", lambda h: b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 505, b"HTTP/1.1", ()),
    ("post_upgrade", lambda h: handshake_request(h).replace(b"GET ", b"POST ", 1), 405,
     b"GET", (("allow", "GET"),)),
    ("key_missing", _req(omit=["Sec-WebSocket-Key"]), 400,
     b"missing Sec-WebSocket-Key", ()),
    ("key_not_base64", _req(key="!!!!not*base64!!!!!!!!=="), 400,
     b"invalid Sec-WebSocket-Key", ()),
    ("key_15_bytes", _req(key=_key(15)), 400, b"invalid Sec-WebSocket-Key", ()),
    ("key_17_bytes", _req(key=_key(17)), 400, b"invalid Sec-WebSocket-Key", ()),
    ("key_empty", _req(key=" "), 400, b"invalid Sec-WebSocket-Key", ()),
    ("key_duplicated", _req(extra=[("Sec-WebSocket-Key", _key(16))]), 400,
     b"more than one Sec-WebSocket-Key", ()),
    ("version_missing", _req(omit=["Sec-WebSocket-Version"]), 400,
     b"missing Sec-WebSocket-Version", (("sec-websocket-version", "13"),)),
    ("version_8", _req(omit=["Sec-WebSocket-Version"], extra=[("Sec-WebSocket-Version", "8")]),
     426, b"unsupported Sec-WebSocket-Version", (("sec-websocket-version", "13"),)),
    ("version_duplicated", _req(extra=[("Sec-WebSocket-Version", "8")]), 426,
     b"unsupported Sec-WebSocket-Version", (("sec-websocket-version", "13"),)),
    ("header_100kb", _req(extra=[("X-Big", "a" * 100_000)]), 431,
     b"request head larger than", ()),
    ("many_headers", _req(extra=[(f"X-H{i}", "v") for i in range(3000)]), 431,
     b"request head larger than", ()),
    ("target_20kb", lambda h: handshake_request(h, "/" + "p" * 20_000), 414,
     b"request line longer than", ()),
    ("origin_other_host", _req(extra=[("Origin", "https://evil.example")]), 403,
     b"origin not allowed", ()),
    ("host_missing", _req(omit=["Host"]), 400, b"Host", ()),
    ("connection_missing", _req(omit=["Connection"]), 426, b"Connection: Upgrade",
     (("upgrade", "websocket"),)),
    ("plain_get", lambda h: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426, b"WebSocket",
     (("upgrade", "websocket"),)),
    ("header_without_colon", lambda h: b"GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", 400,
     b"malformed HTTP request", ()),
    ("nul_in_header", lambda h: b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400,
     b"malformed HTTP request", ()),
    ("bad_extension_params",
     _req(extra=[("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits=abc")]),
     400, b"invalid Sec-WebSocket-Extensions", ()),
]


@pytest.mark.parametrize(
    "make, status, body, headers", [c[1:] for c in HTTP_CASES], ids=[c[0] for c in HTTP_CASES]
)
def test_broken_handshakes_get_their_http_answer(
    make: Callable[[str], bytes], status: int, body: bytes,
    headers: Tuple[Tuple[str, str], ...],
) -> None:
    # compression on, so that extension offers are parsed at all.
    with arena(compression="deflate") as a, a.raw() as client:
        client.send_raw(make(a.host))
        answer, elapsed = _timed(client.read_response)
        assert answer == status, client.body
        assert body in client.body
        for name, value in headers:
            assert client.headers.get(name) == value
        assert client.headers["connection"].endswith("close")
        assert elapsed < PROMPT  # answered at once, not at handshake_timeout (TIMEOUT)
        assert client.at_eof(PROMPT)


def test_slowloris_head_gets_408_and_frees_the_slot() -> None:
    with arena(handshake_timeout=HANDSHAKE_TIMEOUT) as a:
        # Timed from before the connect, so the server's clock cannot start first.
        start = time.monotonic()
        with a.raw() as client:
            request = handshake_request(a.host)
            sent = 0
            client.sock.settimeout(0.05)
            # One byte, then a 50 ms wait for an answer: each byte comes well within any
            # per-read idle timeout, the whole head far slower than handshake_timeout.
            while sent < len(request):
                client.sock.sendall(request[sent:sent + 1])
                sent += 1
                try:
                    chunk = client.sock.recv(65536)
                except socket.timeout:
                    continue
                client.buffer += chunk
                break
            elapsed = time.monotonic() - start
            assert sent < len(request), "the server waited for the whole slow head"
            client.sock.settimeout(TIMEOUT)
            assert client.read_response() == 408
            assert HANDSHAKE_TIMEOUT * 0.95 <= elapsed < HANDSHAKE_TIMEOUT + PROMPT
            assert client.at_eof(PROMPT)


def test_connect_and_send_nothing_gets_408_and_holds_no_slot() -> None:
    with arena(handshake_timeout=HANDSHAKE_TIMEOUT) as a:
        start = time.monotonic()
        with a.raw() as client:
            # Waiting for its request head, it costs a socket in the accept loop, not a
            # slot (issue #15): only the bystander is a connection.
            assert a.server.active_connections == 1
            assert client.read_response() == 408
            elapsed = time.monotonic() - start
            assert HANDSHAKE_TIMEOUT * 0.95 <= elapsed < HANDSHAKE_TIMEOUT + PROMPT
            assert client.at_eof(PROMPT)
            a.wait_freed()


def test_flood_of_three_times_max_connections() -> None:
    cap = 6
    with arena(max_connections=cap) as a:  # the bystander holds one slot
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.001):
                peak[0] = max(peak[0], a.server.active_connections)

        sampler = threading.Thread(target=sample)
        sampler.start()
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(a.raw()) for _ in range(3 * cap)]
            for client in clients:
                client.send_raw(handshake_request(a.host))
            statuses = [client.read_response() for client in clients]
            assert sorted(statuses) == [101] * (cap - 1) + [503] * (2 * cap + 1)
            for client, status in zip(clients, statuses):
                if status == 503:
                    assert client.body == b"Too many connections\n"
                    assert client.headers["retry-after"].isdigit()
                    assert client.at_eof(PROMPT)
            assert a.server.active_connections == cap
            assert a.server.stats()["rejected"] == 2 * cap + 1
            a.bystander_ok()  # full house, and the bystander is still served
        stop.set()
        sampler.join()
        assert peak[0] <= cap
        a.wait_freed()
        # Recovered: a new client is admitted and served.
        with connect(a.url(), open_timeout=TIMEOUT) as ws:
            ws.send('{"Route":"echo","Params":"admitted"}')
            assert ws.recv(timeout=TIMEOUT) == '"admitted"'


def test_same_origin_is_admitted_where_another_is_refused() -> None:
    with arena() as a:
        with a.upgraded(extra=[("Origin", f"http://{a.host}")]) as client:
            client.send_text('{"Route":"echo","Params":1}')
            assert client.recv_text() == "1"


def test_accept_key_is_right_and_server_frames_are_unmasked_with_rsv_clear() -> None:
    with arena() as a, a.raw() as client:
        key = _key(16)
        client.send_raw(handshake_request(a.host, key=key))
        assert client.read_response() == 101
        expected = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        assert client.headers["sec-websocket-accept"] == expected  # RFC 6455 4.2.2
        assert client.headers["upgrade"].lower() == "websocket"
        frames = []
        for opcode, payload in ((OP_TEXT, b'{"Route":"echo","Params":"t"}'),
                                (OP_BINARY, b'{"Route":"echo","Params":"b"}'),
                                (OP_PING, b"p"), (OP_CLOSE, struct.pack("!H", 1000))):
            client.send_frame(opcode, payload)
            frames.append(client.recv_frame())
        assert [(op, payload) for op, payload, _, _, _ in frames] == [
            (OP_TEXT, b'"t"'), (OP_BINARY, b'"b"'), (OP_PONG, b"p"),
            (OP_CLOSE, struct.pack("!H", 1000)),
        ]
        for _, _, fin, rsv, masked in frames:
            assert (fin, rsv, masked) == (True, 0, False)  # RFC 6455 5.1, 5.2
        assert client.at_eof(PROMPT)


# 2. Broken frames: Close with the right code, then TCP dropped promptly.


def _frame(op: int, payload: bytes = b"", **kwargs: Any) -> bytes:
    return encode_frame(op, payload, **kwargs)


ENVELOPE = b'{"Route":"echo","Params":1}'
MAX_MESSAGE = 1000

FRAME_CASES: List[Tuple[str, bytes, int]] = [
    ("unmasked", _frame(OP_TEXT, ENVELOPE, mask=False), 1002),
    ("rsv1_without_extension", _frame(OP_TEXT, ENVELOPE, rsv=4), 1002),
    ("rsv2", _frame(OP_TEXT, ENVELOPE, rsv=2), 1002),
    ("rsv3", _frame(OP_BINARY, ENVELOPE, rsv=1), 1002),
    ("rsv_on_ping", _frame(OP_PING, b"p", rsv=2), 1002),
    ("opcode_3", _frame(3, b"x"), 1002),
    ("opcode_7", _frame(7, b"x"), 1002),
    ("opcode_0xB", _frame(0xB, b"x"), 1002),
    ("opcode_0xF", _frame(0xF, b""), 1002),
    ("ping_126_bytes", _frame(OP_PING, b"x" * 126), 1002),
    ("pong_126_bytes", _frame(OP_PONG, b"x" * 126), 1002),
    ("close_126_bytes", _frame(OP_CLOSE, struct.pack("!H", 1000) + b"x" * 124), 1002),
    ("fragmented_ping", _frame(OP_PING, b"p", fin=False), 1002),
    ("fragmented_close", _frame(OP_CLOSE, struct.pack("!H", 1000), fin=False), 1002),
    ("continuation_without_start", _frame(OP_CONT, b"x"), 1002),
    ("final_continuation_without_start", _frame(OP_CONT, b"x", fin=True), 1002),
    ("new_text_inside_fragmented", _frame(OP_TEXT, b"ab", fin=False) + _frame(OP_TEXT, b"cd"),
     1002),
    ("new_binary_inside_fragmented",
     _frame(OP_TEXT, b"ab", fin=False) + _frame(OP_BINARY, b"cd", fin=False), 1002),
    ("invalid_utf8_text", _frame(OP_TEXT, b'{"Route":"\xc3\x28"}'), 1007),
    ("invalid_utf8_in_fragment",
     _frame(OP_TEXT, b'{"Route":', fin=False) + _frame(OP_CONT, b'"\xff"}'), 1007),
    ("truncated_utf8_at_end", _frame(OP_TEXT, b'"\xe2\x82"'), 1007),
    ("surrogate_encoded_in_utf8", _frame(OP_TEXT, b'"\xed\xa0\x80"'), 1007),
    ("invalid_utf8_close_reason", _frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xc3\x28"), 1007),
    ("close_1_byte", _frame(OP_CLOSE, b"\x03"), 1002),
    *[(f"close_code_{code}", _frame(OP_CLOSE, struct.pack("!H", code)), 1002)
      for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)],
    ("oversized_one_frame", _frame(OP_TEXT, b"x" * (MAX_MESSAGE + 1)), 1009),
    ("oversized_binary", _frame(OP_BINARY, b"x" * (MAX_MESSAGE + 1)), 1009),
    ("oversized_across_fragments",
     _frame(OP_TEXT, b"x" * 600, fin=False) + _frame(OP_CONT, b"x" * 600), 1009),
    ("oversized_many_small_fragments",
     b"".join(_frame(OP_TEXT if i == 0 else OP_CONT, b"x" * 50, fin=False) for i in range(30)),
     1009),
    # Announced lengths, with no payload behind them: refused on the header alone.
    ("length_2_pow_63", bytes([0x81, 0xFF]) + struct.pack("!Q", 1 << 63) + os.urandom(4), 1002),
    ("length_2_pow_63_minus_1",
     bytes([0x82, 0xFF]) + struct.pack("!Q", (1 << 63) - 1) + os.urandom(4), 1009),
    ("length_2_pow_63_fragment",
     bytes([0x01, 0xFF]) + struct.pack("!Q", (1 << 63) - 1) + os.urandom(4), 1009),
    ("length_not_minimal", bytes([0x81, 0xFF]) + struct.pack("!Q", 5) + os.urandom(4) + b"x" * 5,
     1002),
]


@pytest.mark.parametrize(
    "data, code", [c[1:] for c in FRAME_CASES], ids=[c[0] for c in FRAME_CASES]
)
def test_broken_frames_close_with_their_code_and_drop_tcp(data: bytes, code: int) -> None:
    with arena(max_message_size=MAX_MESSAGE) as a:
        with allocation_peak() as peak, a.upgraded() as client:
            client.send_raw(data)
            (got, reason), elapsed = _timed(client.expect_close)
            assert got == code, reason
            assert elapsed < PROMPT
            assert client.at_eof(PROMPT)  # RFC 6455 7.1.7: no waiting for our Close
        # Nothing the size of an announced length was ever allocated.
        assert peak[0] < 16 << 20


def test_compressed_message_inflating_past_the_limit_gets_1009() -> None:
    with arena(compression="deflate", max_message_size=MAX_MESSAGE) as a:
        with a.upgraded(extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]) as client:
            assert client.headers["sec-websocket-extensions"].startswith("permessage-deflate")
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            data = compressor.compress(b"a" * 5000) + compressor.flush(zlib.Z_SYNC_FLUSH)
            client.send_frame(OP_TEXT, data[:-4], rsv=4)  # RFC 7692 7.2.1: tail removed
            assert client.expect_close()[0] == 1009
            assert client.at_eof(PROMPT)


def _deflate_bomb(mebibytes: int) -> bytes:
    """``mebibytes`` MiB of zeros, deflated (RFC 7692 7.2.1, tail removed): ~1 KiB per MiB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(mebibytes))
    return (bomb + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_decompression_bomb_sent_at_once_is_refused_with_bounded_memory() -> None:
    frame = encode_frame(OP_BINARY, _deflate_bomb(64), rsv=4)
    with arena(compression="deflate", max_message_size=MAX_MESSAGE) as a:
        with a.upgraded(extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]) as client:
            with allocation_peak() as peak:
                client.send_raw(frame)
                assert client.expect_close()[0] == 1009
            assert client.at_eof(PROMPT)
    # A 1000-byte limit should bound what one hostile frame costs to a few MiB.
    assert peak[0] < 8 << 20, f"{peak[0] >> 20} MiB allocated for a {MAX_MESSAGE}-byte limit"


def test_decompression_bomb_in_one_read_is_not_inflated_whole() -> None:
    # Regression: wsproto inflated all the compressed bytes of one read before the size
    # check, and _serve reads up to 256 KiB at once after full reads: 64 KiB on the
    # wire became ~190 MiB of allocations (fixed in 26cbb31: inflated 1 KiB at a time).
    from test_protocol import pair

    stream, _ = pair(compression="deflate", max_size=MAX_MESSAGE)
    frame = encode_frame(OP_BINARY, _deflate_bomb(64), rsv=4)
    assert len(frame) < 256 << 10  # fits in one of _serve's large reads
    with allocation_peak() as peak:
        (failure,) = stream.receive(frame)
    assert failure.code == 1009  # type: ignore[union-attr]
    assert peak[0] < 8 << 20, f"{peak[0] >> 20} MiB allocated for a {MAX_MESSAGE}-byte limit"


def test_data_after_a_protocol_error_is_ignored() -> None:
    with arena() as a, a.upgraded() as client:
        client.send_raw(_frame(OP_TEXT, b"x", rsv=4) + _frame(OP_TEXT, ENVELOPE) * 10)
        frames = []
        with contextlib.suppress(ConnectionError, socket.timeout):
            while True:
                frames.append(client.recv_frame()[:2])
        assert [op for op, _ in frames] == [OP_CLOSE]
        assert struct.unpack("!H", frames[0][1][:2])[0] == 1002


# 3. The closing handshake: answered, then TCP dropped promptly.


@pytest.mark.parametrize("payload, echoed", [
    (struct.pack("!H", 1000), 1000),
    (struct.pack("!H", 1000) + "é".encode() * 61 + b"x", 1000),  # a 125-byte payload
    (struct.pack("!H", 3000) + b"app", 3000),
    (struct.pack("!H", 4999), 4999),
    (b"", 1005),  # no status: answered with an empty Close
])
def test_client_close_is_answered_and_tcp_dropped_promptly(payload: bytes, echoed: int) -> None:
    with arena() as a, a.upgraded() as client:
        client.send_frame(OP_CLOSE, payload)
        (code, _), elapsed = _timed(client.expect_close)
        assert code == echoed
        assert client.at_eof(PROMPT)


def test_requests_pipelined_with_close_are_answered_before_the_close() -> None:
    # Regression: the Close reached wsproto in the same receive() as the request, so
    # wsproto was REMOTE_CLOSING when the reply and the pong were sent, and both were
    # dropped (fixed in 26cbb31: MessageStream defers the Close).
    with arena() as a, a.upgraded() as client:
        # One write: the server reads the request, the ping and the Close together.
        client.send_raw(_frame(OP_TEXT, ENVELOPE) + _frame(OP_PING, b"p")
                        + _frame(OP_CLOSE, struct.pack("!H", 1000)))
        frames = []
        with contextlib.suppress(ConnectionError, socket.timeout):
            while True:
                frames.append(client.recv_frame()[:2])
        # gorilla (the Go original) and RFC 6455 5.5.1: answered, then the Close echoed.
        assert frames == [(OP_TEXT, b"1"), (OP_PONG, b"p"), (OP_CLOSE, struct.pack("!H", 1000))]


def test_data_after_close_is_not_answered() -> None:
    with arena() as a, a.upgraded() as client:
        client.send_raw(_frame(OP_CLOSE, struct.pack("!H", 1000)) + _frame(OP_TEXT, ENVELOPE))
        frames = []
        with contextlib.suppress(ConnectionError, socket.timeout):
            while True:
                frames.append(client.recv_frame()[:2])
        assert frames == [(OP_CLOSE, struct.pack("!H", 1000))]


def test_server_close_from_handler_unanswered_is_given_up_after_close_timeout() -> None:
    with arena() as a, a.upgraded() as client:
        client.send_text('{"Route":"kick"}')
        assert client.expect_close() == (4000, "kicked")
        # We never answer: the server must stop waiting after close_timeout.
        eof, elapsed = _timed(lambda: client.at_eof(CLOSE_TIMEOUT + PROMPT))
        assert eof
        assert elapsed >= CLOSE_TIMEOUT * 0.5  # it did wait for an answer
        a.wait_freed()


def test_server_close_from_another_thread_unanswered_is_given_up() -> None:
    with arena() as a, a.upgraded() as client:
        conn = a.connection_of(client)
        started = time.monotonic()
        conn.close(4001, "from outside")
        assert client.expect_close() == (4001, "from outside")
        assert client.at_eof(CLOSE_TIMEOUT + PROMPT)
        assert time.monotonic() - started >= CLOSE_TIMEOUT * 0.5
        a.wait_freed()


def test_client_that_stops_answering_pings_is_closed_with_1011() -> None:
    interval, timeout = 0.3, 0.3
    # The bystander (websockets) answers pings by itself, so it must survive this.
    with arena(ping_interval=interval, ping_timeout=timeout) as a:
        start = time.monotonic()  # before the server's keepalive clock starts
        with a.upgraded() as client:
            opcode, _, _, _, _ = client.recv_frame()
            assert opcode == OP_PING
            assert time.monotonic() - start >= interval * 0.95
            code, reason = client.expect_close()  # never answered
            assert code == 1011, reason
            assert time.monotonic() - start >= (interval + timeout) * 0.95
            assert client.at_eof(PROMPT)
            a.wait_freed()


# 4. Hostile but well-formed traffic: correct replies.


def test_handshake_and_first_frame_in_one_write() -> None:
    with arena() as a, a.raw() as client:
        client.send_raw(handshake_request(a.host) + _frame(OP_TEXT, ENVELOPE))
        assert client.read_response() == 101
        assert client.recv_text() == "1"


def test_thousand_one_byte_fragments_with_pings_between() -> None:
    with arena() as a, a.upgraded() as client:
        body = '{"Route":"echo","Params":"héllo ✓"}'.encode()
        parts = []
        for i, byte in enumerate(body):
            op = OP_TEXT if i == 0 else OP_CONT
            parts.append(_frame(op, bytes([byte]), fin=i == len(body) - 1))
            if i % 7 == 0:
                parts.append(_frame(OP_PING, b"%d" % i))  # control frames may interleave
        client.send_raw(b"".join(parts))
        pongs = 0
        while True:
            opcode, payload, _, _, _ = client.recv_frame()
            if opcode == OP_PONG:
                assert payload == b"%d" % (pongs * 7)
                pongs += 1
                continue
            assert (opcode, payload.decode()) == (OP_TEXT, '"héllo ✓"')
            break
        assert pongs == len(range(0, len(body), 7))


def test_ping_flood_is_answered_in_order() -> None:
    with arena() as a, a.upgraded() as client:
        client.send_raw(b"".join(_frame(OP_PING, b"%d" % i) for i in range(5000)))
        client.send_raw(_frame(OP_PING, b"x" * 125) + _frame(OP_PONG, b"unsolicited"))
        for i in range(5000):
            assert client.recv_frame()[:2] == (OP_PONG, b"%d" % i)
        assert client.recv_frame()[:2] == (OP_PONG, b"x" * 125)
        client.send_text('{"Route":"echo","Params":"after"}')
        assert client.recv_text() == '"after"'


def test_message_then_half_close_still_gets_its_reply() -> None:
    with arena() as a, a.upgraded() as client:
        client.send_text('{"Route":"echo","Params":"last words"}')
        client.sock.shutdown(socket.SHUT_WR)
        assert client.recv_text() == '"last words"'
        assert client.at_eof(PROMPT)


def test_pipelined_requests_without_reading_are_all_answered() -> None:
    with arena() as a, a.upgraded() as client:
        client.send_raw(b"".join(
            _frame(OP_TEXT, b'{"Route":"echo","Params":%d}' % i) for i in range(2000)))
        assert [client.recv_text() for _ in range(2000)] == [str(i) for i in range(2000)]


# 5. Hostile envelopes: an error envelope, the connection stays usable.


def _ask(client: RawClient, payload: bytes, opcode: int = OP_TEXT) -> Tuple[int, bytes]:
    client.send_frame(opcode, payload)
    return client.recv_message()


@pytest.mark.parametrize("payload, opcode, reply", [
    (b'{"Route":"echo","Params":' + b"[" * 100_000 + b"]" * 100_000 + b"}", OP_TEXT,
     envelope("invalid JSON: nested too deeply")),
    (b'{"Route":"echo","Params":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001, OP_TEXT,
     envelope("invalid JSON: nested too deeply")),
    (b"[" * 100_000, OP_BINARY, envelope("invalid JSON: nested too deeply")),
    (json.dumps({"Route": "r" * 1_000_000}).encode(), OP_TEXT,
     envelope("unknown route: " + "r" * 100 + "...")),
    (json.dumps({"Route": "é" * 300_000}, ensure_ascii=False).encode(), OP_TEXT,
     envelope("unknown route: " + "é" * 100 + "...")),
    (b"", OP_TEXT, envelope("invalid JSON: Expecting value at position 0")),
    (b'{"Route":"\xff"}', OP_BINARY, envelope("invalid JSON: not valid UTF-8")),
    (b"\x00" * 64, OP_BINARY, None),
    (b'{"Route":["echo"]}', OP_TEXT, envelope('invalid request: "Route" must be a string')),
    (b'{"Route":"fail"}', OP_TEXT, INTERNAL_ERROR),
    (b'{"Route":"refuse"}', OP_TEXT, envelope("refused: quota")),
    (b'{"Route":"unsupported"}', OP_TEXT, INTERNAL_ERROR),
    (b'{"Route":"unsupported"}', OP_BINARY, INTERNAL_ERROR),
], ids=["nested_arrays_100k", "nested_objects_100k", "nested_binary_100k", "route_1mb",
        "route_multibyte", "empty_text", "binary_not_utf8", "binary_zeros", "route_list",
        "handler_raises", "handler_error", "unsupported_result", "unsupported_result_binary"])
def test_hostile_envelopes_get_an_error_envelope_and_the_connection_survives(
    payload: bytes, opcode: int, reply: Optional[bytes]
) -> None:
    with arena() as a, a.upgraded() as client:
        got_opcode, got = _ask(client, payload, opcode)
        assert got_opcode == opcode  # the reply comes in the request's frame type
        if reply is None:
            assert json.loads(got)["code"] == 1 and json.loads(got)["msg"].startswith(
                "invalid JSON")
        else:
            assert got == reply
        assert b"secret" not in got
        assert _ask(client, b'{"Route":"echo","Params":"alive"}') == (OP_TEXT, b'"alive"')
    errors = a.log.records
    if reply == INTERNAL_ERROR:
        # The handler's failure is logged at ERROR with its traceback, once.
        (record,) = [r for r in errors if r.levelno == logging.ERROR]
        assert record.exc_info is not None
    else:
        assert not [r for r in errors if r.levelno >= logging.ERROR]


PARAMS_OF_EVERY_TYPE: List[Any] = [
    None, True, False, 0, -1, 2 ** 64, -(2 ** 63), int("9" * 4000), 1.5, -2.5e-10, 1e300,
    5e-324, "", "é\u0000\n\t\"\\/✓🎉\u2028", "x" * 100_000, [], {}, [None, [1, [2.5, ["s"]]]],
    {"a": {"b": None, "": [True]}, "é": 1}, [{"Route": "echo", "Params": "nested"}],
]


def test_params_of_every_json_type_round_trip() -> None:
    with arena() as a, a.upgraded() as client:
        for value in PARAMS_OF_EVERY_TYPE:
            request = json.dumps({"Route": "echo", "Params": value}, ensure_ascii=False)
            for opcode, data in ((OP_TEXT, request.encode()), (OP_BINARY, request.encode())):
                got_opcode, got = _ask(client, data, opcode)
                assert got_opcode == opcode
                assert json.loads(got) == value


def test_number_too_long_for_python_is_not_reported_as_bad_utf8() -> None:
    # Regression: a bare 'except ValueError' took the int-size limit for bad UTF-8.
    with arena() as a, a.upgraded() as client:
        _, got = _ask(client, b'{"Route":"echo","Params":' + b"9" * 5000 + b"}")
        msg = json.loads(got)["msg"]
        assert msg.startswith("invalid JSON") and "UTF-8" not in msg


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_json_numbers_are_refused(literal: bytes) -> None:
    # Regression: json's scanner accepts NaN/Infinity (not JSON, RFC 8259 6; Go refuses
    # them), and the handler got ctx.params=nan and the bytes b"NaN".
    with arena() as a, a.upgraded() as client:
        _, got = _ask(client, b'{"Route":"echo","Params":' + literal + b"}")
        assert got.startswith(b'{"code":1,"msg":"invalid JSON')


def test_binary_request_in_utf16_is_refused_as_not_utf8() -> None:
    # Regression: json.detect_encoding() guessed UTF-16, so this was routed.
    with arena() as a, a.upgraded() as client:
        request = '{"Route":"echo","Params":"utf16"}'.encode("utf-16")
        assert _ask(client, request, OP_BINARY) == (
            OP_BINARY, envelope("invalid JSON: not valid UTF-8"))


def test_lone_surrogate_escape_in_params_is_not_an_error() -> None:
    # JSON allows "\ud800" (RFC 8259 8.2 only warns); the text cannot be UTF-8 encoded
    # once decoded, which must not be mistaken for a failing handler.
    with arena() as a, a.upgraded() as client:
        opcode, got = _ask(client, b'{"Route":"echo","Params":"\\ud800"}')
        assert opcode == OP_TEXT and got != INTERNAL_ERROR
        assert _ask(client, ENVELOPE) == (OP_TEXT, b"1")
    assert a.messages(logging.ERROR) == []


def test_handler_returning_unencodable_text_gets_internal_error() -> None:
    # Regression: the str went to MessageStream.send, whose UnicodeEncodeError killed
    # the connection thread ('unexpected error') without a Close frame.
    with arena() as a, a.upgraded() as client:
        assert _ask(client, b'{"Route":"surrogate"}') == (OP_TEXT, INTERNAL_ERROR)
        assert _ask(client, ENVELOPE) == (OP_TEXT, b"1")


# 6. Hostile handlers and vanishing clients.


def test_handler_that_closes_the_server() -> None:
    with arena(bystander="going_away") as a, a.upgraded() as client:
        client.send_text('{"Route":"shutdown"}')
        assert client.expect_close()[0] == 1001
        client.send_frame(OP_CLOSE, struct.pack("!H", 1001))
        assert client.at_eof(PROMPT)
        assert a.server.wait_closed(TIMEOUT)
    # The handler's own connection is not waited for by close(): it finishes by itself.
    assert _wait_for(lambda: a.server.active_connections == 0)


def test_handler_past_its_deadline_logs_a_warning_and_still_replies() -> None:
    with arena(handler_timeout=0.1) as a, a.upgraded() as client:
        assert _ask(client, b'{"Route":"slow","Params":0.3}') == (OP_TEXT, b"late")
        assert any("overran" in m for m in a.messages(logging.WARNING))


def test_client_reset_while_its_handler_runs() -> None:
    with arena() as a:
        with a.upgraded() as client:
            client.send_text('{"Route":"held"}')
            assert a.started.wait(TIMEOUT)
            # SO_LINGER 0: close() sends RST instead of FIN.
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.bystander_ok()  # served while the hostile handler is still blocked
        a.release.set()
        assert a.handler_done.wait(TIMEOUT)
        a.wait_freed()


def test_client_that_stops_reading_is_dropped_after_write_timeout() -> None:
    with arena() as a:
        with a.raw() as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.send_raw(handshake_request(a.host))
            assert client.read_response() == 101
            client.send_text('{"Route":"flood"}')
            # ... and never reads again.
            assert a.handler_done.wait(TIMEOUT)
            (outcome,) = a.handler_outcome
            assert outcome.startswith("ConnectionClosed") and "write timed out" in outcome
            a.bystander_ok()
            a.wait_freed()
        assert any("write timed out" in m for m in a.messages(logging.INFO))
