"""The protocol core, sans-I/O: handshake decisions and MessageStream, bytes in and out."""

from __future__ import annotations

import base64
import hashlib
from typing import Any, List, Optional, Sequence, Tuple

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

from wsroute_sync import HandshakeRejected
from wsroute_sync.http import BadRequest, Headers, HTTPRequest, parse_request_head
from wsroute_sync.frames import CloseReceived, PingReceived, ProtocolFailure
from wsroute_sync.handshake import (
    accept_upgrade,
    check_upgrade,
    default_origin_check,
    is_upgrade_request,
)
from wsroute_sync.stream import MessageStream

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def request(
    extra: Sequence[Tuple[str, str]] = (),
    omit: Sequence[str] = (),
    method: str = "GET",
    version: str = "1.1",
    target: str = "/",
) -> HTTPRequest:
    headers = {"host": "example.com", "upgrade": "websocket", "connection": "Upgrade",
               "sec-websocket-key": KEY, "sec-websocket-version": "13"}
    for name in omit:
        headers.pop(name)
    items = list(headers.items()) + list(extra)
    return HTTPRequest(method, target, Headers(items), version)


def status_of(req: HTTPRequest, **kwargs: Any) -> Optional[int]:
    try:
        check_upgrade(req, **kwargs)
    except HandshakeRejected as exc:
        return exc.status
    return None


def test_accept_token_is_rfc6455_example() -> None:
    response, _, _, _ = accept_upgrade(request())
    # RFC 6455 1.3: this key's accept value is s3pPLMBiTxaQ9kYGzzhZRbK+xOo=.
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in response
    expected = base64.b64encode(hashlib.sha1(
        (KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    assert expected == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert response.startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize(
    "req, status",
    [
        (request(), None),
        (request(method="POST"), 405),
        (request(version="1.0"), 505),
        (request(omit=["host"]), 400),
        (request(omit=["connection"]), 426),
        (request(omit=["sec-websocket-version"]), 400),
        (request(omit=["sec-websocket-version"], extra=[("sec-websocket-version", "8")]), 426),
        (request(omit=["sec-websocket-key"]), 400),
        (request(omit=["sec-websocket-key"], extra=[("sec-websocket-key", "short")]), 400),
        (request(omit=["sec-websocket-key"], extra=[("sec-websocket-key", "!!notbase64!!!!!")]),
         400),
        (request(extra=[("sec-websocket-key", KEY)]), 400),
    ],
)
def test_check_upgrade_statuses(req: HTTPRequest, status: Optional[int]) -> None:
    assert status_of(req) == status


def test_path_and_origin_policy() -> None:
    assert status_of(request(target="/ws"), paths=("/ws",)) is None
    assert status_of(request(target="/x"), paths=("/ws",)) == 404
    same = request(extra=[("origin", "https://example.com")])
    other = request(extra=[("origin", "https://evil.example")])
    assert default_origin_check(request())
    assert default_origin_check(same)
    assert not default_origin_check(other)
    assert status_of(other) == 403
    assert status_of(other, allowed_origins=("https://evil.example",)) is None
    assert status_of(other, allowed_origins=("*",)) is None
    assert status_of(same, allowed_origins=("https://other",)) == 403
    assert status_of(other, check_origin=lambda r: True) is None


def test_is_upgrade_request() -> None:
    assert is_upgrade_request(request())
    assert not is_upgrade_request(request(omit=["upgrade"]))
    assert is_upgrade_request(request(omit=["upgrade"], extra=[("upgrade", "h2c, WebSocket")]))


def test_parse_request_head_errors() -> None:
    with pytest.raises(BadRequest) as info:
        parse_request_head(b"\x16\x03\x01\x02\x00\r\n\r\n")
    assert info.value.status == 400
    with pytest.raises(BadRequest) as info:
        parse_request_head(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")
    assert info.value.status == 505
    req = parse_request_head(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert (req.path, req.query, req.headers.get_all("X-A")) == ("/a", "b=c", ["1", "2"])


def test_subprotocol_negotiation_prefers_the_server_order() -> None:
    req = request(extra=[("sec-websocket-protocol", "chat.v1, chat.v2")])
    response, _, chosen, _ = accept_upgrade(req, subprotocols=["chat.v2", "chat.v1"])
    assert chosen == "chat.v2"
    assert b"Sec-WebSocket-Protocol: chat.v2" in response
    _, _, chosen, _ = accept_upgrade(req, subprotocols=["other"])
    assert chosen is None


def pair(compression: Optional[str] = None, max_size: Optional[int] = None
         ) -> Tuple[MessageStream, WSConnection]:
    """A MessageStream (server) and a wsproto client, connected in memory."""
    client = WSConnection(ConnectionType.CLIENT)
    from wsproto.extensions import PerMessageDeflate
    exts = [PerMessageDeflate()] if compression else []
    head = client.send(Request(host="example.com", target="/", extensions=exts))
    response, ws, _, deflate = accept_upgrade(parse_request_head(head), compression=compression)
    assert deflate is bool(compression)
    client.receive_data(response)
    assert isinstance(next(client.events()), AcceptConnection)
    return MessageStream(ws, max_message_size=max_size, extensions=deflate), client


def client_events(client: WSConnection, data: bytes) -> List[Any]:
    client.receive_data(data)
    return list(client.events())


def test_whole_messages_in_and_frames_out() -> None:
    stream, client = pair()
    assert stream.receive(client.send(TextMessage(data="héllo"))) == ["héllo"]
    assert stream.receive(client.send(BytesMessage(data=b"\x00\x01"))) == [b"\x00\x01"]
    # A fragmented message comes out whole.
    parts = (client.send(TextMessage(data="ab", message_finished=False))
             + client.send(TextMessage(data="cd", message_finished=True)))
    assert stream.receive(parts) == ["abcd"]
    # Several messages in one read come out in order.
    burst = b"".join(client.send(TextMessage(data=str(i))) for i in range(5))
    assert stream.receive(burst) == ["0", "1", "2", "3", "4"]
    (event,) = client_events(client, stream.send("reply"))
    assert isinstance(event, TextMessage) and event.data == "reply"
    (event,) = client_events(client, stream.send(b"bin"))
    assert isinstance(event, BytesMessage) and event.data == b"bin"


def test_frames_split_across_reads() -> None:
    stream, client = pair()
    frame = client.send(TextMessage(data="x" * 300))
    out: List[Any] = []
    for i in range(len(frame)):
        out += stream.receive(frame[i:i + 1])
    assert out == ["x" * 300]


def test_max_message_size_fails_with_1009() -> None:
    stream, client = pair(max_size=10)
    assert stream.receive(client.send(TextMessage(data="x" * 10))) == ["x" * 10]
    (failure,) = stream.receive(client.send(TextMessage(data="x" * 11)))
    assert isinstance(failure, ProtocolFailure) and failure.code == 1009
    stream, client = pair(max_size=10)
    parts = b"".join(client.send(BytesMessage(data=b"x" * 4, message_finished=False))
                     for _ in range(3))
    (failure,) = stream.receive(parts)
    assert isinstance(failure, ProtocolFailure) and failure.code == 1009


def test_compressed_messages_count_against_the_limit_after_inflating() -> None:
    stream, client = pair(compression="deflate", max_size=1000)
    frame = client.send(TextMessage(data="a" * 5000))
    assert len(frame) < 100
    (failure,) = stream.receive(frame)
    assert isinstance(failure, ProtocolFailure) and failure.code == 1009
    stream, client = pair(compression="deflate", max_size=10000)
    assert stream.receive(client.send(TextMessage(data="a" * 5000))) == ["a" * 5000]


@pytest.mark.parametrize("compression", [None, "deflate"])
@pytest.mark.parametrize("shape", ["one frame in parts", "first fragment"])
def test_invalid_utf8_fails_before_the_rest_of_the_message_arrives(
        compression: Optional[str], shape: str) -> None:
    # RFC 6455 8.1, failed fast (Autobahn 6.4.1-6.4.4): the peer's later bytes are not
    # awaited once the text cannot be UTF-8, even inside a frame that is not all here.
    import zlib

    from rawclient import encode_frame

    stream, _ = pair(compression=compression)
    first = "κόσμε".encode() + b"\xed\xa0\x80"  # a UTF-16 surrogate: never UTF-8
    rest = b"edited" * 40
    if compression:
        # Each part ends on a flush: the first inflates whole without the rest.
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
        first = deflater.compress(first) + deflater.flush(zlib.Z_SYNC_FLUSH)
        rest = (deflater.compress(rest) + deflater.flush(zlib.Z_SYNC_FLUSH))[:-4]
    rsv = 4 if compression else 0  # RSV1: compressed (RFC 7692 6)
    if shape == "first fragment":
        data = encode_frame(1, first, fin=False, rsv=rsv)  # the rest never comes
    else:
        frame = encode_frame(1, first + rest, rsv=rsv)
        data = frame[:len(frame) - len(rest)]
    (failure,) = stream.receive(data)
    assert isinstance(failure, ProtocolFailure) and failure.code == 1007


def test_ping_and_close() -> None:
    stream, client = pair()
    (ping,) = stream.receive(client.send(Ping(payload=b"p")))
    assert isinstance(ping, PingReceived) and ping.payload == b"p"
    (close,) = stream.receive(client.send(CloseConnection(code=1000, reason="bye")))
    assert isinstance(close, CloseReceived) and (close.code, close.reason) == (1000, "bye")
    assert not close.closed and not stream.open
    (event,) = client_events(client, stream.close(close.code))
    assert isinstance(event, CloseConnection) and event.code == 1000
    assert stream.close() == b""  # nothing more to send once closed
    with pytest.raises(Exception):
        stream.send("late")


def test_server_initiated_close_and_data_after_it_are_dropped() -> None:
    stream, client = pair()
    frame = stream.close(1001, "going away")
    (event,) = client_events(client, frame)
    assert isinstance(event, CloseConnection) and event.code == 1001
    # Data the client sent before seeing our Close is read and dropped (RFC 6455 1.4).
    assert stream.receive(bytes([0x81, 0x80, 1, 2, 3, 4])) == []
    (close,) = stream.receive(client.send(event.response()))
    assert isinstance(close, CloseReceived) and close.closed


@pytest.mark.parametrize(
    "frame, code",
    [
        (bytes([0x81, 0x05]) + b"hello", 1002),  # unmasked client frame
        (bytes([0xC1, 0x80, 0, 0, 0, 0]), 1002),  # RSV1 without an extension
        (bytes([0x83, 0x80, 0, 0, 0, 0]), 1002),  # reserved opcode
        (bytes([0x80, 0x80, 0, 0, 0, 0]), 1002),  # continuation without a start
        (bytes([0x09, 0x80, 0, 0, 0, 0]), 1002),  # fragmented ping
        (bytes([0x89, 0xFE, 0x00, 0x7E, 0, 0, 0, 0]) + b"x" * 126, 1002),  # ping > 125
        (bytes([0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]), 1007),  # invalid UTF-8
        (bytes([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE7]), 1002),  # close code 999
        (bytes([0x88, 0x84, 0, 0, 0, 0, 0x03, 0xE8, 0xC3, 0x28]), 1007),  # bad reason
    ],
)
def test_protocol_violations_fail_with_the_right_code(frame: bytes, code: int) -> None:
    stream, _ = pair()
    out = stream.receive(frame)
    assert len(out) == 1 and isinstance(out[0], ProtocolFailure), out
    assert out[0].code == code


def test_end_of_stream_is_abnormal_closure() -> None:
    stream, _ = pair()
    (close,) = stream.receive(None)
    assert isinstance(close, CloseReceived) and close.code == 1006


@pytest.mark.parametrize(
    "offer, subprotocols, compression",
    [
        ([], None, None),
        (["permessage-deflate; client_max_window_bits"], None, "deflate"),
        (["permessage-deflate; server_no_context_takeover"], ["b", "a"], "deflate"),
        (["x-unknown, permessage-deflate"], ["a"], None),
    ],
)
def test_accept_matches_wsprotos_own_handshake(offer: List[str], subprotocols: Any,
                                                compression: Optional[str]) -> None:
    """accept_upgrade writes the response wsproto's H11Handshake would, header for header."""
    from wsproto.extensions import PerMessageDeflate
    from wsproto.handshake import H11Handshake
    from wsproto.connection import ConnectionType as CT

    extra = [("sec-websocket-extensions", o) for o in offer]
    extra.append(("sec-websocket-protocol", "a, b"))
    req = request(extra=extra)
    ours, ws, chosen, deflate = accept_upgrade(req, subprotocols=subprotocols,
                                               compression=compression)
    reference = H11Handshake(CT.SERVER)
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in req.headers.items()]
    reference.initiate_upgrade_connection(raw_headers, req.target)
    list(reference.events())
    exts = [PerMessageDeflate()] if compression else []
    theirs = reference.send(AcceptConnection(subprotocol=chosen, extensions=exts))

    def headers(raw: bytes) -> Any:
        head = raw.split(b"\r\n\r\n")[0].split(b"\r\n")
        return head[0], sorted((k.lower(), v) for k, _, v in
                               (line.partition(b": ") for line in head[1:]))

    assert headers(ours) == headers(theirs)
    assert deflate is (compression == "deflate" and any("permessage-deflate" in o for o in offer))
    assert chosen == (subprotocols[0] if subprotocols else None)
