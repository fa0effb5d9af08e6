"""The fast path for simple data frames gives exactly wsproto's results.

MessageStream recognises complete, final, masked text/binary frames itself and hands
every other frame to wsproto (see its docstring). These tests feed the same bytes, cut
into reads at random places, to a stream with the fast path and to one that sends every
frame through wsproto (``WSROUTE_SYNC_PURE_WSPROTO``'s mode), and require the same
messages, control outcomes and close codes from both.
"""

from __future__ import annotations

import struct
from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage, Request, TextMessage

from rawclient import encode_frame
from wsroute_sync.http import parse_request_head
from wsroute_sync.frames import CloseReceived, PingReceived, PongReceived, ProtocolFailure
from wsroute_sync.handshake import accept_upgrade
from wsroute_sync.stream import MessageStream


def make_stream(fast: bool, max_size: Optional[int]) -> MessageStream:
    client = WSConnection(ConnectionType.CLIENT)
    head = client.send(Request(host="example.com", target="/"))
    _, ws, _, _ = accept_upgrade(parse_request_head(head))
    stream = MessageStream(ws, max_message_size=max_size)
    stream.plain = fast
    return stream


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True,
          long_length: bool = False) -> bytes:
    return encode_frame(opcode, payload, fin=fin, rsv=rsv, mask=mask, extended=long_length)


def normalise(outcomes: List[Any]) -> List[Tuple[Any, ...]]:
    out: List[Tuple[Any, ...]] = []
    for item in outcomes:
        if isinstance(item, (str, bytes)):
            out.append(("msg", type(item).__name__, item))
        elif isinstance(item, PingReceived):
            out.append(("ping", bytes(item.payload)))
        elif isinstance(item, PongReceived):
            out.append(("pong", bytes(item.payload)))
        elif isinstance(item, CloseReceived):
            out.append(("close", item.code, item.reason, item.closed))
        elif isinstance(item, ProtocolFailure):
            out.append(("fail", item.code))
        else:  # pragma: no cover
            raise AssertionError(item)
    return out


def ending(stream: MessageStream, outcomes: List[Any]) -> List[Tuple[Any, ...]]:
    """After a client's Close: the state, our answer's bytes, and the state after it."""
    closes = [o for o in outcomes if isinstance(o, CloseReceived) and not o.closed]
    if not closes:
        return [("open", stream.open)]
    before = stream.state
    answer = bytes(stream.close(closes[-1].code, ""))
    return [("answer", before, answer, stream.state, stream.open, stream.close(1000, ""))]


def run(stream: MessageStream, data: bytes, cuts: List[int]) -> List[Tuple[Any, ...]]:
    outcomes: List[Any] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:]):
        got = stream.receive(data[a:b])
        while stream.deferred and not any(
                isinstance(o, (CloseReceived, ProtocolFailure)) for o in got):
            got += stream.receive(b"")  # what the connection does: answer, then read on
        outcomes += got
        # The connection stops reading at a Close or a failure.
        if any(isinstance(o, (CloseReceived, ProtocolFailure)) for o in got):
            break
    return normalise(outcomes) + ending(stream, outcomes)


texts = st.text(max_size=40).map(lambda t: t.encode("utf-8"))
blobs = st.binary(max_size=300)


@st.composite
def frames(draw: Any) -> bytes:
    kind = draw(st.sampled_from(
        ["text", "text", "binary", "binary", "bad_utf8", "fragmented", "ping", "pong",
         "close", "close", "close_odd", "garbage", "rsv", "unmasked", "reserved_opcode", "long_length", "big"]
    ))
    if kind == "text":
        return frame(1, draw(texts))
    if kind == "binary":
        return frame(2, draw(blobs))
    if kind == "bad_utf8":
        return frame(1, draw(texts) + b"\xc3\x28")
    if kind == "fragmented":
        opcode = draw(st.sampled_from([1, 2]))
        parts = draw(st.lists(texts, min_size=1, max_size=3))
        out = frame(opcode, parts[0], fin=len(parts) == 1)
        for i, part in enumerate(parts[1:], start=2):
            if draw(st.booleans()):
                out += frame(9, b"mid")
            out += frame(0, part, fin=i == len(parts))
        return out
    if kind == "ping":
        return frame(9, draw(st.binary(max_size=125)))
    if kind == "pong":
        return frame(10, draw(st.binary(max_size=125)))
    if kind == "close":
        code = draw(st.sampled_from([1000, 1001, 1002, 999, 1005, 3000, 4999, 5000]))
        return frame(8, struct.pack("!H", code) + draw(texts)[:100])
    if kind == "close_odd":
        return draw(st.sampled_from([
            frame(8, b""), frame(8, b"\x03"), frame(8, b"\x03\xe8\xc3\x28"),
            frame(8, b"\x03\xe9" + "é".encode() * 61), frame(8, b"\x03\xe8", rsv=4),
            frame(8, b"\x03\xe8", mask=False), frame(8, b"\x03\xe8", fin=False),
            frame(8, b"\x03\xe8" + b"x" * 124),
        ]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=20))
    if kind == "rsv":
        return frame(1, b"x", rsv=draw(st.integers(1, 7)))
    if kind == "unmasked":
        return frame(2, b"abc", mask=False)
    if kind == "reserved_opcode":
        return frame(draw(st.sampled_from([3, 7, 11, 15])), b"")
    if kind == "long_length":
        return frame(1, b"short", long_length=True)
    return frame(2, b"z" * draw(st.sampled_from([126, 1000, 70000])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream_frames=st.lists(frames(), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=6),
    max_size=st.sampled_from([None, 50, 1 << 20]),
)
def test_fast_path_matches_wsproto(stream_frames: List[bytes], cuts: List[int],
                                   max_size: Optional[int]) -> None:
    data = b"".join(stream_frames)
    fast = run(make_stream(True, max_size), data, cuts)
    slow = run(make_stream(False, max_size), data, cuts)
    if fast != slow and fast[-2:-1] == [("fail", 1009)] and slow[:-1] == fast[:-2]:
        # The one intended difference: a valid data frame whose header announces more
        # than max_size is refused at once, where wsproto's path waits for max_size
        # bytes of payload (which never came here) before reaching the same 1009.
        return
    assert fast == slow


def test_fast_path_handles_the_common_frames_itself() -> None:
    """The simple frames really take the fast path: wsproto never sees them."""
    stream = make_stream(True, None)
    seen: List[bytes] = []
    original = stream._ws.receive_data
    stream._ws.receive_data = lambda d: (seen.append(d), original(d))[1]  # type: ignore
    data = frame(1, "héllo".encode()) + frame(2, b"\x00" * 200) + frame(2, b"y" * 70000)
    assert stream.receive(data[:7]) == []
    assert stream.receive(data[7:]) == ["héllo", b"\x00" * 200, b"y" * 70000]
    assert seen == []
    # A ping is wsproto's.
    assert normalise(stream.receive(frame(9, b"p"))) == [("ping", b"p")]
    assert len(seen) == 1


def test_replies_match_wsproto_serialisation() -> None:
    for data in ["", "é" * 10, "x" * 125, "x" * 126, "x" * 65535, "x" * 65536, b"", b"\xff" * 300]:
        fast = make_stream(True, None).send(data)
        slow = make_stream(False, None).send(data)
        assert bytes(fast) == bytes(slow)


def test_header_announcing_too_much_is_refused_before_the_payload() -> None:
    stream = make_stream(True, 1000)
    head = struct.pack("!BBQ", 0x82, 0xFF, 1 << 40) + b"mask"
    (failure,) = stream.receive(head)
    assert isinstance(failure, ProtocolFailure) and failure.code == 1009


def test_a_frame_trickling_in_is_not_reparsed_each_time() -> None:
    stream = make_stream(True, 1 << 20)
    data = frame(2, b"q" * 100_000)
    out: List[Any] = []
    for i in range(0, len(data), 7):
        out += stream.receive(data[i:i + 7])
    assert out == [b"q" * 100_000]


def test_wsproto_client_messages_round_trip() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    head = client.send(Request(host="example.com", target="/"))
    response, ws, _, _ = accept_upgrade(parse_request_head(head))
    client.receive_data(response)
    list(client.events())
    stream = MessageStream(ws)
    burst = client.send(TextMessage(data="a")) + client.send(BytesMessage(data=b"b" * 5000))
    assert stream.receive(burst) == ["a", b"b" * 5000]
    client.receive_data(stream.send("reply") + stream.send(b"\x01"))
    assert [type(e).__name__ for e in client.events()] == ["TextMessage", "BytesMessage"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream_frames=st.lists(
        st.one_of(
            frames(),
            # Around the 7-bit/16-bit length boundary and the integer-unmask limit.
            st.builds(lambda n, op: frame(op, b"\xce\xbb" * (n // 2) + b"a" * (n % 2)),
                      st.sampled_from([0, 1, 124, 125, 126, 127, 2047, 2048, 2049, 3000]),
                      st.sampled_from([1, 2])),
            st.builds(lambda n: frame(1, b"b" * n, long_length=True), st.integers(0, 200)),
            # A fragment alone in its read: a whole frame after it is then an error.
            st.builds(lambda t, op: frame(op, t, fin=False), texts, st.sampled_from([0, 1, 2])),
            st.builds(lambda t: frame(0, t), texts),
        ),
        min_size=1, max_size=8,
    ),
    max_size=st.sampled_from([None, 50, 125, 126, 2048, 1 << 20]),
)
def test_one_frame_per_read_matches_wsproto(stream_frames: List[bytes],
                                            max_size: Optional[int]) -> None:
    """Each frame arriving in a read of its own (receive()'s single-frame check)."""
    fast = make_stream(True, max_size)
    slow = make_stream(False, max_size)
    got: List[Any] = []
    want: List[Any] = []
    for data in stream_frames:
        got += fast.receive(data)
        want += slow.receive(data)
        if any(isinstance(o, (CloseReceived, ProtocolFailure)) for o in want + got):
            break
    fast_out, slow_out = normalise(got), normalise(want)
    if fast_out != slow_out and fast_out[-1:] == [("fail", 1009)] and slow_out == fast_out[:-1]:
        return  # the early 1009 on an announced size, as in test_fast_path_matches_wsproto
    assert fast_out == slow_out
    assert ending(fast, got) == ending(slow, want)


def test_one_frame_per_read_skips_wsproto_and_the_frame_walk(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def unexpected(*args: Any) -> Any:
        raise AssertionError("the single-frame check should have decoded this read")

    stream = make_stream(True, 1 << 20)
    monkeypatch.setattr(MessageStream, "_split", unexpected)
    stream._ws.receive_data = unexpected  # type: ignore[method-assign]
    assert stream.receive(frame(1, "é".encode() * 100)) == ["é" * 100]
    assert stream.receive(frame(2, b"\x00" * 2000)) == [b"\x00" * 2000]
    assert stream.receive(frame(2, b"\x00" * 20)) == [b"\x00" * 20]


@pytest.mark.parametrize("client_code", [None, 1000, 1001])
def test_answers_to_a_close_read_here_are_wsprotos(client_code: Optional[int]) -> None:
    """Whatever code and reason the answer to a client's Close carries (the echo, or
    server.close()'s 1001 racing it), its bytes are the ones wsproto would write."""
    from wsproto.frame_protocol import CloseReason

    payload = b"" if client_code is None else struct.pack("!H", client_code) + b"bye"
    for code in [1000, 1001, 1005, 1006, 1011, 1015, 3000, 4999, CloseReason.NO_STATUS_RCVD,
                 CloseReason.NORMAL_CLOSURE]:
        for reason in ["", "server shutting down", "é" * 70]:
            if code in (1005, CloseReason.NO_STATUS_RCVD) and reason:
                continue  # no reason without a status (wsproto raises TypeError)
            answers = []
            for fast in (True, False):
                stream = make_stream(fast, None)
                (closing,) = stream.receive(frame(8, payload))
                assert isinstance(closing, CloseReceived) and not closing.closed
                answers.append((bytes(stream.close(code, reason)), stream.state,
                                stream.close(code, reason)))
            assert answers[0] == answers[1], (code, reason)
