"""Every script in examples/ runs to completion and prints what its docstring promises."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Sequence

import pytest

from conftest import TIMEOUT
from wsroute_sync import Client, HandshakeRejected

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, stderr: Sequence[str] = ()) -> List[str]:
    """Run an example; its stderr must hold exactly the ``stderr`` lines, in order.

    The library installs no log handler, so its WARNING records (refusals) reach
    stderr through logging's last-resort handler, as in any unconfigured script.
    """
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=TIMEOUT * 4,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(stderr), result.stderr
    for line, expected in zip(lines, stderr):
        assert re.fullmatch(expected, line), (line, expected)
    return result.stdout.splitlines()


def test_every_example_is_run_by_a_test() -> None:
    # Here or in another module (examples that need more than Python, e.g. Redis).
    tests = Path(__file__).resolve().parent
    sources = "\n".join(p.read_text(encoding="utf-8") for p in tests.glob("test_*.py"))
    untested = [p.name for p in EXAMPLES.glob("*.py") if f'"{p.name}"' not in sources]
    assert untested == []


def test_embed() -> None:
    lines = run_example("embed.py")
    assert re.fullmatch(r"serving on ws://127\.0\.0\.1:\d+/", lines[0])
    assert lines[1:] == [
        "greet -> {'greeting': 'hello, embedded world'}",
        'greet with bad params -> server error 1: greet expects {"name": "..."}',
        "closed: 0 connections left",
    ]


def test_chat_conversation() -> None:
    assert run_example("chat.py") == [
        "alice: {'joined': 'lobby', 'members': ['alice']}",
        "bob:   {'joined': 'lobby', 'members': ['alice', 'bob']}",
        "carol: {'joined': 'games', 'members': ['carol']}",
        "alice says hi: {'delivered': 1}",
        "bob hears: {'room': 'lobby', 'from': 'alice', 'text': 'hi, lobby!'}",
        "carol's room: {'room': 'games', 'members': ['carol']}",
        "bob answers: {'delivered': 1}",
        "alice hears: {'room': 'lobby', 'from': 'bob', 'text': 'hello alice'}",
    ]


def test_auth_token_tryout() -> None:
    assert run_example("auth_token.py", stderr=[
        r"connection \S+: handshake refused with 401: bearer token required",
        r"connection \S+: handshake refused with 403: forbidden",
    ]) == [
        'no token: refused with HTTP 401 (bearer token required), challenge Bearer realm="x"',
        "wrong token: refused with HTTP 403 (forbidden)",
        "alice's token: connected, whoami -> {'user': 'alice'}",
    ]


def test_functional_options_logs_json() -> None:
    records = [json.loads(line) for line in run_example("functional_options.py")]
    assert {r["logger"] for r in records} == {"example.server"}
    messages = [r["msg"] for r in records]
    assert re.fullmatch(r"server listening on ws://127\.0\.0\.1:\d+/", messages[0])
    assert messages[1:3] == ['echo replied {"max_connections":2000}', "server closing"]
    # The client has hung up, but the server's connection thread may still be finishing
    # (it closes the socket before it leaves the registry): 0 or 1 closed, none stuck.
    assert re.fullmatch(r"server closed \([01] connection\(s\) closed, 0 unfinished\)",
                        messages[3])
    assert len(messages) == 4
    assert all(r["level"] == "INFO" for r in records)


def test_flask_app_tryout() -> None:
    # Flask's page and the WebSocket routes on one werkzeug port (threaded).
    assert run_example("flask_app.py") == [
        "GET /      -> 200 text/html; charset=utf-8",
        "echo       -> {'hello': 'flask'}",
        "GET /stats -> {'active': 2, 'max': 90}",
        "shout      -> {'delivered': 1}",
        'ben hears  -> {"shout":"HI ALL"}',
    ]
    # Its gunicorn command (docs/guide.md) is run by tests/test_wsgi.py.


# Runs the example as a terminal would, where Ctrl-C raises KeyboardInterrupt. A
# process started in the background by a non-interactive shell (``bash run.sh &``,
# nohup) inherits SIGINT ignored, Python then installs no handler for it, and the
# examples could not be stopped: the suite failed that way, never in the foreground.
_AS_IN_A_TERMINAL = (
    "import runpy, signal, sys; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture
def serving(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run ``examples/<param> --serve 127.0.0.1:0``; yield its URL; Ctrl-C it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _AS_IN_A_TERMINAL, str(EXAMPLES / request.param),
         "--serve", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"ws://\S+", line)
        assert match, line
        yield match.group(0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT * 2)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("serving", ["chat.py"], indirect=True)
def test_chat_serve_mode(serving: str) -> None:
    with Client.connect(serving) as ann, Client.connect(serving) as ben:
        assert ann.call_json("join", {"room": "r", "name": "ann"})["joined"] == "r"
        assert ben.call_json("join", {"room": "r", "name": "ben"})["members"] == ["ann", "ben"]
        assert ben.call_json("say", {"text": "yo"}) == {"delivered": 1}
        assert json.loads(ann.receive(TIMEOUT)) == {"room": "r", "from": "ben", "text": "yo"}


@pytest.mark.parametrize("serving", ["flask_app.py"], indirect=True)
def test_flask_app_serve_mode(serving: str) -> None:
    assert serving.endswith("/ws")
    with Client.connect(serving) as client:
        assert client.call_json("echo", [1, 2]) == [1, 2]


@pytest.mark.parametrize("serving", ["auth_token.py"], indirect=True)
def test_auth_token_serve_mode(serving: str) -> None:
    with pytest.raises(HandshakeRejected) as info:
        Client.connect(serving)
    assert info.value.status == 401
    with Client.connect(serving, headers={"Authorization": "Bearer s3cret-bob"}) as client:
        assert client.call_json("whoami") == {"user": "bob"}
