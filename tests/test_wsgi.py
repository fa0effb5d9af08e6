"""server.wsgi_app() inside real WSGI servers: gunicorn's gthread worker and werkzeug's
threaded server, each serving a Flask app wrapped the way the guide says.

gunicorn runs as a subprocess on 127.0.0.1 port 0 (its log names the port), importing
the Flask app from this module (``make_flask_app``) or the guide's example; werkzeug runs
in this process. gunicorn, Flask and werkzeug are in the ``test`` extra: a missing one
fails the import of this module, saying which, and nothing here is skipped.

Run as a script, this module is the server command for the Autobahn run through
gunicorn (``test_autobahn_groups_1_to_10_through_gunicorn``): it takes the harness's
``--host --port --max-message-size [--compression]`` and prints the harness's
``listening on ws://HOST:PORT/`` once gunicorn's worker has loaded the echo app.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import flask
import gunicorn  # noqa: F401  # the test extra; the server itself runs as a subprocess
import pytest
import trustme
from werkzeug.serving import make_server as make_werkzeug_server
from websockets.exceptions import ConnectionClosed as WSClosed
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conformance import harness
from conftest import TIMEOUT
from rawclient import OP_TEXT, RawClient, encode_frame, handshake_request
from wsroute_sync import Client, ConnectionClosed, HandlerError, HandshakeRejected, Server
from wsroute_sync.wsgi import WSGIApp, close_on_sigterm, request_from_environ

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
EXAMPLES = REPO / "examples"

ECHO = '{"Route":"echo","Params":{"n":1}}'


# --------------------------------------------------------------------------
# The Flask app every server here serves (gunicorn imports it from this module)


def make_flask_app(max_connections: int = 10, token: Optional[str] = None,
                   **options: Any) -> flask.Flask:
    """A Flask app with plain routes, and our routes on ``/ws`` in front of it.

    ``token``: upgrades must carry ``X-Token: <token>`` (the ``authenticate`` hook).
    """
    def authenticate(request: Any) -> Optional[str]:
        return "tester" if request.headers.get("x-token") == token else None

    server = Server(max_connections=max_connections, handler_timeout=None,
                    authenticate=authenticate if token is not None else None, **options)

    @server.route("echo")
    def echo(ctx: Any, message: bytes) -> bytes:
        return message

    @server.route("whoami")
    def whoami(ctx: Any, message: bytes) -> Dict[str, Any]:
        return {"path": ctx.path, "query": ctx.query_params, "test": ctx.headers.get("x-test"),
                "subprotocol": ctx.subprotocol, "identity": ctx.identity,
                "remote": list(ctx.remote_address)[:1]}

    @server.route("shout")
    def shout(ctx: Any, message: bytes) -> Dict[str, int]:
        sender = ctx.connection
        return {"delivered": ctx.server.broadcast({"shout": ctx.params},
                                                  predicate=lambda c: c is not sender)}

    @server.route("join")
    def join(ctx: Any, message: bytes) -> str:
        ctx.join(ctx.params)
        return "joined"

    @server.route("push")
    def push(ctx: Any, message: bytes) -> str:
        ctx.send("pushed first")
        return "then the reply"

    @server.route("fail")
    def fail(ctx: Any, message: bytes) -> None:
        raise HandlerError("no luck")

    app = flask.Flask(__name__)
    app.config["WSROUTE_SERVER"] = server

    @app.route("/hello")
    def hello() -> str:
        return "hello from flask"

    @app.route("/ws")
    def plain_ws() -> str:
        return "flask has /ws too"  # a GET without Upgrade reaches Flask

    @app.route("/stats")
    def stats() -> Dict[str, Any]:
        numbers = server.stats()
        return {key: numbers[key] for key in ("active", "accepted", "rejected", "messages_in")}

    @app.route("/broadcast/<room>")
    def broadcast(room: str) -> Dict[str, int]:
        return {"sent": server.broadcast({"room": room}, room=room)}

    app.wsgi_app = server.wsgi_app(app.wsgi_app, path="/ws")  # type: ignore[method-assign]
    return app


def http_get(port: int, path: str, context: Optional[ssl.SSLContext] = None
             ) -> Tuple[int, str]:
    scheme = "http" if context is None else "https"
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}{path}", timeout=TIMEOUT,
                                    context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def call(ws: Any, message: str) -> str:
    ws.send(message)
    reply = ws.recv(timeout=TIMEOUT)
    assert isinstance(reply, str)
    return reply


def raw_upgrade_with_a_frame(port: int, path: str = "/ws",
                             context: Optional[ssl.SSLContext] = None) -> str:
    """Send the request head and a frame in one write (a client that did not wait for the
    101): the WSGI server's read-ahead must reach the connection, not be lost."""
    with RawClient(("127.0.0.1", port)) as client:
        if context is not None:
            client.sock = context.wrap_socket(client.sock, server_hostname="127.0.0.1")
        client.send_raw(handshake_request(f"127.0.0.1:{port}", path)
                        + encode_frame(OP_TEXT, ECHO.encode()))
        assert client.read_response() == 101
        return client.recv_text()


# --------------------------------------------------------------------------
# gunicorn, as a subprocess


def _gunicorn_has(setting: str) -> bool:
    from gunicorn.config import KNOWN_SETTINGS  # type: ignore[import-untyped]

    return any(s.name == setting for s in KNOWN_SETTINGS)


class Gunicorn:
    """A gunicorn master and its worker; ``stop()`` and ``close()`` send SIGTERM, and
    ``close()`` kills the process group if that does not stop it."""

    LISTENING = re.compile(r"Listening at: https?://127\.0\.0\.1:(\d+)")

    def __init__(self, app: str, *options: str, cwd: Path = REPO, ready_path: str = "/hello",
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.ssl_context = ssl_context
        argv = [sys.executable, "-m", "gunicorn", *options, "--bind", "127.0.0.1:0",
                "--pythonpath", str(TESTS)]
        if _gunicorn_has("control_socket_disable"):
            # gunicorn >= 25 opens a control socket at a fixed path in $HOME by default.
            argv.append("--no-control-socket")
        self.argv = [*argv, app]
        self.lines: List[str] = []
        self.port = 0
        self._listening = threading.Event()
        # A session of its own: if the master does not stop, its worker is killed with it.
        self.proc = subprocess.Popen(self.argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="gunicorn-stderr")
        self._reader.start()
        try:
            self._wait_ready(ready_path)
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = self.LISTENING.search(line)
            if match and not self.port:
                self.port = int(match.group(1))
                self._listening.set()
        self._listening.set()  # EOF: gunicorn exited

    def _wait_ready(self, path: str) -> None:
        deadline = time.monotonic() + TIMEOUT * 4
        if not self._listening.wait(TIMEOUT * 4) or not self.port:
            raise AssertionError(f"gunicorn did not listen: {self.log}")
        # The master listens before its worker has imported the app: poll a plain page.
        while True:
            try:
                if http_get(self.port, path, self.ssl_context)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"gunicorn's worker did not answer {path}: {self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        return "\n".join([" ".join(self.argv), *self.lines])

    def url(self, path: str = "/ws") -> str:
        scheme = "ws" if self.ssl_context is None else "wss"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def stop(self) -> float:
        """SIGTERM, as a process manager stops gunicorn; the seconds it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(TIMEOUT * 3)
        assert code == 0, self.log
        return time.monotonic() - started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT * 3)
            except subprocess.TimeoutExpired:
                # Still unreaped, so the group id is still this master's.
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(TIMEOUT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@contextlib.contextmanager
def gunicorn_serving(app: str, *options: str, **kwargs: Any) -> Iterator[Gunicorn]:
    server = Gunicorn(app, *options, **kwargs)
    try:
        yield server
    finally:
        server.close()


GTHREAD = ("-k", "gthread", "--workers", "1")


def test_gunicorn_serves_the_guide_example_and_sigterm_closes_clients_with_1001() -> None:
    # The command the guide gives, on a free port.
    with gunicorn_serving("flask_app:app", *GTHREAD, "--threads", "100",
                          "--chdir", str(EXAMPLES), ready_path="/") as gun:
        status, page = http_get(gun.port, "/")
        assert status == 200 and "new WebSocket" in page  # Flask's page, same port
        with connect(gun.url(), open_timeout=TIMEOUT) as ws, \
                Client.connect(gun.url(), timeout=TIMEOUT) as client:
            assert json.loads(call(ws, ECHO)) == {"n": 1}  # python-websockets
            assert client.call_json("echo", [1, 2]) == [1, 2]  # our client
            assert client.call_json("shout", {"text": "hey"}) == {"delivered": 1}
            assert json.loads(ws.recv(timeout=TIMEOUT)) == {"shout": "HEY"}  # broadcast
            assert json.loads(http_get(gun.port, "/stats")[1]) == {"active": 2, "max": 90}

            took = gun.stop()
            with pytest.raises(WSClosed) as info:
                ws.recv(timeout=TIMEOUT)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            with pytest.raises(ConnectionClosed) as closed:
                client.receive(TIMEOUT)
            assert closed.value.code == 1001
        # Far below --graceful-timeout (30 s): the clients were closed, not waited out.
        assert took < TIMEOUT, gun.log
        assert "Traceback" not in gun.log


def test_gunicorn_routes_errors_ctx_push_and_rooms() -> None:
    with gunicorn_serving("test_wsgi:make_flask_app()", *GTHREAD, "--threads", "8") as gun:
        assert http_get(gun.port, "/hello") == (200, "hello from flask")
        assert http_get(gun.port, "/ws") == (200, "flask has /ws too")  # no Upgrade: Flask
        with connect(gun.url("/ws?room=a&room=b"), open_timeout=TIMEOUT,
                     additional_headers={"X-Test": "yes"}) as ws:
            me = json.loads(call(ws, '{"Route":"whoami"}'))
            assert me == {"path": "/ws", "query": {"room": ["a", "b"]}, "test": "yes",
                          "subprotocol": None, "identity": None, "remote": ["127.0.0.1"]}
            assert json.loads(call(ws, '{"Route":"nope"}'))["code"] == 1
            assert json.loads(call(ws, '{"Route":"fail"}'))["msg"] == "no luck"
            assert json.loads(call(ws, "not json"))["code"] == 1
            assert call(ws, '{"Route":"push"}') == "pushed first"
            assert ws.recv(timeout=TIMEOUT) == "then the reply"
            assert call(ws, '{"Route":"join","Params":"lobby"}') == "joined"
            assert json.loads(http_get(gun.port, "/broadcast/lobby")[1]) == {"sent": 1}
            assert json.loads(ws.recv(timeout=TIMEOUT)) == {"room": "lobby"}
        assert raw_upgrade_with_a_frame(gun.port) == '{"n":1}'


def test_gunicorn_max_connections_gets_503_and_the_slot_comes_back() -> None:
    with gunicorn_serving("test_wsgi:make_flask_app(max_connections=2)", *GTHREAD,
                          "--threads", "6") as gun:
        with Client.connect(gun.url(), timeout=TIMEOUT) as first, \
                connect(gun.url(), open_timeout=TIMEOUT) as second:
            with pytest.raises(HandshakeRejected) as info:
                Client.connect(gun.url(), timeout=TIMEOUT)
            assert info.value.status == 503
            with pytest.raises(InvalidStatus) as refused:
                connect(gun.url(), open_timeout=TIMEOUT)
            assert refused.value.response.status_code == 503
            assert http_get(gun.port, "/hello")[0] == 200  # threads left for pages
            stats = json.loads(http_get(gun.port, "/stats")[1])
            assert (stats["active"], stats["rejected"]) == (2, 2)
            assert first.call_json("echo", 1) == 1 and json.loads(call(second, ECHO))
        # Both left: their slots are free again (released as their threads finish).
        deadline = time.monotonic() + TIMEOUT
        while json.loads(http_get(gun.port, "/stats")[1])["active"]:
            assert time.monotonic() < deadline, gun.log
            time.sleep(0.02)
        with Client.connect(gun.url(), timeout=TIMEOUT) as again:
            assert again.call_json("echo", "back") == "back"


def test_gunicorn_handshake_checks_origin_auth_subprotocols_deflate() -> None:
    app = ("test_wsgi:make_flask_app(token='s3cret', subprotocols=['v2', 'v1'], "
           "compression='deflate')")
    with gunicorn_serving(app, *GTHREAD, "--threads", "6") as gun:
        with pytest.raises(HandshakeRejected) as info:
            Client.connect(gun.url(), timeout=TIMEOUT)  # no token
        assert info.value.status == 403
        token = {"X-Token": "s3cret"}
        with pytest.raises(HandshakeRejected) as info:
            Client.connect(gun.url(), timeout=TIMEOUT,
                           headers={**token, "Origin": "http://evil.example"})
        assert info.value.status == 403
        with connect(gun.url(), open_timeout=TIMEOUT, additional_headers=token,
                     subprotocols=["v1", "v2"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "v2"  # the server's preference
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert extensions.startswith("permessage-deflate")
            me = json.loads(call(ws, '{"Route":"whoami"}'))
            assert (me["identity"], me["subprotocol"]) == ("tester", "v2")
            big = json.dumps({"Route": "echo", "Params": "x" * 100_000})
            assert len(call(ws, big)) == 100_002


def test_gunicorn_sync_worker_is_refused_with_a_clear_error() -> None:
    # No thread per request: one WebSocket would stop the worker for everyone else.
    with gunicorn_serving("test_wsgi:make_flask_app()", "-k", "sync", "--workers", "1") as gun:
        with RawClient(("127.0.0.1", gun.port)) as client:
            client.send_raw(handshake_request(f"127.0.0.1:{gun.port}", "/ws"))
            assert client.read_response() == 500
        assert http_get(gun.port, "/hello")[0] == 200
    # At start-up (the worker loaded the app), then on the upgrade, with its traceback.
    assert "gunicorn's SyncWorker cannot hold WebSocket connections" in gun.log, gun.log
    assert "is not serving requests in threads (wsgi.multithread is false): " \
        "wsroute_sync serves WebSocket upgrades inside gunicorn's threaded worker " \
        "(gunicorn -k gthread --threads N)" in gun.log, gun.log


# --------------------------------------------------------------------------
# werkzeug's threaded server, in this process


@contextlib.contextmanager
def werkzeug_serving(app: flask.Flask, *, threaded: bool = True,
                     ssl_context: Optional[ssl.SSLContext] = None) -> Iterator[int]:
    httpd = make_werkzeug_server("127.0.0.1", 0, app, threaded=threaded,
                                 ssl_context=ssl_context)
    thread = threading.Thread(target=httpd.serve_forever, name="werkzeug")
    thread.start()
    try:
        yield httpd.server_port
    finally:
        app.config["WSROUTE_SERVER"].close(timeout=TIMEOUT)
        httpd.shutdown()
        thread.join()
        httpd.server_close()


def test_werkzeug_threaded_serves_routes_limits_broadcast_and_close(
        caplog: pytest.LogCaptureFixture) -> None:
    app = make_flask_app(max_connections=2)
    server = app.config["WSROUTE_SERVER"]
    with werkzeug_serving(app) as port:
        url = f"ws://127.0.0.1:{port}/ws"
        assert http_get(port, "/hello") == (200, "hello from flask")
        with connect(url, open_timeout=TIMEOUT) as ws, \
                Client.connect(url, timeout=TIMEOUT) as client:
            assert json.loads(call(ws, ECHO)) == {"n": 1}
            assert client.call_json("echo", "hi") == "hi"
            assert client.call_json("shout", "all") == {"delivered": 1}
            assert json.loads(ws.recv(timeout=TIMEOUT)) == {"shout": "all"}
            with pytest.raises(HandshakeRejected) as info:
                Client.connect(url, timeout=TIMEOUT)
            assert info.value.status == 503
            assert server.stats()["active"] == 2 and server.stats()["rejected"] == 1
            assert "wsroute_sync_connections_active 2" in server.metrics_text()

            server.close(timeout=TIMEOUT)  # what a shutdown hook does
            with pytest.raises(WSClosed) as closed:
                ws.recv(timeout=TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
            with pytest.raises(ConnectionClosed) as ours:
                client.receive(TIMEOUT)
            assert ours.value.code == 1001
            assert http_get(port, "/hello")[0] == 200  # Flask goes on
        with pytest.raises(HandshakeRejected) as late:
            Client.connect(url, timeout=TIMEOUT)
        assert late.value.status == 503  # closed: no new WebSocket clients
    # werkzeug took each ended connection for a client that left: nothing logged.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_werkzeug_passes_read_ahead_and_ctx() -> None:
    app = make_flask_app()
    with werkzeug_serving(app) as port:
        assert raw_upgrade_with_a_frame(port) == '{"n":1}'
        with Client.connect(f"ws://127.0.0.1:{port}/ws?x=1", timeout=TIMEOUT,
                            headers={"X-Test": "w"}) as client:
            me = client.call_json("whoami")
            assert (me["path"], me["query"], me["test"]) == ("/ws", {"x": ["1"]}, "w")


def test_werkzeug_without_threads_is_refused_with_a_clear_error(
        caplog: pytest.LogCaptureFixture) -> None:
    app = make_flask_app()
    with werkzeug_serving(app, threaded=False) as port:
        with pytest.raises(HandshakeRejected) as info:
            Client.connect(f"ws://127.0.0.1:{port}/ws", timeout=TIMEOUT)
        assert info.value.status == 500
    assert any("not serving requests in threads" in r.getMessage()
               or "not serving requests in threads" in (r.exc_text or "")
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_tls_sockets_from_gunicorn_and_werkzeug(tmp_path: Path) -> None:
    # Both servers hand over an ssl.SSLSocket: it is served as it is (no dup, no unwrap).
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    pem = tmp_path / "cert.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with gunicorn_serving("test_wsgi:make_flask_app()", *GTHREAD, "--threads", "4",
                          "--certfile", str(pem), "--keyfile", str(pem),
                          ssl_context=client_context) as gun:
        assert raw_upgrade_with_a_frame(gun.port, context=client_context) == '{"n":1}'
        with Client.connect(gun.url(), ssl_context=client_context, timeout=TIMEOUT) as client:
            assert client.call_json("echo", "tls") == "tls"
            gun.stop()
            with pytest.raises(ConnectionClosed) as closed:
                client.receive(TIMEOUT)
            assert closed.value.code == 1001
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    with werkzeug_serving(make_flask_app(), ssl_context=server_context) as port:
        url = f"wss://127.0.0.1:{port}/ws"
        with Client.connect(url, ssl_context=client_context, timeout=TIMEOUT) as client:
            assert client.call_json("echo", "tls") == "tls"
        assert raw_upgrade_with_a_frame(port, context=client_context) == '{"n":1}'


# --------------------------------------------------------------------------
# The WSGI application itself


def _environ(**extra: Any) -> Dict[str, Any]:
    environ: Dict[str, Any] = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/ws",
        "QUERY_STRING": "a=1", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "10.0.0.7",
        "REMOTE_PORT": "5555", "HTTP_HOST": "example.test", "HTTP_UPGRADE": "websocket",
        "HTTP_CONNECTION": "Upgrade", "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
        "HTTP_SEC_WEBSOCKET_VERSION": "13", "CONTENT_LENGTH": "", "wsgi.multithread": True,
        "wsgi.input": io.BytesIO(),
    }
    environ.update(extra)
    return environ


def test_request_from_environ_keeps_order_target_and_address() -> None:
    request = request_from_environ(_environ(RAW_URI="/ws?a=1"))
    assert (request.method, request.target, request.path, request.query) == (
        "GET", "/ws?a=1", "/ws", "a=1")
    assert request.http_version == "1.1" and request.remote_address == ("10.0.0.7", 5555)
    assert request.headers.items() == [
        ("host", "example.test"), ("upgrade", "websocket"), ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="), ("sec-websocket-version", "13")]
    # Without a raw URI the target is rebuilt, percent-encoding what PATH_INFO decoded.
    rebuilt = request_from_environ(_environ(SCRIPT_NAME="/app", PATH_INFO="/w s"))
    assert rebuilt.target == "/app/w%20s?a=1"


def test_other_requests_reach_the_app_untouched_or_get_404() -> None:
    seen: List[Dict[str, Any]] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        seen.append(environ)
        start_response("200 OK", [])
        return [b"app"]

    def start_response(status: str, headers: Sequence[Tuple[str, str]]) -> None:
        statuses.append(status)

    statuses: List[str] = []
    server = Server()
    wrapped = WSGIApp(server, app, path="/ws")
    plain = _environ(HTTP_UPGRADE="h2c")
    elsewhere = _environ(PATH_INFO="/other")  # an upgrade on another path: the app's
    assert wrapped(plain, start_response) == [b"app"]
    assert wrapped(elsewhere, start_response) == [b"app"]
    assert seen == [plain, elsewhere] and statuses == ["200 OK", "200 OK"]
    assert WSGIApp(server)(_environ(HTTP_UPGRADE=""), start_response) == [b"Not Found\n"]
    assert statuses[-1] == "404 Not Found"


def test_an_upgrade_without_a_socket_or_threads_raises_naming_what_works() -> None:
    app = WSGIApp(Server())
    with pytest.raises(RuntimeError, match=r"waitress.*no client socket.*gunicorn -k gthread"):
        app(_environ(SERVER_SOFTWARE="waitress"), lambda *a: None)
    a, b = socket.socketpair()
    with a, b, pytest.raises(RuntimeError, match="not serving requests in threads.*werkzeug"):
        app(_environ(**{"werkzeug.socket": a, "wsgi.multithread": False}), lambda *a: None)


def test_options_are_validated() -> None:
    server = Server()
    with pytest.raises(TypeError):
        WSGIApp(server, "not an app")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WSGIApp(server, path="ws")
    with pytest.raises(TypeError):
        WSGIApp(server, path=[1])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        WSGIApp(server, path=[])


def test_close_on_sigterm_chains_the_handler_in_place() -> None:
    server = Server()
    calls: List[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        close_on_sigterm(server)
        close_on_sigterm(server)  # once per server
        os.kill(os.getpid(), signal.SIGTERM)
        assert server.wait_closed(TIMEOUT)
        assert calls == [signal.SIGTERM]  # the previous handler still ran, once
    finally:
        signal.signal(signal.SIGTERM, original)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(ValueError, match="no Python handler"):
            close_on_sigterm(Server())
    finally:
        signal.signal(signal.SIGTERM, original)
    for thread in threading.enumerate():
        if thread.name == "wsroute_sync-sigterm-close":
            thread.join(TIMEOUT)


# --------------------------------------------------------------------------
# Autobahn groups 1-10 through gunicorn


@pytest.mark.conformance
@pytest.mark.timeout(harness.worst_case_seconds(harness.SuiteConfig.from_env().jobs))
def test_autobahn_groups_1_to_10_through_gunicorn() -> None:
    # As tests/test_conformance.py: kosoku must be there, except where it cannot exist.
    if sys.version_info < (3, 10):
        pytest.skip("kosoku 0.1.0 needs Python >= 3.10; conformance runs on newer Pythons")
    if importlib.util.find_spec("kosoku") is None:
        pytest.fail("kosoku is not installed: pip install 'kosoku==0.1.0' (the test extra)")

    config = harness.SuiteConfig(server_command=(sys.executable, str(Path(__file__))))
    assigned = [(chunk, ids) for chunk, ids in harness.assign_chunks(harness.list_case_ids())
                if not chunk.compression]
    assert {cid.split(".")[0] for _, ids in assigned for cid in ids} == {
        "1", "2", "3", "4", "5", "6", "7", "9", "10"}
    started = time.monotonic()

    def run(item: Tuple[Any, List[str]]) -> Any:
        outcome = harness.run_chunk(item[0], item[1], config)
        if outcome.errors and all(e.startswith("kosoku runner exited with -6")
                                  for e in outcome.errors):
            # kosoku 0.1.0 sometimes aborts (SIGABRT, no output) as it exits, after its
            # last result, against the standalone echo server too: run the chunk again.
            print(f"[{item[0].name}] kosoku aborted on exit; running the chunk again")
            outcome = harness.run_chunk(item[0], item[1], config)
        return outcome

    with concurrent.futures.ThreadPoolExecutor(config.jobs) as pool:
        outcomes = list(pool.map(run, assigned))
    report = harness.SuiteReport(config, outcomes, time.monotonic() - started)
    print("\n".join(report.summary_lines()))
    assert report.ok, report.failure_message()


def _serve_echo_under_gunicorn(argv: Optional[Sequence[str]] = None) -> None:
    """The conformance harness's server command: an echo app under gunicorn gthread."""
    parser = argparse.ArgumentParser(description=_serve_echo_under_gunicorn.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-message-size", type=int, default=None)
    parser.add_argument("--compression", default=None)
    args = parser.parse_args(argv)

    from gunicorn.app.base import BaseApplication

    server = Server(message_handler=lambda connection, message: message,
                    max_message_size=args.max_message_size or None,
                    compression=None if args.compression == "none" else args.compression)

    class Echo(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", [f"{args.host}:{args.port}"])
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", 8)
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)
            self.cfg.set("post_worker_init", lambda worker: print(
                "listening on ws://%s:%d/" % worker.sockets[0].getsockname()[:2], flush=True))

        def load(self) -> Any:
            return server.wsgi_app()

    Echo().run()


if __name__ == "__main__":
    _serve_echo_under_gunicorn()
