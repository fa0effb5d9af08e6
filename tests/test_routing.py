"""The envelope, sans-I/O: bytes in, values and error envelopes out."""

from __future__ import annotations

import json
import logging
from typing import Any, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsroute_sync.errors import HandlerError
from wsroute_sync.metrics import ConnectionMetrics
from wsroute_sync.routing import (
    Dispatcher,
    _parse_with_loads,
    parse_request,
    EnvelopeError,
    encode_result,
    error_envelope,
    parse_envelope,
    resolve_handler,
)


@pytest.mark.parametrize(
    "message, expected",
    [
        ('{"Route":"a","Params":{"x":1}}', ("a", {"x": 1})),
        (b'{"Route":"a","Params":[1]}', ("a", [1])),
        ('{"route":"a","params":2}', ("a", 2)),
        ('{"ROUTE":"a"}', ("a", None)),
        ('{"Route":"a","Params":null,"Extra":1}', ("a", None)),
        ('{"route":"x","Route":"a"}', ("a", None)),
    ],
)
def test_parse_envelope(message: Any, expected: Any) -> None:
    assert parse_envelope(message) == expected


@pytest.mark.parametrize(
    "message, msg",
    [
        ("", "invalid JSON: Expecting value at position 0"),
        ("{", "invalid JSON: Expecting property name enclosed in double quotes at position 1"),
        (b"\xff\xfe\xfd", "invalid JSON: not valid UTF-8"),
        # UTF-8 only, as Go's encoding/json: json.loads would guess UTF-16 here.
        ('{"Route":"x"}'.encode("utf-16"), "invalid JSON: not valid UTF-8"),
        ('{"Route":"x","Params":NaN}', "invalid JSON: NaN is not a JSON value"),
        ('{"Route":"x","Params":[-Infinity]}', "invalid JSON: -Infinity is not a JSON value"),
        ('{"Route":"x","Params":' + "9" * 5000 + "}", "invalid JSON: number too long"),
        ("\ufeff{}", "invalid JSON: Expecting value at position 0"),  # a BOM is not JSON
        ("[]", "invalid request: expected a JSON object"),
        ("null", "invalid request: expected a JSON object"),
        ("{}", 'invalid request: missing "Route"'),
        ('{"Route":["a"]}', 'invalid request: "Route" must be a string'),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "invalid JSON: nested too deeply"),
    ],
)
def test_parse_envelope_errors(message: Any, msg: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(message)
    assert info.value.msg == msg


def test_error_envelope_is_compact_and_escaped() -> None:
    assert error_envelope("x") == '{"code":1,"msg":"x","data":null}'
    assert json.loads(error_envelope('q"\n\u2028')) == {"code": 1, "msg": 'q"\n\u2028',
                                                        "data": None}


@pytest.mark.parametrize(
    "result, text, expected",
    [
        (None, True, None),
        (b"ab", False, b"ab"),
        (b"ab", True, "ab"),
        ("é", True, "é"),
        ("é", False, "é".encode()),
        (bytearray(b"x"), False, b"x"),
        (memoryview(b"x"), True, "x"),
        ({"a": "é"}, True, '{"a":"é"}'),
        ([1, 2.5, None], False, b"[1,2.5,null]"),
        (7, True, "7"),
    ],
)
def test_encode_result(result: Any, text: bool, expected: Any) -> None:
    assert encode_result(result, text) == expected


def test_encode_result_refuses_what_cannot_go_out() -> None:
    with pytest.raises(UnicodeDecodeError):
        encode_result(b"\xff", True)
    with pytest.raises(TypeError):
        encode_result({1, 2}, True)


def test_resolve_handler() -> None:
    class Obj:
        def handle(self, ctx: Any, message: bytes) -> bytes:
            return message

    obj = Obj()
    assert resolve_handler(obj) == obj.handle
    func = lambda ctx, m: m  # noqa: E731
    assert resolve_handler(func) is func
    with pytest.raises(TypeError):
        resolve_handler(None)


class FakeConnection:
    """What the dispatcher needs of a connection: somewhere to count."""

    def __init__(self) -> None:
        self.metrics = ConnectionMetrics()


def _dispatcher(handlers: dict) -> Dispatcher:
    return Dispatcher(handlers.get, lambda r, p, c, dl: (r, p, c, dl),
                      logger=logging.getLogger("test.dispatch"), handler_timeout=None)


def test_dispatch_passes_params_as_utf8_json_bytes_and_ctx() -> None:
    seen = []

    def handler(ctx: Any, message: bytes) -> bytes:
        seen.append((ctx, message))
        return message

    d = _dispatcher({"r": handler})
    conn = FakeConnection()
    # The handler gets Params as the client spelled it (like Go's json.RawMessage).
    assert d.dispatch(conn, '{"Route":"r","Params":{"k":"é","n":[1, 2]}}') == '{"k":"é","n":[1, 2]}'
    assert seen == [(("r", {"k": "é", "n": [1, 2]}, conn, None),
                     '{"k":"é","n":[1, 2]}'.encode())]
    assert sum(conn.metrics.latency["r"][:-1]) == 1


def test_dispatch_counts_error_kinds() -> None:
    def chosen(ctx: Any, m: bytes) -> None:
        raise HandlerError("why")

    d = _dispatcher({"chosen": chosen, "crash": lambda c, m: 1 / 0, "bad": lambda c, m: {1}})
    conn = FakeConnection()
    for message in ("x", "[]", '{"Route":"no"}', '{"Route":"chosen"}', '{"Route":"crash"}',
                    '{"Route":"bad"}'):
        reply = d.dispatch(conn, message)
        assert isinstance(reply, str) and json.loads(reply)["code"] == 1
    assert conn.metrics.errors == {"invalid_json": 1, "invalid_request": 1, "unknown_route": 1,
                                   "handler_error": 1, "handler_exception": 1, "bad_result": 1}
    # Failed handlers are timed too; unknown routes are not.
    assert set(conn.metrics.latency) == {"chosen", "crash", "bad"}
    assert d.dispatch(conn, b"x") == error_envelope(
        "invalid JSON: Expecting value at position 0").encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    members=st.lists(
        st.tuples(st.sampled_from(["Route", "route", "ROUTE", "Params", "params", "x", "é"]),
                  json_values),
        max_size=4,
    ),
    spacing=st.sampled_from(["", " ", "\n\t "]),
    junk=st.sampled_from(["", "", ",", "}", " x", "]"]),
    binary=st.booleans(),
)
def test_request_walk_agrees_with_json_loads(members: List[Any], spacing: str, junk: str,
                                             binary: bool) -> None:
    """parse_request's own walk of the envelope and json.loads agree on every input."""
    sp = spacing
    body = ("," + sp).join(f"{json.dumps(k)}{sp}:{sp}{json.dumps(v)}" for k, v in members)
    message: Any = sp + "{" + sp + body + sp + "}" + junk
    if binary:
        message = message.encode("utf-8")
    try:
        expected: Any = _parse_with_loads(message.decode() if binary else message)
    except EnvelopeError as exc:
        expected = exc.msg
    try:
        got: Any = parse_request(message)
    except EnvelopeError as exc:
        got = exc.msg
    if isinstance(expected, tuple):
        assert isinstance(got, tuple)
        # Route and decoded Params are the same; the Params text is the client's own
        # spelling of the same JSON value.
        assert got[:2] == expected[:2]
        assert json.loads(got[2]) == json.loads(expected[2])
    else:
        assert got == expected


def test_params_text_is_the_clients_own_spelling() -> None:
    assert parse_request('{"Route":"r","Params": {"b": 2, "a": [1,  2]} }')[2] == (
        '{"b": 2, "a": [1,  2]}')
    assert parse_request('{"Route":"r"}')[2] == "null"


params_texts = st.one_of(
    json_values.map(json.dumps),
    json_values.map(lambda v: json.dumps(v, indent=1)),
    st.sampled_from(["NaN", "-Infinity", "[1,", "1 2", "{", '"\\ud800"', '"a\x01"', "01",
                     "", "nul", '{"a":1,}', "[" * 50 + "]" * 50, "1" * 5000]),
)


@settings(max_examples=400, deadline=None)
@given(
    route=st.one_of(st.text(max_size=10), st.sampled_from(["echo", 'a"b', "a\\b", "\x00",
                                                            "\u2028", "é"])),
    raw_route=st.booleans(),
    params=params_texts,
    spacing=st.sampled_from(["", " ", "\n\t ", "\r"]),
    tail=st.sampled_from(["", "", " ", ',"Route":"z"', ',"x":1', "}", " x", "\n"]),
)
def test_usual_shape_reader_agrees_with_the_walk(route: str, raw_route: bool, params: str,
                                                 spacing: str, tail: str) -> None:
    """The regular-expression reader of '{"Route":..,"Params":..}' gives exactly what the
    member walk gives for the same text: route, value, the same cut of Params text, and
    the same error when there is one."""
    from wsroute_sync.routing import _walk_request

    sp = spacing
    # raw_route puts the route's characters between quotes unescaped, as a careless
    # client would (control characters and backslashes then make it invalid JSON).
    quoted = f'"{route}"' if raw_route else json.dumps(route, ensure_ascii=False)
    text = f'{sp}{{{sp}"Route"{sp}:{sp}{quoted}{sp},{sp}"Params"{sp}:{sp}{params}{sp}{tail}}}{sp}'

    def outcome(fn: Any) -> Any:
        try:
            return fn(text)
        except EnvelopeError as exc:
            return exc.msg

    assert outcome(parse_request) == outcome(_walk_request)


def test_usual_shape_does_not_need_the_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    import wsroute_sync.routing as routing

    def walk(text: str) -> Any:
        raise AssertionError(f"walked {text!r}")

    monkeypatch.setattr(routing, "_walk_request", walk)
    assert parse_request('{"Route":"echo","Params":{"message":"hi"}}') == (
        "echo", {"message": "hi"}, '{"message":"hi"}')
    assert parse_request(b' { "Route" : "r\xc3\xa9" ,\n"Params": [1, 2] }\n') == (
        "ré", [1, 2], "[1, 2]")
    with pytest.raises(AssertionError, match="walked"):
        parse_request('{"Params":1,"Route":"r"}')  # another order: the walk reads it
