"""The envelope, sans-I/O: bytes in, values and error envelopes out."""

from __future__ import annotations

import enum
import json
import logging
import math
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from conftest import TIMEOUT, ErrorLogs, make_server, running
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


def _circular_list() -> List[Any]:
    loop: List[Any] = [1]
    loop.append({"again": loop})
    return loop


def _circular_dict() -> Dict[str, Any]:
    loop: Dict[str, Any] = {}
    loop["self"] = loop
    return loop


def _deep() -> List[Any]:
    # Deeper than any recursion limit, C or Python's: the encoder gives up, never crashes.
    value: List[Any] = []
    for _ in range(100_000):
        value = [value]
    return value


class _ItemsFail(dict):  # type: ignore[type-arg]
    """A dict subclass whose items() (which the encoder calls) fails: user code."""

    def items(self) -> Any:
        raise LookupError("items() failed")


#: (label, make the value, the exception encode_result raises): a value made lazily, so
#: the parameter ids stay readable and a 100,000-deep list is built only when used.
NOT_ENCODABLE: List[Tuple[str, Any, Type[BaseException]]] = [
    ("inf", lambda: {"x": math.inf}, ValueError),
    ("-inf nested", lambda: [1, {"y": [-math.inf]}], ValueError),
    ("nan nested", lambda: {"a": {"b": (math.nan,)}}, ValueError),
    ("inf dict key", lambda: {math.inf: 1}, ValueError),
    ("nan dict key", lambda: {math.nan: 1}, ValueError),
    ("tuple dict key", lambda: {(1, 2): "pair"}, TypeError),
    ("object dict key", lambda: {object(): 1}, TypeError),
    ("circular list", _circular_list, ValueError),
    ("circular dict", _circular_dict, ValueError),
    ("set", lambda: {1, 2}, TypeError),
    ("object", object, TypeError),
    ("complex nested", lambda: [1j], TypeError),
    ("too deep", _deep, RecursionError),
    ("items() fails", lambda: _ItemsFail(a=1), LookupError),
]
if hasattr(sys, "get_int_max_str_digits"):  # 3.9.14, 3.10.7, 3.11 and later
    NOT_ENCODABLE.append(("int over the digit limit", lambda: {"n": 10 ** 5000}, ValueError))


@pytest.fixture
def default_digit_limit() -> Iterator[None]:
    """Python's default int digit limit, whatever PYTHONINTMAXSTRDIGITS says."""
    if not hasattr(sys, "set_int_max_str_digits"):
        yield
        return
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(4300)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(previous)


@pytest.mark.parametrize("text", [True, False], ids=["text", "binary"])
@pytest.mark.parametrize("label, make, error", NOT_ENCODABLE, ids=[c[0] for c in NOT_ENCODABLE])
def test_encode_result_refuses_what_json_cannot_carry(
        label: str, make: Any, error: Type[BaseException], text: bool,
        default_digit_limit: None) -> None:
    with pytest.raises(error):
        encode_result(make(), text)


def test_encode_result_names_the_problem() -> None:
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        encode_result([math.nan], True)
    with pytest.raises(ValueError, match="Circular reference detected"):
        encode_result(_circular_list(), True)
    with pytest.raises(TypeError, match="keys must be str, int, float, bool or None"):
        encode_result({(1,): 1}, False)
    # Non-str keys JSON can carry become strings, as json.dumps makes them.
    assert encode_result({1: "a", None: "b", False: "c", 2.5: "d"}, True) == (
        '{"1":"a","null":"b","false":"c","2.5":"d"}')


class _Colour(str, enum.Enum):
    RED = "red"


class _Tagged(bytes):
    pass


class _Shouty(str):
    def __str__(self) -> str:
        return "SHOUT"


@pytest.mark.parametrize(
    "result, text, expected",
    [
        (_Colour.RED, True, "red"),
        (_Colour.RED, False, b"red"),
        (_Shouty("quiet"), True, "quiet"),
        (_Tagged(b"\xc3\xa9"), True, "\u00e9"),
        (_Tagged(b"\xff"), False, b"\xff"),
    ],
    ids=["str enum text", "str enum binary", "str subclass", "bytes subclass text",
         "bytes subclass binary"],
)
def test_encode_result_subclasses_go_as_their_base(result: Any, text: bool,
                                                   expected: Any) -> None:
    """A str or bytes subclass goes out as its characters or bytes, as a push does
    (``as_message``), not as a JSON string nor refused; and as the exact base type."""
    reply = encode_result(result, text)
    assert reply == expected and type(reply) is type(expected)


BAD_RESULT = '{"code":1,"msg":"internal error","data":null}'


@pytest.mark.parametrize("label, make, error", NOT_ENCODABLE, ids=[c[0] for c in NOT_ENCODABLE])
def test_dispatch_answers_bad_result_for_what_json_cannot_carry(
        label: str, make: Any, error: Type[BaseException], error_logs: ErrorLogs,
        default_digit_limit: None) -> None:
    value = make()
    d = Dispatcher({"bad": lambda ctx, m: value}.get, lambda r, p, c, dl: None,
                   logger=logging.getLogger("wsroute_sync.test_routing"),
                   handler_timeout=None)
    conn = FakeConnection()
    assert d.dispatch(conn, '{"Route":"bad"}') == BAD_RESULT
    assert d.dispatch(conn, b'{"Route":"bad"}') == BAD_RESULT.encode()
    assert conn.metrics.errors == {"bad_result": 2}
    assert error_logs.messages() == [
        f"handler for route 'bad' returned a value JSON cannot encode: {type(value).__name__}"
    ] * 2
    assert all(r.exc_info is not None and r.exc_info[0] is error for r in error_logs.records)


def test_a_result_json_cannot_carry_over_a_socket(error_logs: ErrorLogs) -> None:
    """Over a real connection: every such result gets the bad_result envelope, nothing
    invalid reaches the wire, the connection goes on; pushes raise in the caller."""
    server = make_server()
    values = {"inf": {"x": math.inf}, "nan": [math.nan], "tuple_key": {(1, 2): 1},
              "circular": _circular_list(), "object": object()}
    for name, value in values.items():
        server.route(name)(lambda ctx, m, value=value: value)
    pushes: List[str] = []

    @server.route("push")
    def push(ctx: Any, message: bytes) -> str:
        for value in ({"x": -math.inf}, _circular_dict()):
            try:
                ctx.send(value)
            except ValueError as exc:
                pushes.append(str(exc))
        try:
            ctx.server.broadcast([math.nan])
        except ValueError as exc:
            pushes.append(str(exc))
        return "pushed"

    with running(server):
        with connect(server.url, open_timeout=TIMEOUT) as ws:
            for name in values:
                ws.send(json.dumps({"Route": name}))
                assert ws.recv(timeout=TIMEOUT) == BAD_RESULT
                ws.send(json.dumps({"Route": name}).encode())
                assert ws.recv(timeout=TIMEOUT) == BAD_RESULT.encode()
            ws.send('{"Route":"push"}')
            # Nothing came before the reply: each push was refused before any write.
            assert ws.recv(timeout=TIMEOUT) == "pushed"
            ws.send('{"Route":"echo","Params":[1]}')
            assert ws.recv(timeout=TIMEOUT) == "[1]"
    assert server.stats()["errors"] == {"bad_result": 2 * len(values)}
    assert pushes == ["Out of range float values are not JSON compliant",
                      "Circular reference detected",
                      "Out of range float values are not JSON compliant"]
    assert len(error_logs.records) == 2 * len(values)
    assert all("returned a value JSON cannot encode" in m for m in error_logs.messages())


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
