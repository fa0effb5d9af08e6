"""Property-based tests of the sans-I/O core: random frames and random envelopes.

``MessageStream.receive`` must only ever return its documented outcomes (messages,
``PingReceived``, ``PongReceived``, ``CloseReceived``, ``ProtocolFailure`` with a close
code a server may send), end the stream with its last outcome, give the same outcomes
however the byte stream is cut into reads, and, for valid frames, exactly the messages
that were sent. ``parse_request`` must agree with a model of Go's ``encoding/json``
decoding (case-insensitive keys, the last one wins) built on ``json.loads``, or raise
``EnvelopeError``. ``Dispatcher.dispatch`` must never raise, and answer with the
handler's reply in the request's frame type or a well-formed error envelope.

Bounded: about 200 examples each, no deadline (CI machines are slow and shared).
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from rawclient import encode_frame

from wsroute_sync.context import Context
from wsroute_sync.errors import HandlerError
from wsroute_sync.http import parse_request_head
from wsroute_sync.metrics import ConnectionMetrics
from wsroute_sync.frames import CloseReceived, PingReceived, PongReceived, ProtocolFailure
from wsroute_sync.handshake import accept_upgrade
from wsroute_sync.stream import MessageStream
from wsroute_sync.routing import Dispatcher, EnvelopeError, encode_result, parse_request

BOUNDED = settings(max_examples=200, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Close codes a peer may send (RFC 6455 7.4.1, 7.4.2; wsproto's registry for < 3000).
VALID_PEER_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4000, 4999]
#: What failing the connection may answer: protocol error, bad data, too big.
FAILURE_CODES = {1002, 1007, 1009}


# The frame side.


def pair(compression: bool, max_size: Optional[int]) -> Tuple[MessageStream, WSConnection]:
    """A server MessageStream (as the connection builds it) and a wsproto client."""
    client = WSConnection(ConnectionType.CLIENT)
    extensions = [PerMessageDeflate()] if compression else []
    head = client.send(Request(host="example.com", target="/", extensions=extensions))
    response, ws, _, deflate = accept_upgrade(
        parse_request_head(head), compression="deflate" if compression else None)
    assert deflate is compression
    client.receive_data(response)
    assert isinstance(next(client.events()), AcceptConnection)
    return MessageStream(ws, max_message_size=max_size, extensions=deflate), client


def raw_frame(opcode: int, payload: bytes, mask: bytes, *, fin: bool = True, rsv: int = 0,
              masked: bool = True, length: Optional[int] = None) -> bytes:
    """A client frame with a chosen masking key; ``length`` may lie about the payload."""
    return encode_frame(opcode, payload, fin=fin, rsv=rsv, mask=masked, length=length,
                        key=mask)


Expected = Tuple[Any, ...]
# An item of a script: the bytes it puts on the wire, and what the stream should make of
# them: messages and control outcomes, ("frag", size) for each data frame's payload, or
# ("corrupt", ending) for a violation and the ending it causes (None: not predicted).
Item = Tuple[bytes, List[Expected]]

texts = st.text(max_size=60)
blobs = st.binary(max_size=200)
masks = st.binary(min_size=4, max_size=4)


@st.composite
def raw_items(draw: Any, max_size: Optional[int]) -> Item:
    """One uncompressed item: a message (maybe fragmented), a control frame, or junk."""
    kind = draw(st.sampled_from(
        ["text", "text", "binary", "fragmented", "fragmented", "ping", "pong", "close",
         "close_empty", "corrupt"]))
    mask = draw(masks)
    if kind in ("text", "binary", "fragmented"):
        is_text = kind == "text" or (kind == "fragmented" and draw(st.booleans()))
        payload = draw(texts).encode() if is_text else draw(blobs)
        opcode = 1 if is_text else 2
        if kind != "fragmented":
            return raw_frame(opcode, payload, mask), [("frag", len(payload)),
                                                      ("msg", is_text, payload)]
        # Cut anywhere, even inside a UTF-8 sequence (RFC 6455 5.6: only the whole
        # message must be valid), with control frames between the fragments.
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        bounds = [0] + cuts + [len(payload)]
        out = b""
        outcomes: List[Expected] = []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            out += raw_frame(opcode if i == 0 else 0, payload[a:b], mask,
                             fin=i == len(bounds) - 2)
            outcomes.append(("frag", b - a))
            if i < len(bounds) - 2 and draw(st.booleans()):
                ping = draw(st.binary(max_size=8))
                out += raw_frame(9, ping, mask)
                outcomes.append(("ping", ping))
        return out, outcomes + [("msg", is_text, payload)]
    if kind == "ping":
        payload = draw(st.binary(max_size=125))
        return raw_frame(9, payload, mask), [("ping", payload)]
    if kind == "pong":
        payload = draw(st.binary(max_size=125))
        return raw_frame(10, payload, mask), [("pong", payload)]
    if kind == "close":
        code = draw(st.sampled_from(VALID_PEER_CODES))
        reason = draw(st.text(max_size=30))
        assume(len(reason.encode()) <= 123)
        return (raw_frame(8, struct.pack("!H", code) + reason.encode(), mask),
                [("close", code, reason)])
    if kind == "close_empty":
        return raw_frame(8, b"", mask), [("close", 1005, "")]
    corrupt: Item = draw(corruptions(mask, max_size, False))
    return corrupt


@st.composite
def corruptions(draw: Any, mask: bytes, max_size: Optional[int], deflate: bool) -> Item:
    """A protocol violation, and the ending it must cause (``None``: not predicted)."""
    kind = draw(st.sampled_from(
        ["unmasked", "rsv", "opcode", "big_control", "fragmented_control", "continuation",
         "bad_utf8", "bad_close_code", "bad_close_reason", "close_1_byte", "huge_length",
         "non_minimal_length", "interleaved_data", "flipped_bit", "junk"]))
    fail_1002: Optional[Expected] = ("fail", 1002)
    ending: Optional[Expected]
    if kind == "unmasked":
        return raw_frame(draw(st.sampled_from([1, 2, 9])), b"x", mask, masked=False), [
            ("corrupt", fail_1002)]
    if kind == "rsv":
        rsv = draw(st.integers(1, 7))
        # With permessage-deflate RSV1 is legal on a data frame: "x" then fails to inflate.
        ending = None if deflate and rsv == 4 else fail_1002
        return raw_frame(draw(st.sampled_from([1, 2, 9])), b"x", mask, rsv=rsv), [
            ("corrupt", ending)]
    if kind == "opcode":
        opcode = draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]))
        return raw_frame(opcode, b"", mask), [("corrupt", fail_1002)]
    if kind == "big_control":
        opcode = draw(st.sampled_from([8, 9, 10]))
        return raw_frame(opcode, b"\x03\xe8" + b"x" * 124, mask), [("corrupt", fail_1002)]
    if kind == "fragmented_control":
        opcode = draw(st.sampled_from([8, 9, 10]))
        return raw_frame(opcode, b"", mask, fin=False), [("corrupt", fail_1002)]
    if kind == "continuation":
        return raw_frame(0, b"x", mask, fin=draw(st.booleans())), [("corrupt", fail_1002)]
    if kind == "bad_utf8":
        good = draw(texts).encode()
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82",
                                    b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
        payload = good + bad
        too_big = max_size is not None and len(payload) > max_size
        # Too big and not UTF-8: either answer is right; the header alone says too big.
        ending = ("fail", 1007) if not too_big else (
            None if deflate else ("fail", 1009))
        return raw_frame(1, payload, mask), [("corrupt", ending)]
    if kind == "bad_close_code":
        code = draw(st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]))
        return raw_frame(8, struct.pack("!H", code), mask), [("corrupt", fail_1002)]
    if kind == "bad_close_reason":
        return raw_frame(8, b"\x03\xe8\xc3\x28", mask), [("corrupt", ("fail", 1007))]
    if kind == "close_1_byte":
        return raw_frame(8, b"\x03", mask), [("corrupt", fail_1002)]
    if kind == "huge_length":
        length = draw(st.sampled_from([1 << 63, (1 << 63) - 1, 1 << 40]))
        if length >> 63:
            ending = fail_1002  # RFC 6455 5.2: the most significant bit must be 0
        elif max_size is not None:
            ending = None if deflate else ("fail", 1009)  # refused on the header
        else:
            ending = ("close", 1006, "")  # waits for the payload: end of stream comes
        opcode = draw(st.sampled_from([1, 2]))
        return raw_frame(opcode, b"", mask, length=length), [("corrupt", ending)]
    if kind == "non_minimal_length":
        return struct.pack("!BBQ", 0x81, 0xFF, 3) + mask + b"abc", [("corrupt", fail_1002)]
    if kind == "interleaved_data":
        return (raw_frame(1, b"a", mask, fin=False)
                + raw_frame(draw(st.sampled_from([1, 2])), b"b", mask)), [
            ("corrupt", fail_1002)]
    if kind == "flipped_bit":
        good = raw_frame(1, draw(texts).encode(), mask)
        bit = draw(st.integers(0, len(good) * 8 - 1))
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped), [("corrupt", None)]
    return draw(st.binary(min_size=1, max_size=40)), [("corrupt", None)]


@st.composite
def deflate_items(draw: Any, client: WSConnection, max_size: Optional[int]) -> Item:
    """Valid items written by a wsproto client with permessage-deflate, or junk."""
    kind = draw(st.sampled_from(["text", "binary", "fragmented", "ping", "close", "corrupt"]))
    if kind == "text":
        text = draw(texts)
        return client.send(TextMessage(data=text)), [("frag", len(text.encode())),
                                                      ("msg", True, text.encode())]
    if kind == "binary":
        data = draw(blobs)
        return client.send(BytesMessage(data=data)), [("frag", len(data)),
                                                      ("msg", False, data)]
    if kind == "fragmented":
        parts = draw(st.lists(texts, min_size=1, max_size=3))
        out = b""
        outcomes: List[Expected] = []
        for i, part in enumerate(parts):
            out += client.send(TextMessage(data=part, message_finished=i == len(parts) - 1))
            outcomes.append(("frag", len(part.encode())))
        return out, outcomes + [("msg", True, "".join(parts).encode())]
    if kind == "ping":
        payload = draw(st.binary(max_size=125))
        return client.send(Ping(payload=payload)), [("ping", payload)]
    if kind == "close":
        code = draw(st.sampled_from(VALID_PEER_CODES))
        return client.send(CloseConnection(code=code)), [("close", code, "")]
    corrupt: Item = draw(corruptions(draw(masks), max_size, True))
    return corrupt


def normalise(item: Any) -> Expected:
    """An outcome as a comparable tuple; fails on anything undocumented."""
    if type(item) is str:
        return ("msg", True, item.encode("utf-8"))
    if type(item) is bytes:
        return ("msg", False, item)
    if isinstance(item, PingReceived):
        return ("ping", bytes(item.payload))
    if isinstance(item, PongReceived):
        return ("pong", bytes(item.payload))
    if isinstance(item, CloseReceived):
        assert isinstance(item.reason, str)
        return ("close", item.code, item.reason)
    if isinstance(item, ProtocolFailure):
        assert item.code in FAILURE_CODES, (item.code, item.reason)
        assert isinstance(item.reason, str)
        return ("fail", item.code)
    raise AssertionError(f"undocumented outcome {item!r}")


def feed(stream: MessageStream, data: bytes, cuts: Sequence[int]) -> List[Expected]:
    """Feed ``data`` cut at ``cuts``, as the connection does: stop at an ending outcome."""
    points = sorted({c for c in cuts if 0 < c < len(data)} | {0, len(data)})
    out: List[Expected] = []
    for a, b in zip(points, points[1:]):
        got = [normalise(item) for item in stream.receive(data[a:b])]
        # receive() may stop before a Close so that earlier messages are answered
        # first; ``deferred`` then asks for receive(b"") (as the connection does).
        while getattr(stream, "deferred", False):
            assert got, "deferred with nothing to answer first"
            got += [normalise(item) for item in stream.receive(b"")]
        for i, outcome in enumerate(got):
            if outcome[0] in ("close", "fail"):
                # The connection stops reading at an ending outcome: it must be the last.
                assert i == len(got) - 1, got
                out += got
                return out
        out += got
    # End of stream without a Close: an abnormal closure (1006), and nothing else.
    end = [normalise(item) for item in stream.receive(None)]
    assert end == [("close", 1006, "")], end
    return out + end


def expected_outcomes(items: List[Item], max_size: Optional[int]) -> Tuple[List[Expected], str]:
    """What the stream must produce, and how far that is known.

    ``"exact"``: all of it. ``"corrupt"``: the outcomes before a corruption whose
    ending is not predicted, then some ending. ``"too_big"``: the outcomes before the
    fragment that crossed ``max_message_size``, then pings only, then 1009 (a UTF-8
    sequence cut between fragments is counted with the fragment that completes it, so
    the crossing can show one fragment later).
    """
    out: List[Expected] = []
    for _, outcomes in items:
        size = 0
        for outcome in outcomes:
            if outcome[0] == "corrupt":
                ending = outcome[1]
                return (out, "corrupt") if ending is None else (out + [ending], "exact")
            if outcome[0] == "frag":
                size += outcome[1]
                if max_size is not None and size > max_size:
                    return out, "too_big"
                continue
            out.append(outcome)
            if outcome[0] == "close":
                return out, "exact"
    return out + [("close", 1006, "")], "exact"


@BOUNDED
@given(
    data=st.data(),
    compression=st.booleans(),
    max_size=st.sampled_from([None, None, 64, 1 << 20]),
    cuts_a=st.lists(st.integers(0, 4000), max_size=8),
    cuts_b=st.one_of(st.lists(st.integers(0, 4000), max_size=40),
                     st.integers(1, 7)),  # or reads of k bytes each, trickling in
)
def test_message_stream_outcomes_are_documented_and_independent_of_reads(
    data: Any, compression: bool, max_size: Optional[int], cuts_a: List[int],
    cuts_b: Any,
) -> None:
    stream_a, client = pair(compression, max_size)
    stream_b, _ = pair(compression, max_size)
    items: List[Item] = []
    for _ in range(data.draw(st.integers(1, 8))):
        item = data.draw(deflate_items(client, max_size) if compression
                         else raw_items(max_size))
        items.append(item)
        if item[1][-1][0] in ("close", "corrupt"):
            break  # nothing valid can follow a Close or a corruption
    wire = b"".join(chunk for chunk, _ in items)
    if isinstance(cuts_b, int):
        cuts_b = list(range(cuts_b, len(wire), cuts_b))
    got_a = feed(stream_a, wire, cuts_a)
    got_b = feed(stream_b, wire, cuts_b)
    assert got_a == got_b  # however the bytes were cut into reads
    expected, known = expected_outcomes(items, max_size)
    if known == "exact":
        assert got_a == expected
    elif known == "too_big":
        assert got_a[:len(expected)] == expected and got_a[-1] == ("fail", 1009), got_a
        assert all(o[0] == "ping" for o in got_a[len(expected):-1]), got_a
    else:
        # Up to the corruption, exactly what was sent; then a documented ending.
        assert got_a[:len(expected)] == expected
        assert got_a[-1][0] in ("close", "fail")


@BOUNDED
@given(chunk=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=10))
def test_message_stream_survives_pure_junk(chunk: bytes, cuts: List[int]) -> None:
    stream, _ = pair(False, 1000)
    got = feed(stream, chunk, cuts)
    assert got[-1][0] in ("close", "fail")


@BOUNDED
@given(messages=st.lists(st.one_of(texts, blobs), max_size=6),
       compression=st.booleans())
def test_server_frames_are_read_back_by_a_wsproto_client(
    messages: List[Any], compression: bool
) -> None:
    stream, client = pair(compression, None)
    wire = b"".join(stream.send(m) for m in messages) + stream.ping(b"k") + stream.close(1000)
    client.receive_data(wire)
    events = list(client.events())
    got = [e.data if isinstance(e, TextMessage) else bytes(e.data)
           for e in events if isinstance(e, (TextMessage, BytesMessage))]
    assert got == messages
    assert [type(e).__name__ for e in events[len(messages):]] == ["Ping", "CloseConnection"]
    if not compression:
        for message in messages:
            frame = stream_frame_header(pair(False, None)[0].send(message))
            assert frame == (True, 0, False)  # FIN, no RSV, unmasked (RFC 6455 5.1)


def stream_frame_header(frame: bytes) -> Tuple[bool, int, bool]:
    return bool(frame[0] & 0x80), (frame[0] >> 4) & 7, bool(frame[1] & 0x80)


# The envelope side.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
route_keys = st.sampled_from(["Route", "route", "ROUTE", "rOuTe"])
params_keys = st.sampled_from(["Params", "params", "PARAMS", "pArAmS"])
other_keys = st.text(max_size=8).filter(lambda k: k.lower() not in ("route", "params"))
whitespace = st.text(alphabet=" \t\r\n", max_size=2)


@st.composite
def envelopes(draw: Any) -> str:
    """A JSON object written by hand: keys in any case, repeated, any whitespace."""
    pairs: List[Tuple[str, Any]] = []
    for _ in range(draw(st.integers(0, 5))):
        which = draw(st.sampled_from(["route", "route", "params", "other"]))
        if which == "route":
            value = draw(st.text(max_size=20) | json_values)
            pairs.append((draw(route_keys), value))
        elif which == "params":
            pairs.append((draw(params_keys), draw(json_values)))
        else:
            pairs.append((draw(other_keys), draw(json_values)))
    ascii_only = draw(st.booleans())
    ws: List[str] = [draw(whitespace) for _ in range(len(pairs) * 4 + 2)]
    members = [
        ws[4 * i] + json.dumps(k, ensure_ascii=ascii_only) + ws[4 * i + 1] + ":"
        + ws[4 * i + 2] + json.dumps(v, ensure_ascii=ascii_only) + ws[4 * i + 3]
        for i, (k, v) in enumerate(pairs)
    ]
    return ws[-2] + "{" + ",".join(members) + ("" if members else ws[-1]) + "}" + ws[-1]


@st.composite
def mutated(draw: Any) -> str:
    """A valid envelope with a few characters deleted, replaced or inserted."""
    text: str = draw(envelopes())
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["delete", "insert", "replace"]))
        char = draw(st.sampled_from(list('{}[]",:\\ 0-eE.tnfa\x00\ud800é')))
        if op == "delete":
            text = text[:pos] + text[pos + 1:]
        elif op == "insert":
            text = text[:pos] + char + text[pos:]
        else:
            text = text[:pos] + char + text[pos + 1:]
    return text


class _Invalid(Exception):
    pass


class _Object(list):  # type: ignore[type-arg]
    """A JSON object as the model sees it: its members in order, duplicates kept."""


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # RFC 8259 6: no NaN, no Infinity


def model(message: str) -> Tuple[str, Any]:
    """Go's encoding/json into struct{Route string; Params json.RawMessage}, on json.loads."""
    try:
        pairs = json.loads(message, object_pairs_hook=_Object, parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise _Invalid from None
    if not isinstance(pairs, _Object):
        raise _Invalid
    route: Any = None
    params: Any = None
    has_route = False
    for key, value in pairs:
        if key.lower() == "route":
            route, has_route = value, True
        elif key.lower() == "params":
            params = value
    if not has_route or not isinstance(route, str):
        raise _Invalid
    return route, _plain(params)


def _plain(value: Any) -> Any:
    """The model's objects back to dicts (a repeated member: the last wins, as dict())."""
    if isinstance(value, _Object):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_against_model(message: str) -> None:
    try:
        expected: Optional[Tuple[str, Any]] = model(message)
    except _Invalid:
        expected = None
    # A raw (unescaped) surrogate cannot be in UTF-8: as bytes, the message is invalid.
    raw_surrogate = any("\ud800" <= ch <= "\udfff" for ch in message)
    forms: List[Tuple[Any, Optional[Tuple[str, Any]]]] = [
        (message, expected),
        (message.encode("utf-8", "surrogatepass"), None if raw_surrogate else expected),
    ]
    for form, want in forms:
        try:
            route, params, params_text = parse_request(form)
        except EnvelopeError as exc:
            assert isinstance(exc.msg, str) and exc.msg
            assert want is None, (form, exc.msg, want)
            continue
        assert want is not None, (form, route, params)
        assert type(route) is str and route == want[0]
        assert same_json(params, want[1])
        # The handler's bytes are JSON for exactly the same value.
        assert same_json(json.loads(params_text), params)


@BOUNDED
@given(message=envelopes())
def test_parse_request_agrees_with_the_model_on_envelopes(message: str) -> None:
    check_against_model(message)


@BOUNDED
@given(message=mutated())
def test_parse_request_agrees_with_the_model_on_broken_envelopes(message: str) -> None:
    check_against_model(message)


@BOUNDED
@given(message=st.text(alphabet='{}[]",:\\ 0123456789.eE-+truefalsnRoutePams\ud800é',
                       max_size=60))
def test_parse_request_agrees_with_the_model_on_json_soup(message: str) -> None:
    check_against_model(message)


# The dispatcher.


class _Unsupported:
    pass


handler_results = st.one_of(
    st.none(), json_values, st.binary(max_size=20), st.text(max_size=20),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(),
            min_size=1, max_size=4),  # lone surrogates: a str with no UTF-8 form
    st.just(_Unsupported()), st.just({1, 2}), st.just(float("nan")),
    st.just(b"\xff\xfe"), st.just(bytearray(b"ba")), st.just({"k": object()}),
)


class _Connection:
    """What the dispatcher and a Context need of a connection."""

    def __init__(self) -> None:
        self.metrics = ConnectionMetrics()
        self.id = "c1"
        self.values: Dict[str, Any] = {}


def _quiet_logger() -> logging.Logger:
    logger = logging.getLogger("test.property.dispatch")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def is_error_envelope(reply: Any, text: bool) -> bool:
    raw = reply if text else reply.decode("utf-8")
    if not raw.startswith('{"code":1,"msg":'):
        return False
    decoded = json.loads(raw)
    assert list(decoded) == ["code", "msg", "data"], raw
    assert decoded["code"] == 1 and decoded["data"] is None
    assert isinstance(decoded["msg"], str) and decoded["msg"]  # ours are never empty
    return True


@BOUNDED
@given(
    message=st.one_of(envelopes(), mutated(), st.builds(
        lambda r, p: json.dumps({"Route": r, "Params": p}),
        st.sampled_from(["echo", "raise", "refuse", "result", "missing"]), json_values)),
    binary=st.booleans(),
    result=handler_results,
    refusal=st.text(max_size=20),
)
def test_dispatch_never_raises_and_answers_in_kind(
    message: str, binary: bool, result: Any, refusal: str
) -> None:
    assume(not any("\ud800" <= ch <= "\udfff" for ch in message))
    calls: List[Tuple[str, bytes]] = []

    def handler(name: str) -> Any:
        def handle(ctx: Any, raw: bytes) -> Any:
            calls.append((name, raw))
            assert isinstance(raw, bytes)
            if name == "echo":
                return raw
            if name == "raise":
                raise RuntimeError("boom")
            if name == "refuse":
                raise HandlerError(refusal)
            return result
        return handle

    handlers = {name: handler(name) for name in ("echo", "raise", "refuse", "result")}
    dispatcher = Dispatcher(handlers.get, Context, logger=_quiet_logger(),
                            handler_timeout=None)
    request: Any = message.encode("utf-8") if binary else message
    reply = dispatcher.dispatch(_Connection(), request)
    text = not binary
    if isinstance(reply, str):
        reply.encode("utf-8")  # whatever it is, it can go out in a text frame
    if not calls:
        # Never reached a handler: refused with an envelope, in the request's frame type.
        assert isinstance(reply, str if text else bytes)
        assert is_error_envelope(reply, text)
        return
    (name, raw), = calls
    json.loads(raw)  # the handler's bytes are JSON
    if name == "raise":
        assert reply == ('{"code":1,"msg":"internal error","data":null}' if text
                         else b'{"code":1,"msg":"internal error","data":null}')
        return
    if name == "refuse":
        assert isinstance(reply, str if text else bytes)
        assert json.loads(reply) == {"code": 1, "msg": refusal, "data": None}
        return
    produced = raw if name == "echo" else result
    if produced is None:
        assert reply is None
        return
    assert isinstance(reply, str if text else bytes)
    try:
        expected = encode_result(produced, text)
        if isinstance(expected, str):
            expected.encode("utf-8")  # a text frame must be UTF-8 (RFC 6455 5.6)
    except (TypeError, ValueError, RecursionError):
        assert is_error_envelope(reply, text)  # a result that cannot be sent
        return
    assert reply == expected


def test_dispatch_text_replies_are_always_utf8_encodable() -> None:
    # Regression: encode_result passed a lone surrogate through as the text reply.
    dispatcher = Dispatcher({"s": lambda ctx, raw: "\ud800"}.get, Context,
                            logger=_quiet_logger(), handler_timeout=None)
    reply = dispatcher.dispatch(_Connection(), '{"Route":"s"}')
    assert isinstance(reply, str)
    reply.encode("utf-8")
