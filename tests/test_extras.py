"""Around the server: stats and metrics, health, broadcast, TLS and Unix sockets."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from typing import Any, Iterator, List

import pytest
from websockets.exceptions import ConnectionClosed as WSClosed
from websockets.sync.client import connect, unix_connect

from conftest import TIMEOUT, ListHandler, _wait_for, make_server, running
from rawclient import RawClient, handshake_request
from wsroute_sync import HandlerError, Server
from wsroute_sync.http import Headers, HTTPRequest


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.address[1]}/"


def http_get(server: Server, path: str) -> RawClient:
    client = RawClient(server.address)
    client.send_raw(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    client.read_response()
    return client


def test_stats_count_messages_errors_and_latency() -> None:
    srv = make_server()

    @srv.route("fail")
    def fail(ctx: Any, message: bytes) -> None:
        raise HandlerError("no")

    with running(srv):
        with connect(url(srv)) as ws:
            for message in ['{"Route":"echo","Params":1}', '{"Route":"echo"}', "bad",
                            '{"Route":"nope"}', '{"Route":"fail"}']:
                ws.send(message)
                ws.recv(timeout=TIMEOUT)
            live = srv.stats()
            assert live["active"] == 1 and live["messages_in"] == 5
        assert _wait_for(lambda: srv.stats()["active"] == 0)
        stats = srv.stats()
    assert stats["accepted"] == 1 and stats["rejected"] == 0
    assert stats["messages_in"] == 5 and stats["messages_out"] == 5
    assert stats["errors"] == {"handler_error": 1, "invalid_json": 1, "unknown_route": 1}
    assert stats["handler_latency"]["echo"]["count"] == 2
    assert stats["handler_latency"]["fail"]["count"] == 1
    assert stats["handler_latency"]["echo"]["buckets"]["+Inf"] == 2


def test_metrics_endpoint_speaks_prometheus_text() -> None:
    with running(make_server()) as srv:
        with connect(url(srv)) as ws:
            ws.send('{"Route":"echo","Params":1}')
            ws.recv(timeout=TIMEOUT)
            ws.send('{"Route":"x\\"y"}')
            ws.recv(timeout=TIMEOUT)
            with http_get(srv, "/metrics") as client:
                assert client.status == 200
                assert client.headers["content-type"].startswith("text/plain; version=0.0.4")
                text = client.body.decode()
    lines = text.splitlines()
    assert "# TYPE wsroute_sync_connections_active gauge" in lines
    # The WebSocket client and the metrics request itself are open.
    assert "wsroute_sync_connections_active 2" in lines
    assert "wsroute_sync_messages_in_total 2" in lines
    assert 'wsroute_sync_errors_total{kind="unknown_route"} 1' in lines
    assert 'wsroute_sync_handler_seconds_count{route="echo"} 1' in lines
    assert 'wsroute_sync_handler_seconds_bucket{route="echo",le="+Inf"} 1' in lines
    for line in lines:
        assert line.startswith("#") or line.startswith("wsroute_sync_"), line


def test_health_endpoint_and_switching_endpoints_off() -> None:
    with running(make_server()) as srv:
        with http_get(srv, "/healthz") as client:
            assert client.status == 200
            assert client.headers["content-type"] == "application/json"
            body = json.loads(client.body)
        assert body == {"status": "ok", "active_connections": 1, "max_connections": 1000}
        srv._closing = True  # what a request arriving during close() sees
        try:
            request = HTTPRequest("GET", "/healthz", Headers([("host", "x")]))
            assert srv.http_answer(request).startswith(b"HTTP/1.1 503 ")
        finally:
            srv._closing = False
    with running(make_server(health_path=None, metrics_path=None)) as srv:
        for path in ("/healthz", "/metrics"):
            with http_get(srv, path) as client:
                assert client.status == 426


def test_register_http_serves_pages_and_reports_failures() -> None:
    srv = make_server()
    srv.register_http("/hello", lambda request: (200, "text/plain", f"hi {request.query}"))

    def broken(request: HTTPRequest) -> Any:
        raise RuntimeError("page bug")

    srv.register_http("/broken", broken)
    with running(srv):
        with http_get(srv, "/hello?x=1") as client:
            assert (client.status, client.body) == (200, b"hi x=1")
        with http_get(srv, "/broken") as client:
            assert client.status == 500 and b"page bug" not in client.body
    with pytest.raises(ValueError):
        srv.register_http("nope", lambda r: (200, "text/plain", ""))


@contextlib.contextmanager
def clients(server: Server, n: int) -> Iterator[List[Any]]:
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(connect(url(server))) for _ in range(n)]
        for ws in opened:  # make sure each is registered and past its handshake
            ws.send('{"Route":"echo","Params":0}')
            assert ws.recv(timeout=TIMEOUT) == "0"
        yield opened


def test_broadcast_reaches_every_open_connection_and_predicate_filters() -> None:
    srv = make_server()

    @srv.route("join")
    def join(ctx: Any, message: bytes) -> str:
        ctx.values["room"] = ctx.params
        return "joined"

    with running(srv), clients(srv, 5) as opened:
        for i, ws in enumerate(opened):
            ws.send(json.dumps({"Route": "join", "Params": "odd" if i % 2 else "even"}))
            assert ws.recv(timeout=TIMEOUT) == "joined"
        assert srv.broadcast({"news": 1}) == 5
        assert [ws.recv(timeout=TIMEOUT) for ws in opened] == ['{"news":1}'] * 5
        sent = srv.broadcast(b"odd only", predicate=lambda c: c.values.get("room") == "odd")
        assert sent == 2
        assert opened[1].recv(timeout=TIMEOUT) == b"odd only"
        assert opened[3].recv(timeout=TIMEOUT) == b"odd only"
        opened[0].close()
        assert _wait_for(lambda: len(srv.connections) == 4)
        assert srv.broadcast("after") == 4
        for ws in opened[1:]:
            assert ws.recv(timeout=TIMEOUT) == "after"


def test_broadcast_from_many_threads_interleaves_whole_messages() -> None:
    with running(make_server()) as srv, clients(srv, 3) as opened:
        threads = [threading.Thread(target=lambda i=i: [srv.broadcast(f"t{i}-{k}")
                                                        for k in range(50)]) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ws in opened:
            got = [ws.recv(timeout=TIMEOUT) for _ in range(200)]
            for i in range(4):
                assert [m for m in got if m.startswith(f"t{i}-")] == [
                    f"t{i}-{k}" for k in range(50)]


def test_a_slow_client_is_dropped_and_does_not_stall_the_others() -> None:
    handler = ListHandler()
    logger = logging.getLogger("test.broadcast")
    logger.addHandler(handler)
    logger.propagate = False
    srv = make_server(logger=logger)
    with running(srv), clients(srv, 3) as fast:
        slow = RawClient(srv.address)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.send_raw(handshake_request("x"))
        assert slow.read_response() == 101
        assert _wait_for(lambda: len(srv.connections) == 4)
        big = "z" * 200_000
        delivered = []
        # The slow client reads nothing: the buffers between us fill up. Linux grows a
        # socket's send buffer up to tcp_wmem's maximum (4 MiB by default), about 21 of
        # these broadcasts, before a write has to wait; 40 leaves room for other limits.
        for _ in range(40):
            started = time.monotonic()
            delivered.append(srv.broadcast(big, timeout=0.3))
            elapsed = time.monotonic() - started
            for ws in fast:
                assert ws.recv(timeout=TIMEOUT) == big
            if delivered[-1] == 3:
                break
        assert delivered[-1] == 3, delivered
        # The broadcast that dropped it kept to its timeout: it did not spin on the full
        # socket until something else (a keepalive Ping, once 20 s) broke the loop.
        assert elapsed < 0.3 + 1.0, f"broadcast(timeout=0.3) took {elapsed:.2f}s"
        assert _wait_for(lambda: len(srv.connections) == 3)
        assert slow.at_eof()
        slow.close()
        assert any("too slow to take a broadcast" in m for m in handler.messages(logging.WARNING))


def test_wss_with_a_self_signed_certificate(tls: Any) -> None:
    server_ctx, client_ctx = tls
    srv = make_server()
    srv.start("127.0.0.1:0", ssl_context=server_ctx)
    try:
        assert srv.url.startswith("wss://")
        with connect(srv.url, ssl=client_ctx) as ws:
            ws.send('{"Route":"echo","Params":{"secure":true}}')
            assert ws.recv(timeout=TIMEOUT) == '{"secure":true}'
            ws.send(b'{"Route":"echo","Params":"' + b"x" * 100_000 + b'"}')
            assert len(ws.recv(timeout=TIMEOUT)) == 100_002
        # A plain-text client on the TLS port fails its handshake and frees its slot.
        with RawClient(srv.address) as plain:
            plain.send_raw(handshake_request("x"))
            assert plain.at_eof()
        assert _wait_for(lambda: srv.active_connections == 0)
    finally:
        srv.close(timeout=TIMEOUT)


def test_server_close_reaches_tls_clients(tls: Any) -> None:
    server_ctx, client_ctx = tls
    srv = make_server()
    srv.start("127.0.0.1:0", ssl_context=server_ctx)
    with connect(srv.url, ssl=client_ctx) as ws:
        ws.send('{"Route":"echo","Params":1}')
        assert ws.recv(timeout=TIMEOUT) == "1"
        srv.close(timeout=TIMEOUT)
        with pytest.raises(WSClosed) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001


def test_unix_socket() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ws.sock")
        with running(make_server(), f"unix:{path}") as srv:
            assert srv.address == path
            with unix_connect(path, uri="ws://localhost/") as ws:
                ws.send('{"Route":"echo","Params":"over unix"}')
                assert ws.recv(timeout=TIMEOUT) == '"over unix"'
        assert not os.path.exists(path)  # removed on close


def test_basic_auth_and_identity_on_ctx() -> None:
    import base64

    from wsroute_sync import basic_auth

    srv = make_server(authenticate=basic_auth({"ann": "s3cret"}, realm="demo"))
    srv.register("whoami", lambda ctx, m: ctx.identity)

    def creds(user: str, password: str) -> dict:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    with running(srv):
        with connect(url(srv), additional_headers=creds("ann", "s3cret")) as ws:
            ws.send('{"Route":"whoami"}')
            assert ws.recv(timeout=TIMEOUT) == "ann"
        for extra in ([], [("Authorization", "Basic !!!")], [("Authorization", "Bearer x")],
                      list(creds("ann", "wrong").items()), list(creds("bob", "s3cret").items())):
            with RawClient(srv.address) as client:
                client.send_raw(handshake_request("x", extra=extra))
                assert client.read_response() == 401
                assert client.headers["www-authenticate"] == 'Basic realm="demo", charset="UTF-8"'
    with pytest.raises(TypeError):
        basic_auth()


def test_authenticate_hook_refusals() -> None:
    from wsroute_sync import HandshakeRejected

    def hook(request: HTTPRequest) -> Any:
        token = request.headers.get("x-token")
        if token == "boom":
            raise RuntimeError("hook bug")
        if token == "teapot":
            raise HandshakeRejected(418, "no coffee")
        return {"user": token} if token else None

    srv = make_server(authenticate=hook)
    srv.register("who", lambda ctx, m: ctx.identity)
    with running(srv):
        with connect(url(srv), additional_headers={"X-Token": "t1"}) as ws:
            ws.send('{"Route":"who"}')
            assert ws.recv(timeout=TIMEOUT) == '{"user":"t1"}'
        for extra, status in (([], 403), ([("X-Token", "teapot")], 418),
                              ([("X-Token", "boom")], 500)):
            with RawClient(srv.address) as client:
                client.send_raw(handshake_request("x", extra=extra))
                assert client.read_response() == status
                assert b"hook bug" not in client.body
