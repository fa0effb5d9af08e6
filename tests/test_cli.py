"""The command line: demo, echo and serve as real processes; call in and out of process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest
from websockets.exceptions import ConnectionClosed as WSClosed
from websockets.sync.client import connect

from conftest import TIMEOUT, make_server, running
from wsroute_sync import HandlerError, Server
from wsroute_sync.cli import build_parser
from wsroute_sync.cli import main as cli_main


class Running:
    def __init__(self, args: List[str], cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsroute_sync", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on ws://"):
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"server did not start: {line!r} {err}")
        self.url = line.split()[-1]

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT * 2)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        assert self.proc.returncode == 0, err
        return err


@pytest.fixture
def demo() -> Iterator[Running]:
    run = Running(["--port", "0", "--log-json"])
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


def test_demo_routes_and_json_logs(demo: Running) -> None:
    with connect(demo.url) as ws:
        ws.send('{"Route":"echo","Params":{"message":"hi"}}')
        assert ws.recv(timeout=TIMEOUT) == '{"message":"hi"}'
        ws.send('{"Route":"add","Params":{"numbers":[1,2,3.5]}}')
        assert json.loads(ws.recv(timeout=TIMEOUT)) == {"sum": 6.5}
        ws.send('{"Route":"add","Params":{"numbers":"x"}}')
        assert json.loads(ws.recv(timeout=TIMEOUT))["msg"].startswith("add expects")
        ws.send('{"Route":"time"}')
        assert "time" in json.loads(ws.recv(timeout=TIMEOUT))
        ws.send('{"Route":"upper","Params":{"text":"abc"}}')
        assert json.loads(ws.recv(timeout=TIMEOUT)) == {"text": "ABC"}
    err = demo.stop()
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(r["msg"].startswith("server listening") and r["level"] == "INFO"
               for r in records)
    assert any(r["msg"] == "server closing" for r in records)


def test_sigterm_closes_open_clients_with_1001(demo: Running) -> None:
    with connect(demo.url) as ws:
        ws.send('{"Route":"echo","Params":1}')
        assert ws.recv(timeout=TIMEOUT) == "1"
        demo.proc.send_signal(signal.SIGTERM)
        with pytest.raises(WSClosed) as info:
            ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    demo.proc.communicate(timeout=TIMEOUT)
    assert demo.proc.returncode == 0


def test_echo_command_echoes_both_frame_types() -> None:
    run = Running(["echo", "--port", "0", "--max-message-size", "100"])
    try:
        with connect(run.url) as ws:
            ws.send("not json at all")
            assert ws.recv(timeout=TIMEOUT) == "not json at all"
            ws.send(b"\x00\xff")
            assert ws.recv(timeout=TIMEOUT) == b"\x00\xff"
            ws.send("x" * 101)
            with pytest.raises(WSClosed) as info:
                ws.recv(timeout=TIMEOUT)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    finally:
        run.stop()


def test_serve_command_runs_a_user_server(tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text(textwrap.dedent("""
        from wsroute_sync import Server
        server = Server()
        server.register("hello", lambda ctx, message: "hello from myapp")
    """))
    run = Running(["serve", "myapp:server", "--port", "0"], cwd=str(tmp_path))
    try:
        with connect(run.url) as ws:
            ws.send('{"Route":"hello"}')
            assert ws.recv(timeout=TIMEOUT) == "hello from myapp"
    finally:
        run.stop()


def test_help_lists_every_command_and_option() -> None:
    parser = build_parser()
    text = parser.format_help()
    for command in ("demo", "echo", "serve"):
        assert command in text
    result = subprocess.run([sys.executable, "-m", "wsroute_sync", "echo", "--help"],
                            capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert result.returncode == 0
    for option in ("--host", "--port", "--max-connections", "--max-message-size",
                   "--compression", "--allowed-origin", "--log-json", "--log-level",
                   "--cpu-affinity"):
        assert option in result.stdout


def test_cpu_affinity_option_takes_one_or_cpu_numbers() -> None:
    from wsroute_sync.cli import _server_options

    parser = build_parser()
    assert _server_options(parser.parse_args(["echo", "--cpu-affinity", "one"])) == {
        "cpu_affinity": "one"}
    assert _server_options(parser.parse_args(["echo", "--cpu-affinity", "0,1"])) == {
        "cpu_affinity": frozenset({0, 1})}
    assert "cpu_affinity" not in _server_options(parser.parse_args(["echo"]))
    with pytest.raises(SystemExit, match="--cpu-affinity takes 'one' or CPU numbers"):
        _server_options(parser.parse_args(["echo", "--cpu-affinity", "two"]))


def test_bad_options_exit_with_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "wsroute_sync", "--max-connections", "0",
                             "--port", "0"], capture_output=True, text=True,
                            timeout=TIMEOUT * 2, env={**os.environ})
    assert result.returncode == 2
    assert "max_connections" in result.stderr


# The call command.


def _call_server() -> Server:
    server = make_server(path="/ws")

    @server.route("fail")
    def fail(ctx: Any, message: bytes) -> None:
        raise HandlerError("it went wrong")

    @server.route("whoami")
    def whoami(ctx: Any, message: bytes) -> Any:
        return {"auth": ctx.headers.get("authorization")}

    return server


def test_call_command_prints_the_reply() -> None:
    with running(_call_server()) as server:
        result = subprocess.run(
            [sys.executable, "-m", "wsroute_sync", "call", server.url + "ws", "echo", '{"k":1}'],
            capture_output=True, timeout=TIMEOUT * 2,
        )
    assert (result.returncode, result.stdout, result.stderr) == (0, b'{"k":1}\n', b"")


def test_call_command_options(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with running(_call_server()) as server:
        url = server.url + "ws"
        assert cli_main(["call", url, "echo"]) == 0
        assert capsysbinary.readouterr().out == b"null\n"
        assert cli_main(["call", url, "echo", '"\u00e9"', "--binary"]) == 0
        assert capsysbinary.readouterr().out == '"\u00e9"\n'.encode("utf-8")
        assert cli_main(["call", "--timeout", "3", "-H", "Authorization: Bearer t", url,
                         "whoami"]) == 0
        assert capsysbinary.readouterr().out == b'{"auth":"Bearer t"}\n'


def test_call_command_error_envelope_exits_1(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    with running(_call_server()) as server:
        assert cli_main(["call", server.url + "ws", "nope"]) == 1
        out, err = capsysbinary.readouterr()
        assert out == b"" and err == b"wsroute-sync: server error 1: unknown route: nope\n"
        assert cli_main(["call", server.url + "ws", "fail", "{}"]) == 1
        assert capsysbinary.readouterr().err == b"wsroute-sync: server error 1: it went wrong\n"


def test_call_command_connection_failures_exit_2(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/"
    assert cli_main(["call", url, "echo"]) == 2
    out, err = capsysbinary.readouterr()
    assert out == b""
    assert err.startswith(f"wsroute-sync: cannot connect to {url}: ".encode())
    assert b"refused" in err
    with running(_call_server()) as server:
        assert cli_main(["call", server.url + "elsewhere", "echo"]) == 2
        assert capsysbinary.readouterr().err == (
            f"wsroute-sync: {server.url}elsewhere refused the connection: HTTP 404 "
            "no WebSocket endpoint at /elsewhere\n".encode()
        )


def test_call_command_timeout_exits_2(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    server = _call_server()
    release = threading.Event()
    server.register("wait", lambda ctx, message: release.wait(TIMEOUT) and None)
    with running(server):
        try:
            started = time.monotonic()
            assert cli_main(["call", "--timeout", "0.2", server.url + "ws", "wait"]) == 2
            assert time.monotonic() - started < TIMEOUT / 2
        finally:
            release.set()
        assert capsysbinary.readouterr().err == (
            f"wsroute-sync: no reply from {server.url}ws within 0.2s\n".encode()
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["ws://127.0.0.1:1/", "echo", "{bad"], b"PARAMS is not valid JSON"),
        (["ws://127.0.0.1:1/", "echo", "-H", "no colon"], b"--header expects"),
        (["ws://127.0.0.1:1/", "echo", "--timeout", "0"], b"--timeout must be > 0"),
        (["http://127.0.0.1:1/", "echo"], b"expected a ws://"),
    ],
)
def test_call_command_usage_errors_exit_2(
    args: List[str], message: bytes, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert cli_main(["call", *args]) == 2
    err = capsysbinary.readouterr().err
    assert err.startswith(b"wsroute-sync call: error: ") and message in err


def test_call_command_help() -> None:
    assert "call" in build_parser().format_help()
    result = subprocess.run([sys.executable, "-m", "wsroute_sync", "call", "--help"],
                            capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert result.returncode == 0
    for word in ("URL", "ROUTE", "PARAMS", "--timeout", "--binary", "--header",
                 "Exit status"):
        assert word in result.stdout
