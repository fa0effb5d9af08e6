"""The server over real sockets: routing, errors, limits, lifecycle, concurrency."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from typing import Any, List

import pytest
import websocket  # websocket-client, a second client library that is not ours
from websockets.exceptions import ConnectionClosed as WSClosed
from websockets.sync.client import connect

from conftest import TIMEOUT, ListHandler, make_server, running
from rawclient import OP_BINARY, OP_TEXT, RawClient, encode_frame, handshake_request
from wsroute_sync import HandlerError, Server, error_envelope


def url(server: Server, path: str = "/") -> str:
    host, port = server.address
    return f"ws://{host}:{port}{path}"


def call(ws: Any, message: Any) -> Any:
    ws.send(message)
    return ws.recv(timeout=TIMEOUT)


# Round trips and reply types.


def test_echo_round_trip(server: Server) -> None:
    with connect(url(server)) as ws:
        assert call(ws, '{"Route":"echo","Params":{"message":"Hello, WebSocket!"}}') == (
            '{"message":"Hello, WebSocket!"}'
        )


def test_binary_request_gets_binary_reply(server: Server) -> None:
    with connect(url(server)) as ws:
        assert call(ws, b'{"Route":"echo","Params":[1,"\xc3\xa9"]}') == b'[1,"\xc3\xa9"]'


def test_messages_of_every_size_across_read_boundaries(server: Server) -> None:
    # Reads go into a 1 KiB buffer, grow while they come back full, and shrink again:
    # frames that end exactly at, straddle, or dwarf a read must all arrive whole.
    prefix = b'{"Route":"echo","Params":'

    def request(size: int) -> bytes:  # an envelope of exactly ``size`` bytes
        return prefix + b'"' + b"x" * (size - len(prefix) - 3) + b'"}'

    def reply(envelope: bytes) -> str:
        return envelope[len(prefix):-1].decode()

    with RawClient.connect(server.address) as client:
        # Frame sizes (header 8 bytes from 126 on): 1024 exactly, one more, one less,
        # then the same around 2048 (the fast path's largest frame) and 4096...
        for size in (1016, 1017, 1015, 1024, 2040, 2041, 2039, 2048, 300_000, 40, 4096,
                     4088, 1016):
            client.send_frame(OP_TEXT, request(size))
            assert client.recv_text() == reply(request(size)), size
        # Many frames in one write: the first read ends inside a frame.
        batch = [request(100 + i) for i in range(60)]
        client.send_raw(b"".join(encode_frame(OP_TEXT, r) for r in batch))
        for envelope in batch:
            assert client.recv_text() == reply(envelope)


def test_interop_with_websocket_client(server: Server) -> None:
    ws = websocket.create_connection(url(server), timeout=TIMEOUT)
    try:
        ws.send('{"route":"echo","params":{"n":1}}')
        assert ws.recv() == '{"n":1}'
        ws.send_binary(b'{"Route":"nope"}')
        opcode, data = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_BINARY
        assert data == b'{"code":1,"msg":"unknown route: nope","data":null}'
    finally:
        ws.close()


@pytest.mark.parametrize(
    "params, expected",
    [
        ("null", "null"),
        ("true", "true"),
        ("3.5", "3.5"),
        ('"text é"', '"text é"'),
        ("[1,[2,{}]]", "[1,[2,{}]]"),
        # Params reach the handler as the client spelled them, spaces and all.
        ('{"a": {"b": [1, 2]}}', '{"a": {"b": [1, 2]}}'),
    ],
)
def test_params_of_every_json_type_reach_the_handler(params: str, expected: str) -> None:
    seen: List[Any] = []
    srv = make_server()

    @srv.route("probe")
    def probe(ctx: Any, message: bytes) -> bytes:
        seen.append(ctx.params)
        return message

    with running(srv), connect(url(srv)) as ws:
        assert call(ws, '{"Route":"probe","Params":' + params + "}") == expected
    assert seen == [json.loads(params)]


def test_absent_params_is_null(server: Server) -> None:
    with connect(url(server)) as ws:
        assert call(ws, '{"Route":"echo"}') == "null"


def test_keys_match_case_insensitively_like_encoding_json(server: Server) -> None:
    with connect(url(server)) as ws:
        assert call(ws, '{"ROUTE":"echo","pArAmS":[7]}') == "[7]"
        # Several spellings: the last one wins, as in Go.
        assert call(ws, '{"route":"nope","Route":"echo","Params":1}') == "1"


def test_handler_results_are_encoded_by_type() -> None:
    srv = make_server()
    srv.register("str", lambda ctx, m: "héllo")
    srv.register("dict", lambda ctx, m: {"a": [1, "é"]})
    srv.register("none", lambda ctx, m: None)
    srv.register("bytearray", lambda ctx, m: bytearray(b"ab"))
    with running(srv), connect(url(srv)) as ws:
        assert call(ws, '{"Route":"str"}') == "héllo"
        assert call(ws, b'{"Route":"str"}') == "héllo".encode()
        assert call(ws, '{"Route":"dict"}') == '{"a":[1,"é"]}'
        assert call(ws, '{"Route":"bytearray"}') == "ab"
        ws.send('{"Route":"none"}')  # no reply: the next reply is the echo's
        assert call(ws, '{"Route":"echo","Params":2}') == "2"


def test_handler_object_with_handle_method() -> None:
    class CommHandler:
        def handle(self, ctx: Any, message: bytes) -> bytes:
            return b"handled " + message

    srv = make_server()
    srv.register("obj", CommHandler())
    with running(srv), connect(url(srv)) as ws:
        assert call(ws, '{"Route":"obj","Params":1}') == "handled 1"


# Error envelopes, byte for byte, and the connection stays usable after each.

ERROR_CASES = [
    ("not json", b'{"code":1,"msg":"invalid JSON: Expecting value at position 0","data":null}'),
    ('{"Route":"echo"', b'{"code":1,"msg":"invalid JSON: Expecting \',\' delimiter at position 15",'
                        b'"data":null}'),
    ("[1,2]", b'{"code":1,"msg":"invalid request: expected a JSON object","data":null}'),
    ('"echo"', b'{"code":1,"msg":"invalid request: expected a JSON object","data":null}'),
    ('{"Params":{}}', b'{"code":1,"msg":"invalid request: missing \\"Route\\"","data":null}'),
    ('{"Route":42}', b'{"code":1,"msg":"invalid request: \\"Route\\" must be a string",'
                     b'"data":null}'),
    ('{"Route":null}', b'{"code":1,"msg":"invalid request: \\"Route\\" must be a string",'
                       b'"data":null}'),
    ('{"Route":"missing"}', b'{"code":1,"msg":"unknown route: missing","data":null}'),
    ('{"Route":"chosen"}', b'{"code":1,"msg":"not allowed: quota","data":null}'),
    ('{"Route":"crash"}', b'{"code":1,"msg":"internal error","data":null}'),
    ('{"Route":"bad_result"}', b'{"code":1,"msg":"internal error","data":null}'),
    ('{"Route":"bad_utf8"}', b'{"code":1,"msg":"internal error","data":null}'),
]


def _error_server(handler: ListHandler) -> Server:
    logger = logging.getLogger("test.errors")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    srv = make_server(logger=logger)

    @srv.route("chosen")
    def chosen(ctx: Any, message: bytes) -> None:
        raise HandlerError("not allowed: quota")

    @srv.route("crash")
    def crash(ctx: Any, message: bytes) -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    srv.register("bad_result", lambda ctx, m: {1, 2})
    srv.register("bad_utf8", lambda ctx, m: b"\xff\xfe")
    return srv


@pytest.mark.parametrize("request_text, envelope", ERROR_CASES)
def test_error_envelopes_byte_for_byte(request_text: str, envelope: bytes) -> None:
    handler = ListHandler()
    with running(_error_server(handler)) as srv:
        with RawClient.connect(srv.address) as client:
            client.send_text(request_text)
            opcode, payload = client.recv_message()
            assert (opcode, payload) == (OP_TEXT, envelope)
            assert json.loads(payload)["code"] == 1
            # The connection is still usable after the error.
            client.send_text('{"Route":"echo","Params":"still here"}')
            assert client.recv_text() == '"still here"'
            # A binary request gets the same envelope as a binary frame, except that
            # non-UTF-8 bytes are a fine binary reply: only text frames must be UTF-8.
            client.send_frame(OP_BINARY, request_text.encode())
            expected = b"\xff\xfe" if "bad_utf8" in request_text else envelope
            assert client.recv_message() == (OP_BINARY, expected)


def test_unexpected_handler_failure_is_logged_with_traceback_and_not_leaked() -> None:
    handler = ListHandler()
    with running(_error_server(handler)) as srv, connect(url(srv)) as ws:
        reply = call(ws, '{"Route":"crash"}')
    assert "secret" not in reply
    errors = [r for r in handler.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is RuntimeError
    assert "crash" in errors[0].getMessage()


def test_error_envelope_helper_matches_the_seed() -> None:
    assert error_envelope('bad "x"') == '{"code":1,"msg":"bad \\"x\\"","data":null}'


def test_unknown_route_name_is_cut_in_the_message(server: Server) -> None:
    with connect(url(server)) as ws:
        reply = json.loads(call(ws, json.dumps({"Route": "r" * 500_000})))
    assert reply["msg"] == "unknown route: " + "r" * 100 + "..."


def test_messages_on_one_connection_are_handled_in_order() -> None:
    srv = make_server()
    active = threading.Lock()
    order: List[int] = []

    @srv.route("seq")
    def seq(ctx: Any, message: bytes) -> bytes:
        assert active.acquire(blocking=False), "two messages of one connection at once"
        try:
            order.append(ctx.params)
            return message
        finally:
            active.release()

    with running(srv), RawClient.connect(srv.address) as client:
        # Sent back to back in one write: the server must still take them one by one.
        client.send_raw(b"".join(
            __import__("rawclient").encode_frame(OP_TEXT, b'{"Route":"seq","Params":%d}' % i)
            for i in range(50)
        ))
        replies = [client.recv_text() for _ in range(50)]
    assert replies == [str(i) for i in range(50)]
    assert order == list(range(50))


# The context.


def test_context_carries_the_request_and_connection() -> None:
    srv = make_server()
    seen: dict = {}

    @srv.route("ctx")
    def ctx_route(ctx: Any, message: bytes) -> str:
        ctx.values["count"] = ctx.values.get("count", 0) + 1
        seen.update(
            route=ctx.route, id=ctx.connection_id, remote=ctx.remote_address, path=ctx.path,
            query=ctx.query, qp=ctx.query_params, header=ctx.headers.get("x-test"),
            server=ctx.server, count=ctx.values["count"], closed=ctx.closed.is_set(),
            time_left=ctx.time_left(),
        )
        return "ok"

    with running(srv):
        with connect(url(srv, "/chat/room1?user=ann&x=1"),
                     additional_headers={"X-Test": "yes"}) as ws:
            call(ws, '{"Route":"ctx"}')
            call(ws, '{"Route":"ctx"}')
            local = ws.socket.getsockname()
    assert seen["route"] == "ctx"
    assert seen["path"] == "/chat/room1" and seen["query"] == "user=ann&x=1"
    assert seen["qp"] == {"user": ["ann"], "x": ["1"]}
    assert seen["header"] == "yes"
    assert seen["server"] is srv
    assert seen["count"] == 2  # values persist across messages of the connection
    assert seen["remote"][:2] == local[:2]
    assert seen["closed"] is False
    assert seen["time_left"] is None  # make_server switches handler_timeout off


def test_handler_deadline_is_on_ctx_and_overruns_are_logged() -> None:
    handler = ListHandler()
    logger = logging.getLogger("test.deadline")
    logger.addHandler(handler)
    logger.propagate = False
    srv = make_server(logger=logger, handler_timeout=0.05)
    done = threading.Event()

    @srv.route("slow")
    def slow(ctx: Any, message: bytes) -> str:
        left = ctx.time_left()
        assert 0 < left <= 0.05
        done.wait(0.2)  # overruns its 50 ms deadline on purpose
        assert ctx.expired
        return "late"

    with running(srv), connect(url(srv)) as ws:
        assert call(ws, '{"Route":"slow"}') == "late"
    assert any("overran" in m for m in handler.messages(logging.WARNING))


def test_ctx_send_pushes_extra_messages_and_closed_event_is_set() -> None:
    srv = make_server()
    events: List[threading.Event] = []

    @srv.route("subscribe")
    def subscribe(ctx: Any, message: bytes) -> str:
        events.append(ctx.closed)
        for i in range(3):
            ctx.send({"tick": i})
        ctx.send(b"\x00bin")
        return "subscribed"

    with running(srv):
        with connect(url(srv)) as ws:
            ws.send('{"Route":"subscribe"}')
            got = [ws.recv(timeout=TIMEOUT) for _ in range(5)]
        assert events[0].wait(TIMEOUT)
    assert got == ['{"tick":0}', '{"tick":1}', '{"tick":2}', b"\x00bin", "subscribed"]


def test_push_from_another_thread() -> None:
    srv = make_server()
    connected = threading.Event()
    conns: List[Any] = []

    @srv.route("hello")
    def hello(ctx: Any, message: bytes) -> str:
        conns.append(ctx.connection)
        connected.set()
        return "hi"

    with running(srv), connect(url(srv)) as ws:
        assert call(ws, '{"Route":"hello"}') == "hi"
        assert connected.wait(TIMEOUT)
        pusher = threading.Thread(target=lambda: conns[0].send("pushed"))
        pusher.start()
        pusher.join()
        assert ws.recv(timeout=TIMEOUT) == "pushed"
        assert [c.id for c in srv.connections] == [conns[0].id]


# Registry.


def test_register_replaces_unregister_removes_and_decorator_works(server: Server) -> None:
    with connect(url(server)) as ws:
        server.register("v", lambda ctx, m: "one")
        assert call(ws, '{"Route":"v"}') == "one"
        server.register("v", lambda ctx, m: "two")  # documented: replaces
        assert call(ws, '{"Route":"v"}') == "two"
        server.unregister("v")
        assert json.loads(call(ws, '{"Route":"v"}'))["msg"] == "unknown route: v"

        @server.route("deco")
        def deco(ctx: Any, message: bytes) -> str:
            return "decorated"

        assert call(ws, '{"Route":"deco"}') == "decorated"
    with pytest.raises(KeyError):
        server.unregister("never")
    with pytest.raises(TypeError):
        server.register("x", 42)
    with pytest.raises(TypeError):
        server.register(1, lambda c, m: m)  # type: ignore[arg-type]
    assert set(server.routes) == {"echo", "deco"}


def test_register_and_unregister_while_twenty_clients_hammer(server: Server) -> None:
    stop = threading.Event()
    failures: List[str] = []
    counts = [0] * 20

    def client(i: int) -> None:
        with connect(url(server)) as ws:
            n = 0
            while not stop.is_set() and n < 2000:
                n += 1
                ws.send('{"Route":"echo","Params":%d}' % n)
                reply = ws.recv(timeout=TIMEOUT)
                if reply != str(n):
                    failures.append(reply)
                ws.send('{"Route":"flip"}')
                reply = ws.recv(timeout=TIMEOUT)
                if reply not in ('"flipped"', '{"code":1,"msg":"unknown route: flip","data":null}'):
                    failures.append(reply)
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    # Flip the registry until every client has made 100 round trips through it.
    k = 0
    while min(counts) < 100 and any(t.is_alive() for t in threads):
        k += 1
        server.register("flip", lambda ctx, m: "flipped")
        server.register(f"temp{k}", lambda ctx, m: m)
        server.unregister("flip")
        server.unregister(f"temp{k}")
        threads[k % 20].join(0.001)  # let the clients run between flips
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert all(c > 0 for c in counts)


def test_a_handler_that_replaces_routes_finishes_and_the_next_message_sees_them(
    server: Server,
) -> None:
    # Lookups read a published copy of the registry: a change made while a handler
    # runs must neither disturb that handler nor be missed by the next message.
    def first(ctx: Any, message: bytes) -> str:
        server.register("v", lambda c, m: "second")
        server.register("added", lambda c, m: "added")
        server.unregister("echo")
        return "first"

    server.register("v", first)
    with connect(url(server)) as ws:
        assert call(ws, '{"Route":"v"}') == "first"
        assert call(ws, '{"Route":"v"}') == "second"
        assert call(ws, '{"Route":"added"}') == "added"
        assert json.loads(call(ws, '{"Route":"echo","Params":1}'))["msg"] == "unknown route: echo"
    with connect(url(server)) as ws:  # a new connection sees the same routes
        assert call(ws, '{"Route":"v"}') == "second"
    assert sorted(server.routes) == ["added", "v"]


def test_hundred_clients_two_hundred_messages_each(server: Server) -> None:
    errors: List[str] = []

    def client(i: int) -> None:
        try:
            with connect(url(server)) as ws:
                for n in range(200):
                    payload = json.dumps({"client": i, "n": n, "text": "é" * (n % 7)})
                    reply = call(ws, '{"Route":"echo","Params":' + payload + "}")
                    if json.loads(reply) != json.loads(payload):
                        errors.append(reply)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# Limits.


def test_connection_over_the_limit_gets_503_and_is_admitted_once_one_leaves() -> None:
    handler = ListHandler()
    logger = logging.getLogger("test.limit")
    logger.addHandler(handler)
    logger.propagate = False
    with running(make_server(max_connections=3, logger=logger)) as srv:
        stack = contextlib.ExitStack()
        clients = [stack.enter_context(connect(url(srv))) for _ in range(3)]
        with RawClient(srv.address) as extra:
            extra.send_raw(handshake_request("x"))
            assert extra.read_response() == 503
            assert extra.body == b"Too many connections\n"
            assert extra.headers["retry-after"].isdigit()
        assert srv.stats()["rejected"] == 1
        assert any("too many connections" in m for m in handler.messages(logging.WARNING))
        with pytest.raises(Exception):
            connect(url(srv), open_timeout=TIMEOUT)  # websockets reports the 503
        clients.pop().close()  # leaves; the exit stack closing it again is a no-op

        def admitted() -> bool:
            try:
                with connect(url(srv), open_timeout=TIMEOUT) as ws:
                    return call(ws, '{"Route":"echo","Params":1}') == "1"
            except Exception:
                return False

        # The slot comes back when the leaving client's thread has finished.
        from conftest import _wait_for
        assert _wait_for(admitted)
        stack.close()


def test_non_upgrade_request_gets_426() -> None:
    with running(make_server()) as srv:
        with RawClient(srv.address) as client:
            client.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.read_response() == 426
            assert client.headers["upgrade"] == "websocket"
            assert b"WebSocket" in client.body
            assert client.at_eof()


def test_path_option_restricts_upgrades_like_the_go_original() -> None:
    with running(make_server(path="/ws")) as srv:
        with connect(url(srv, "/ws")) as ws:
            assert call(ws, '{"Route":"echo","Params":1}') == "1"
        with RawClient(srv.address) as client:
            client.send_raw(handshake_request("x", "/other"))
            assert client.read_response() == 404


# Lifecycle.


def test_close_with_fifty_open_clients() -> None:
    srv = make_server()
    returned = threading.Event()

    def serve() -> None:
        srv.serve("127.0.0.1:0")
        returned.set()

    runner = threading.Thread(target=serve)
    runner.start()
    from conftest import _wait_for
    assert _wait_for(lambda: srv.address is not None)
    stack = contextlib.ExitStack()
    clients = [stack.enter_context(connect(url(srv))) for _ in range(50)]
    for ws in clients:
        assert call(ws, '{"Route":"echo","Params":0}') == "0"
    srv.close(timeout=TIMEOUT)
    assert returned.wait(TIMEOUT)
    runner.join()
    codes = []
    for ws in clients:
        with pytest.raises(WSClosed) as info:
            ws.recv(timeout=TIMEOUT)
        codes.append(info.value.rcvd.code if info.value.rcvd else None)
    stack.close()
    assert codes == [1001] * 50
    assert srv.connections == []
    assert not [t for t in threading.enumerate() if t.name.startswith("wsroute_sync-conn")]


def test_close_is_idempotent_and_callable_from_a_handler() -> None:
    srv = make_server()
    closing = threading.Event()

    @srv.route("shutdown")
    def shutdown(ctx: Any, message: bytes) -> str:
        ctx.server.close()
        closing.set()
        return "bye"

    srv.start()
    with connect(url(srv)) as ws:
        ws.send('{"Route":"shutdown"}')
        with pytest.raises(WSClosed) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert closing.wait(TIMEOUT)
    assert srv.wait_closed(TIMEOUT)
    srv.close()
    srv.close(timeout=0)


def test_context_manager_closes() -> None:
    with make_server() as srv:
        srv.start()
        with connect(url(srv)) as ws:
            assert call(ws, '{"Route":"echo","Params":1}') == "1"
    assert srv.wait_closed(0)
    with pytest.raises(RuntimeError):
        srv.start()


@pytest.mark.parametrize("addr", ["127.0.0.1:0", ":0", "localhost:0"])
def test_address_forms(addr: str) -> None:
    with running(make_server(), addr) as srv:
        port = srv.address[1]
        assert port > 0
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            assert call(ws, '{"Route":"echo","Params":1}') == "1"


def test_ipv6_address() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"::1 is not available: {exc}")
    with running(make_server(), "[::1]:0") as srv:
        assert srv.url.startswith("ws://[::1]:")
        with connect(srv.url) as ws:
            assert call(ws, '{"Route":"echo","Params":6}') == "6"


@pytest.mark.parametrize("addr", ["8080", "host:port", "::1:80", "1.2.3.4:70000", "unix:"])
def test_bad_addresses_are_refused(addr: str) -> None:
    srv = make_server()
    with pytest.raises(ValueError):
        srv.start(addr)
    srv.close()


def test_serve_raises_when_the_port_is_taken(server: Server) -> None:
    other = make_server()
    with pytest.raises(OSError):
        other.serve(f"127.0.0.1:{server.address[1]}")
    other.close()


def test_custom_logger_receives_lifecycle_records() -> None:
    handler = ListHandler()
    logger = logging.getLogger("test.custom")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    with running(make_server(logger=logger)) as srv, connect(url(srv)) as ws:
        call(ws, '{"Route":"echo"}')
    messages = handler.messages(logging.INFO)
    assert any(m.startswith("server listening on ws://127.0.0.1:") for m in messages)
    assert "server closing" in messages
    assert any(m.startswith("server closed") for m in messages)
    assert logging.getLogger("wsroute_sync.server").handlers == []
