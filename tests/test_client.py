"""The synchronous Client over real sockets: calls, errors, pushes, timeouts, closing.

Most tests talk to the project's server; a few use a scripted raw server to produce
what a well-behaved server never sends (frames glued to the 101, a Close out of the
blue, a broken frame, a hang-up mid-handshake).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hashlib
import json
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest

from conftest import TIMEOUT, _wait_for, make_server, running
from wsroute_sync import (
    Client,
    ClientTimeout,
    ConnectionClosed,
    HandlerError,
    HandshakeRejected,
    RouteError,
    Server,
)
from wsroute_sync.client import is_error_envelope

# Helpers.


def routed_server(**options: Any) -> Server:
    """make_server() plus routes that fail in each way the server reports."""
    server = make_server(**options)

    @server.route("fail")
    def fail(ctx: Any, message: bytes) -> None:
        raise HandlerError("it went wrong")

    @server.route("boom")
    def boom(ctx: Any, message: bytes) -> None:
        raise RuntimeError("secret internals")

    @server.route("bad_result")
    def bad_result(ctx: Any, message: bytes) -> Any:
        return object()

    @server.route("looks_like_error")
    def looks_like_error(ctx: Any, message: bytes) -> Any:
        return ctx.params

    return server


@contextlib.contextmanager
def quiet(logger_name: str = "wsroute_sync.server") -> Iterator[None]:
    """Silence expected ERROR records (a handler failing on purpose)."""
    import logging

    logger = logging.getLogger(logger_name)
    previous = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = previous


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@contextlib.contextmanager
def raw_server(script: Callable[[socket.socket], None], *, upgrade: bool = True,
               after_101: bytes = b"",
               listener_options: Sequence[Tuple[int, int, int]] = ()) -> Iterator[str]:
    """A one-connection server that answers the upgrade by hand, then runs ``script``."""
    listener = socket.socket()
    for option in listener_options:
        listener.setsockopt(*option)  # before listen(): accepted sockets inherit them
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    errors: List[BaseException] = []

    def run() -> None:
        try:
            listener.settimeout(TIMEOUT)
            sock, _ = listener.accept()
        except OSError as exc:
            errors.append(exc)
            return
        finally:
            listener.close()
        with sock:
            try:
                sock.settimeout(TIMEOUT)
                if upgrade:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        head += sock.recv(4096)
                    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                               if line.lower().startswith(b"sec-websocket-key:"))
                    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
                    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                                 + b"\r\n\r\n" + after_101)
                script(sock)
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)

    thread = threading.Thread(target=run, name="raw-server")
    thread.start()
    try:
        yield f"ws://127.0.0.1:{port}/"
    finally:
        thread.join(TIMEOUT * 2)
        assert not thread.is_alive(), "raw server did not finish"
    if errors:
        raise errors[0]


def read_client_frame(sock: socket.socket) -> Tuple[int, bytes]:
    """One masked client frame (small payloads only): ``(opcode, payload)``."""
    head = _read_exact(sock, 2)
    assert head[1] & 0x80, "client frames are masked"
    length = head[1] & 0x7F
    assert length < 126
    mask = _read_exact(sock, 4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(_read_exact(sock, length)))
    return head[0] & 0x0F, payload


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


def close_frame(code: Optional[int], reason: bytes = b"") -> bytes:
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return bytes([0x88, len(payload)]) + payload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# Calls and replies.


def test_call_round_trip() -> None:
    with running(make_server()) as server, Client.connect(server.url) as client:
        assert client.call("echo", {"message": "Hello, WebSocket!"}) == (
            b'{"message":"Hello, WebSocket!"}'
        )
        assert client.call("echo", "é") == '"é"'.encode("utf-8")
        assert client.call("echo") == b"null"
        assert client.call("echo", [1, 2], binary=True) == b"[1,2]"


def test_call_json_decodes_the_reply() -> None:
    server = make_server()
    server.register("add", lambda ctx, message: {"sum": sum(ctx.params)})
    with running(server), Client.connect(server.url) as client:
        assert client.call_json("add", [1, 2, 3.5]) == {"sum": 6.5}
        assert client.call_json("echo", {"nested": [None, True]}) == {"nested": [None, True]}


def test_request_sends_a_hand_made_envelope() -> None:
    with running(make_server()) as server, Client.connect(server.url) as client:
        assert client.request('{"route":"echo","params":{"k":1}}') == b'{"k":1}'
        assert client.request(b'{"Route":"echo","Params":2}') == b"2"


@pytest.mark.parametrize(
    "how, message, msg",
    [
        ("request", "{", "invalid JSON: Expecting property name enclosed in double quotes "
                         "at position 1"),
        ("request", b"\xff", "invalid JSON: not valid UTF-8"),
        ("request", "[1]", "invalid request: expected a JSON object"),
        ("request", '{"Params":1}', 'invalid request: missing "Route"'),
        ("request", '{"Route":1}', 'invalid request: "Route" must be a string'),
        ("call", "nope", "unknown route: nope"),
        ("call", "x" * 150, "unknown route: " + "x" * 100 + "..."),
        ("call", "fail", "it went wrong"),
        ("call", "boom", "internal error"),
        ("call", "bad_result", "internal error"),
    ],
)
def test_error_envelopes_raise_route_error(how: str, message: Any, msg: str) -> None:
    with quiet(), running(routed_server()) as server, Client.connect(server.url) as client:
        with pytest.raises(RouteError) as info:
            if how == "call":
                client.call(message, {"a": 1})
            else:
                client.request(message)
        assert (info.value.code, info.value.msg) == (1, msg)
        assert str(info.value) == f"server error 1: {msg}"
        # The connection stays usable after an error.
        assert client.call("echo", 7) == b"7"


def test_reply_shaped_like_an_envelope_is_detected_precisely() -> None:
    with running(routed_server()) as server, Client.connect(server.url) as client:
        for reply in ({"code": 0, "msg": "ok", "data": None},
                      {"code": 2, "msg": "x", "data": None, "extra": 1},
                      {"code": True, "msg": "x", "data": None},
                      {"code": "2", "msg": "x", "data": None},
                      {"code": 2, "msg": None, "data": None}):
            assert client.call_json("looks_like_error", reply) == reply
        # A handler can answer with an error envelope of its own: it is one.
        with pytest.raises(RouteError) as info:
            client.call("looks_like_error", {"code": 42, "msg": "quota", "data": {"n": 1}})
        assert (info.value.code, info.value.msg) == (42, "quota")


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('{"code":1,"msg":"m","data":null}', (1, "m")),
        (b' {"data":null,"msg":"m","code":-3}', (-3, "m")),
        ('{"code":0,"msg":"m","data":null}', None),
        ('{"code":1.0,"msg":"m","data":null}', None),
        ('{"code":1,"msg":"m"}', None),
        ('[{"code":1,"msg":"m","data":null}]', None),
        ('{"code":1,"msg":"m","data":null', None),
        ("", None),
        (b"\xff\xfe", None),
    ],
)
def test_is_error_envelope(reply: Any, expected: Any) -> None:
    assert is_error_envelope(reply) == expected


def test_route_must_be_a_string_and_params_json() -> None:
    with running(make_server()) as server, Client.connect(server.url) as client:
        with pytest.raises(TypeError):
            client.call(1)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            client.call("echo", object())
        with pytest.raises(ValueError):
            client.call("echo", float("nan"))  # not JSON: refused before it is sent
        assert client.call("echo", 1) == b"1"


def test_calls_from_several_threads_pair_up() -> None:
    with running(make_server()) as server, Client.connect(server.url) as client:
        mismatches: List[Any] = []

        def worker(n: int) -> None:
            for i in range(25):
                reply = client.call_json("echo", [n, i])
                if reply != [n, i]:
                    mismatches.append((n, i, reply))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert mismatches == []


# Pushed messages.


def test_pushed_messages_arrive_through_receive() -> None:
    server = make_server()

    @server.route("push")
    def push(ctx: Any, message: bytes) -> None:
        ctx.send("text push")
        ctx.send(b"\x00binary push")
        ctx.send({"n": ctx.params})

    with running(server), Client.connect(server.url) as client:
        client.send({"Route": "push", "Params": 3})
        assert client.receive(TIMEOUT) == "text push"
        assert client.receive(TIMEOUT) == b"\x00binary push"
        assert client.receive(TIMEOUT) == '{"n":3}'
        assert server.broadcast("to everyone") == 1
        assert client.receive(TIMEOUT) == "to everyone"


def test_send_accepts_text_bytes_and_json() -> None:
    server = Server(message_handler=lambda connection, message: message)
    with running(server), Client.connect(server.url) as client:
        client.send("plain text")
        assert client.receive(TIMEOUT) == "plain text"
        client.send(bytearray(b"\x01\x02"))
        assert client.receive(TIMEOUT) == b"\x01\x02"
        client.send({"a": ["é"]})
        assert client.receive(TIMEOUT) == '{"a":["é"]}'


def test_messages_sent_with_the_101_are_delivered_at_once() -> None:
    # simple-websocket alone leaves them in wsproto's buffer until more data arrives.
    def script(sock: socket.socket) -> None:
        assert read_client_frame(sock)[0] == 0x8  # the client's Close, on close()

    with raw_server(script, after_101=b"\x81\x05hello") as url:
        with Client.connect(url, timeout=TIMEOUT) as client:
            assert client.receive(TIMEOUT) == "hello"


def test_messages_before_an_immediate_close_are_kept() -> None:
    answered: List[Tuple[int, bytes]] = []
    after_101 = b"\x81\x07welcome" + close_frame(1001, b"bye")
    with raw_server(lambda sock: answered.append(read_client_frame(sock)),
                    after_101=after_101) as url:
        client = Client.connect(url, timeout=TIMEOUT)
        assert client.receive(TIMEOUT) == "welcome"
        with pytest.raises(ConnectionClosed) as info:
            client.receive(TIMEOUT)
        assert (info.value.code, info.value.reason) == (1001, "bye")
        client.close()
    assert answered == [(0x8, struct.pack("!H", 1001))]


# Timeouts.


def test_call_timeout_raises_promptly_and_closes_the_client() -> None:
    server = make_server()
    entered, release = threading.Event(), threading.Event()

    @server.route("wait")
    def wait(ctx: Any, message: bytes) -> str:
        entered.set()
        release.wait(TIMEOUT)
        return "late"

    with running(server), Client.connect(server.url) as client:
        started = time.monotonic()
        with pytest.raises(ClientTimeout) as info:
            client.call("wait", timeout=0.2)
        assert time.monotonic() - started < TIMEOUT / 2
        assert entered.is_set() and not release.is_set()
        assert "client is closed" in str(info.value)
        assert isinstance(info.value, TimeoutError)
        # The late reply must never be read as the answer to another call.
        assert client.closed
        with pytest.raises(ConnectionClosed):
            client.call("echo", 1)
        release.set()


def test_default_call_timeout_is_the_connect_timeout() -> None:
    server = make_server()
    release = threading.Event()
    server.register("wait", lambda ctx, message: release.wait(TIMEOUT) and None)
    with running(server), Client.connect(server.url, timeout=0.2) as client:
        assert client.timeout == 0.2
        with pytest.raises(ClientTimeout):
            client.call("wait")
        release.set()


def test_receive_timeout_leaves_the_client_usable() -> None:
    with running(make_server()) as server, Client.connect(server.url) as client:
        with pytest.raises(ClientTimeout):
            client.receive(timeout=0.05)
        with pytest.raises(ClientTimeout):
            client.receive(timeout=0)
        assert not client.closed
        assert client.call("echo", 1) == b"1"


def test_connect_timeout_when_the_server_never_answers() -> None:
    # A listening socket nobody accepts on: TCP connects, the upgrade gets no answer.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host, port = listener.getsockname()
        started = time.monotonic()
        with pytest.raises(ClientTimeout):
            Client.connect(f"ws://{host}:{port}/", timeout=0.2)
        assert time.monotonic() - started < TIMEOUT / 2


# The server closing or going away.


def test_server_close_wakes_a_waiting_receive_with_1001() -> None:
    with running(make_server()) as server:
        client = Client.connect(server.url)
        outcome: List[BaseException] = []

        def waiter() -> None:
            try:
                client.receive(timeout=TIMEOUT * 4)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=waiter)
        thread.start()
        started = time.monotonic()
        server.close(timeout=TIMEOUT)
        thread.join(TIMEOUT)
        assert time.monotonic() - started < TIMEOUT
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosed)
        assert (outcome[0].code, outcome[0].reason) == (1001, "server shutting down")
        assert client.closed and client.close_code == 1001
        client.close()


def test_server_close_during_a_call_raises_1001_promptly() -> None:
    server = make_server()
    entered, release = threading.Event(), threading.Event()

    @server.route("wait")
    def wait(ctx: Any, message: bytes) -> str:
        entered.set()
        release.wait(TIMEOUT * 2)
        return "late"

    with running(server), Client.connect(server.url) as client:
        def close_when_entered() -> None:
            entered.wait(TIMEOUT)
            server.close(timeout=TIMEOUT * 2)

        closer = threading.Thread(target=close_when_entered)
        closer.start()
        try:
            with pytest.raises(ConnectionClosed) as info:
                client.call("wait", timeout=TIMEOUT * 4)
            # Raised while the handler still runs: the call did not wait for it.
            assert not release.is_set()
            assert info.value.code == 1001
        finally:
            release.set()
            closer.join(TIMEOUT * 2)


@contextlib.contextmanager
def server_process(
    *args: str, cwd: Optional[str] = None
) -> Iterator[Tuple["subprocess.Popen[str]", str]]:
    """``python -m wsroute_sync ARGS`` in a child process, and the URL it serves on."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsroute_sync", *args], cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on ws://"), line
        yield proc, line.split()[-1]
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)


def test_killed_server_process_makes_call_raise_promptly() -> None:
    with server_process("--port", "0") as (proc, url):
        client = Client.connect(url)
        try:
            assert client.call("echo", 1) == b"1"
            proc.kill()  # SIGKILL: no Close frame, the kernel just drops the socket
            proc.wait(TIMEOUT)
            started = time.monotonic()
            with pytest.raises(ConnectionClosed) as info:
                client.call("echo", 2, timeout=TIMEOUT * 4)
            assert time.monotonic() - started < TIMEOUT
            assert info.value.code == 1006
            with pytest.raises(ConnectionClosed):
                client.receive(timeout=TIMEOUT * 4)
        finally:
            client.close()


def test_server_killed_while_a_call_waits(tmp_path: Path) -> None:
    (tmp_path / "hangapp.py").write_text(textwrap.dedent("""
        import sys, threading
        from wsroute_sync import Server
        server = Server()

        @server.route("hang")
        def hang(ctx, message):
            print("hanging", flush=True)
            threading.Event().wait()
    """))
    with server_process("serve", "hangapp:server", "--port", "0",
                        cwd=str(tmp_path)) as (proc, url):
        client = Client.connect(url)
        outcome: List[BaseException] = []

        def caller() -> None:
            try:
                client.call("hang", timeout=TIMEOUT * 4)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=caller)
        thread.start()
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "hanging\n"
            proc.kill()
            started = time.monotonic()
            thread.join(TIMEOUT)
            assert time.monotonic() - started < TIMEOUT
            assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosed)
            assert outcome[0].code == 1006
        finally:
            client.close()
            thread.join(TIMEOUT)


def test_connection_lost_without_close_frame_is_1006() -> None:
    with raw_server(lambda sock: None) as url:  # 101, then hang up
        client = Client.connect(url, timeout=TIMEOUT)
        with pytest.raises(ConnectionClosed) as info:
            client.receive(TIMEOUT)
        assert info.value.code == 1006
        with pytest.raises(ConnectionClosed):
            client.send("anything")
        client.close()


@pytest.mark.parametrize("code, reason", [(1001, b"bye"), (None, b"")])
def test_server_close_is_answered(code: Optional[int], reason: bytes) -> None:
    answered: List[Tuple[int, bytes]] = []

    def script(sock: socket.socket) -> None:
        sock.sendall(close_frame(code, reason))
        answered.append(read_client_frame(sock))

    with raw_server(script) as url:
        client = Client.connect(url, timeout=TIMEOUT)
        with pytest.raises(ConnectionClosed) as info:
            client.receive(TIMEOUT)
        client.close()
    # RFC 6455 5.5.1: the answer echoes the code (an empty Close gets an empty Close).
    assert answered == [(0x8, close_frame(code)[2:])]
    assert (info.value.code, info.value.reason) == (code or 1005, reason.decode())


def test_protocol_error_from_the_server_fails_the_connection() -> None:
    sent: List[Tuple[int, bytes]] = []

    def script(sock: socket.socket) -> None:
        sock.sendall(b"\x83\x00")  # opcode 3 is reserved: RFC 6455 5.2
        sent.append(read_client_frame(sock))

    with raw_server(script) as url:
        client = Client.connect(url, timeout=TIMEOUT)
        with pytest.raises(ConnectionClosed) as info:
            client.receive(TIMEOUT)
        client.close()
    assert info.value.code == 1002
    assert sent[0][0] == 0x8 and sent[0][1][:2] == struct.pack("!H", 1002)


# Opening.


def test_headers_and_subprotocols_reach_the_server() -> None:
    server = make_server(subprotocols=["v2", "v1"])

    @server.route("whoami")
    def whoami(ctx: Any, message: bytes) -> Dict[str, Any]:
        return {"auth": ctx.headers.get("authorization"), "x": ctx.headers.get_all("x-tag"),
                "host": ctx.headers.get("host"), "subprotocol": ctx.subprotocol,
                "path": ctx.path, "query": ctx.query}

    with running(server):
        host, port = server.address
        with Client.connect(f"ws://{host}:{port}/app?room=1",
                            headers={"Authorization": "Bearer t0ken"},
                            subprotocols=["v1", "v2"]) as client:
            assert client.subprotocol == "v2"  # the server's preference decides
            assert client.call_json("whoami") == {
                "auth": "Bearer t0ken", "x": [], "host": f"{host}:{port}",
                "subprotocol": "v2", "path": "/app", "query": "room=1",
            }
        with Client.connect(server.url, headers=[("X-Tag", "a"), ("X-Tag", "b")],
                            subprotocols="v1") as client:
            assert client.subprotocol == "v1"
            reply = client.call_json("whoami")
            assert reply["x"] == ["a", "b"] and reply["subprotocol"] == "v1"
        with Client.connect(server.url) as client:
            assert client.subprotocol is None


def test_refused_upgrades_raise_handshake_rejected() -> None:
    def authenticate(request: Any) -> Any:
        token = request.headers.get("authorization")
        if token is None:
            raise HandshakeRejected(401, "token required",
                                    headers=[("WWW-Authenticate", 'Bearer realm="x"')])
        return token == "Bearer good" and "alice"

    server = make_server(path="/ws", authenticate=authenticate, max_connections=1)
    with running(server):
        base = server.url
        with pytest.raises(HandshakeRejected) as info:
            Client.connect(base + "other", headers={"Authorization": "Bearer good"})
        assert info.value.status == 404
        # A refused connection holds its slot until the server has seen the client go.
        assert _wait_for(lambda: server.active_connections == 0)
        with pytest.raises(HandshakeRejected) as info:
            Client.connect(base + "ws")
        assert (info.value.status, info.value.reason) == (401, "token required")
        assert ("www-authenticate", 'Bearer realm="x"') in info.value.headers
        assert _wait_for(lambda: server.active_connections == 0)
        with pytest.raises(HandshakeRejected) as info:
            Client.connect(base + "ws", headers={"Authorization": "Bearer bad"})
        assert info.value.status == 403
        assert _wait_for(lambda: server.active_connections == 0)
        with Client.connect(base + "ws", headers={"Authorization": "Bearer good"}) as client:
            assert client.call("echo", 1) == b"1"
            with quiet():
                with pytest.raises(HandshakeRejected) as info:
                    Client.connect(base + "ws", headers={"Authorization": "Bearer good"})
            assert info.value.status == 503


def test_connection_refused_is_an_os_error() -> None:
    with pytest.raises(ConnectionRefusedError):
        Client.connect(f"ws://127.0.0.1:{free_port()}/", timeout=TIMEOUT)


def test_server_hanging_up_during_the_handshake() -> None:
    def script(sock: socket.socket) -> None:
        sock.recv(4096)
        sock.shutdown(socket.SHUT_WR)

    with raw_server(script, upgrade=False) as url:
        with pytest.raises(ConnectionClosed) as info:
            Client.connect(url, timeout=TIMEOUT)
    assert info.value.code == 1006


def test_a_non_websocket_answer_is_a_protocol_error() -> None:
    def script(sock: socket.socket) -> None:
        sock.recv(4096)
        sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        sock.recv(4096)

    with raw_server(script, upgrade=False) as url:
        with pytest.raises(ConnectionClosed) as info:
            Client.connect(url, timeout=TIMEOUT)
    assert info.value.code == 1002
    assert "invalid handshake response" in info.value.reason


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/", "ws:///nohost", "ws+unix://"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        Client.connect(url)


def test_unix_socket_url(tmp_path: Path) -> None:
    with running(make_server(), f"unix:{tmp_path}/app.sock") as server:
        assert server.url.startswith("ws+unix://")
        with Client.connect(server.url) as client:
            assert client.call("echo", "over a unix socket") == b'"over a unix socket"'


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_wss_with_a_custom_ssl_context(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=TIMEOUT * 2,
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = make_server()
    server.start("127.0.0.1:0", ssl_context=server_context)
    try:
        assert server.url.startswith("wss://")
        client_context = ssl.create_default_context(cafile=str(cert))
        with Client.connect(server.url, ssl_context=client_context) as client:
            assert client.call("echo", "secret") == b'"secret"'
        with pytest.raises(ssl.SSLCertVerificationError):
            Client.connect(server.url, timeout=TIMEOUT)  # the system's CAs do not know it
    finally:
        server.close(timeout=TIMEOUT)


# Closing.


def test_context_manager_closes_with_1000() -> None:
    server = make_server()
    connections: List[Any] = []
    server.register("who", lambda ctx, message: connections.append(ctx.connection))
    with running(server):
        with Client.connect(server.url) as client:
            client.send('{"Route":"who"}')  # no reply: the handler returns None
            assert client.call("echo", 1) == b"1"
            assert not client.closed and client.close_code is None
        assert client.closed and client.close_code == 1000
        assert "closed" in repr(client)
        (connection,) = connections
        assert connection.closed.wait(TIMEOUT)
        assert connection.close_code == 1000
        with pytest.raises(ConnectionClosed) as info:
            client.send("more")
        assert info.value.code == 1000
        with pytest.raises(ConnectionClosed):
            client.receive(TIMEOUT)
        client.close()  # idempotent


def test_close_from_another_thread_wakes_a_waiting_receive() -> None:
    with running(make_server()) as server:
        client = Client.connect(server.url)
        outcome: List[BaseException] = []

        def waiter() -> None:
            try:
                client.receive()
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=waiter)
        thread.start()
        client.close()
        thread.join(TIMEOUT)
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionClosed)
        assert outcome[0].code == 1000


def test_close_with_a_code_and_reason() -> None:
    server = make_server()
    connections: List[Any] = []

    @server.route("who")
    def who(ctx: Any, message: bytes) -> str:
        connections.append(ctx.connection)
        return "ok"

    with running(server):
        client = Client.connect(server.url)
        assert client.call("who") == b"ok"
        client.close(4000, "done here")
        assert connections[0].closed.wait(TIMEOUT)
        assert (connections[0].close_code, connections[0].close_reason) == (4000, "done here")


def test_close_does_not_wait_forever_for_a_silent_server() -> None:
    stop = threading.Event()

    def script(sock: socket.socket) -> None:
        stop.wait(TIMEOUT)  # never reads, never answers the Close

    with raw_server(script) as url:
        client = Client.connect(url, timeout=0.2)
        started = time.monotonic()
        client.close()
        assert time.monotonic() - started < TIMEOUT / 2
        assert client.closed
        stop.set()


def test_send_to_a_server_that_stops_reading_times_out() -> None:
    stop = threading.Event()
    listener_options = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]

    def script(sock: socket.socket) -> None:
        stop.wait(TIMEOUT)  # never reads

    with raw_server(script, listener_options=listener_options) as url:
        client = Client.connect(url, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(ClientTimeout):
            client.send(b"x" * (8 << 20))  # more than the kernel buffers hold
        assert time.monotonic() - started < TIMEOUT
        assert client.closed
        with pytest.raises(ConnectionClosed):
            client.send("more")
        client.close()
        stop.set()


def test_wss_send_to_a_server_that_stops_reading_times_out(tls: Any) -> None:
    """TLS writes are bounded by ``timeout`` too (they used to wait for ever)."""
    server_ctx, client_ctx = tls
    server = make_server()
    release = threading.Event()

    @server.route("stall")
    def stall(ctx: Any, message: bytes) -> None:
        release.wait(TIMEOUT)  # the connection's thread reads nothing meanwhile

    server.start("127.0.0.1:0", ssl_context=server_ctx)
    try:
        client = Client.connect(server.url, ssl_context=client_ctx, timeout=0.5)
        client.send({"Route": "stall"})
        started = time.monotonic()
        with pytest.raises(ClientTimeout):
            client.send(b"x" * (32 << 20))  # more than the kernel buffers hold
        assert time.monotonic() - started < TIMEOUT
        assert client.closed
        client.close()
    finally:
        release.set()
        server.close(timeout=TIMEOUT)


def test_wss_reads_and_writes_from_several_threads_at_once(tls: Any) -> None:
    """The reader thread takes pushes while four threads send: every message arrives,
    whole, in each sender's order (one OpenSSL call at a time: sharedtls.py)."""
    server_ctx, client_ctx = tls
    server = make_server()

    @server.route("flood")
    def flood(ctx: Any, message: bytes) -> None:
        for i in range(300):
            ctx.send({"push": i, "pad": "p" * 3000})

    server.start("127.0.0.1:0", ssl_context=server_ctx)
    try:
        with Client.connect(server.url, ssl_context=client_ctx) as client:
            client.send({"Route": "flood"})

            def sender(n: int) -> None:
                for i in range(100):
                    client.send({"Route": "echo", "Params": [n, i, "q" * 2000]})

            threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            pushes: List[int] = []
            echoes: Dict[int, List[int]] = {n: [] for n in range(4)}
            for _ in range(300 + 400):
                message = json.loads(client.receive(TIMEOUT))
                if isinstance(message, dict):
                    pushes.append(message["push"])
                else:
                    echoes[message[0]].append(message[1])
            for thread in threads:
                thread.join(TIMEOUT)
            assert not any(thread.is_alive() for thread in threads)
        assert pushes == list(range(300))
        assert echoes == {n: list(range(100)) for n in range(4)}
    finally:
        server.close(timeout=TIMEOUT)


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_both_sides_writing_more_than_the_buffers_hold(scheme: str, request: Any) -> None:
    """A handler pushes 16 MiB while another thread of the client sends 8 MiB: the
    reader keeps taking pushes while that send waits for the server, so each side
    ends up reading the other. (The reader used to wait for the sender's lock: nobody
    read, and the server's write_timeout dropped the connection with 1006.)"""
    server = make_server(write_timeout=TIMEOUT)
    chunk = "p" * (256 << 10)

    @server.route("flood")
    def flood(ctx: Any, message: bytes) -> None:
        for i in range(64):
            ctx.send({"push": i, "pad": chunk})

    ssl_options: Dict[str, Any] = {}
    if scheme == "wss":
        server_ctx, client_ctx = request.getfixturevalue("tls")
        ssl_options = {"ssl_context": client_ctx}
        server.start("127.0.0.1:0", ssl_context=server_ctx)
    else:
        server.start("127.0.0.1:0")
    try:
        with Client.connect(server.url, **ssl_options) as client:
            client.send({"Route": "flood"})
            errors: List[BaseException] = []

            def sender() -> None:
                try:
                    for i in range(32):
                        client.send({"Route": "echo", "Params": [i, chunk]})
                except BaseException as exc:  # reported below
                    errors.append(exc)

            thread = threading.Thread(target=sender)
            thread.start()
            pushes: List[int] = []
            echoes: List[int] = []
            started = time.monotonic()
            for _ in range(64 + 32):
                message = json.loads(client.receive(TIMEOUT))
                if isinstance(message, dict):
                    pushes.append(message["push"])
                else:
                    echoes.append(message[0])
            thread.join(TIMEOUT)
            assert not thread.is_alive()
            assert errors == []
            # Far below write_timeout: nobody waited for it to run out.
            assert time.monotonic() - started < TIMEOUT / 2
        assert pushes == list(range(64))
        assert echoes == list(range(32))
    finally:
        server.close(timeout=TIMEOUT)


def test_ping_answered_after_the_frame_being_written() -> None:
    """A Ping that comes while a send waits for the server: the message after it is
    delivered at once, and the Pong goes out after the frame in progress, whole."""
    sending = threading.Event()
    delivered = threading.Event()
    big = 8 << 20
    seen: List[Tuple[int, bytes]] = []

    def script(sock: socket.socket) -> None:
        head = _read_exact(sock, 2)  # the big frame has started; read no more for now
        sending.set()
        sock.sendall(bytes([0x89, 2]) + b"hi" + bytes([0x81, 2]) + b"go")
        assert delivered.wait(TIMEOUT), "the client stopped reading while it was sending"
        assert head == bytes([0x82, 0xFF])  # binary, masked, 64-bit length
        length = struct.unpack("!Q", _read_exact(sock, 8))[0]
        mask = _read_exact(sock, 4)
        _read_exact(sock, length)
        seen.append((0x2, mask))
        seen.append(read_client_frame(sock))  # the Pong, after the whole frame
        sock.sendall(close_frame(1000))
        seen.append(read_client_frame(sock))

    listener_options = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    with raw_server(script, listener_options=listener_options) as url:
        client = Client.connect(url, timeout=TIMEOUT)
        thread = threading.Thread(target=client.send, args=(b"x" * big,))
        thread.start()
        assert sending.wait(TIMEOUT)
        assert client.receive(TIMEOUT) == "go"
        delivered.set()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        with pytest.raises(ConnectionClosed) as info:
            client.receive(TIMEOUT)
        assert info.value.code == 1000
        client.close()
    assert [opcode for opcode, _ in seen] == [0x2, 0xA, 0x8]
    assert seen[1][1] == b"hi"


def test_reader_gives_up_when_the_server_takes_no_pongs() -> None:
    """The reader writes its pongs without blocking; when the server takes none of them
    for ``timeout`` seconds, the client is dropped (1006), as a writer's send would be."""
    ping = bytes([0x89, 125]) + b"p" * 125

    def script(sock: socket.socket) -> None:
        # Never reads: pings until the client hangs up.
        try:
            for _ in range(200_000):
                sock.sendall(ping * 64)
        except OSError:
            return
        raise AssertionError("the client kept answering a server that reads nothing")

    listener_options = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    with raw_server(script, listener_options=listener_options) as url:
        client = Client.connect(url, timeout=0.5)
        with pytest.raises(ConnectionClosed) as info:
            client.receive(TIMEOUT)
        assert info.value.code == 1006
        assert client.closed
        with pytest.raises(ConnectionClosed):
            client.send("more")
        client.close()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_client_under_contention_against_python_websockets(scheme: str, request: Any) -> None:
    """Four threads send while python-websockets' server pushes and pings: it parses
    every frame the client writes, so a pong or Close cut into a data frame, or a
    frame torn in two, fails the connection there. Every message arrives, in order,
    every ping is answered, and the close is clean."""
    from websockets.sync.server import ServerConnection as WSServerConnection, serve

    chunk = "q" * (64 << 10)
    senders, per_sender, pushes = 4, 40, 120
    seen: Dict[int, List[int]] = {n: [] for n in range(senders)}
    answered: List[bool] = []
    errors: List[BaseException] = []

    def handler(ws: WSServerConnection) -> None:
        def pusher() -> None:
            try:
                pongs = []
                for i in range(pushes):
                    ws.send(json.dumps({"push": i, "pad": chunk}))
                    if i % 10 == 0:
                        pongs.append(ws.ping(str(i)))
                answered.extend(pong.wait(TIMEOUT) for pong in pongs)
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        thread = threading.Thread(target=pusher)
        thread.start()
        for _ in range(senders * per_sender):
            n, i, _pad = json.loads(ws.recv(TIMEOUT))
            seen[n].append(i)
        thread.join(TIMEOUT)
        ws.send("done")
        for _ in ws:  # until the client's Close
            pass

    ssl_options: Dict[str, Any] = {}
    server_ssl = None
    if scheme == "wss":
        server_ssl, client_ctx = request.getfixturevalue("tls")
        ssl_options = {"ssl_context": client_ctx}
    with serve(handler, "127.0.0.1", 0, ssl=server_ssl, max_size=None) as ws_server:
        thread = threading.Thread(target=ws_server.serve_forever)
        thread.start()
        try:
            port = ws_server.socket.getsockname()[1]
            with Client.connect(f"{scheme}://127.0.0.1:{port}/", **ssl_options) as client:

                def sender(n: int) -> None:
                    for i in range(per_sender):
                        client.send([n, i, chunk])

                threads = [threading.Thread(target=sender, args=(n,)) for n in range(senders)]
                for each in threads:
                    each.start()
                got = [json.loads(client.receive(TIMEOUT))["push"] for _ in range(pushes)]
                assert client.receive(TIMEOUT) == "done"
                for each in threads:
                    each.join(TIMEOUT)
                assert not any(each.is_alive() for each in threads)
            assert client.close_code == 1000
        finally:
            ws_server.shutdown()
            thread.join(TIMEOUT)
    # serve_forever leaves its selector (an epoll fd) in a reference cycle: collect it,
    # or the fd check after the test counts it as ours.
    gc.collect()
    assert errors == []
    assert got == list(range(pushes))
    assert seen == {n: list(range(per_sender)) for n in range(senders)}
    assert answered == [True] * len(range(0, pushes, 10))
