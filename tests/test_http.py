"""The request-head parser against h11, the parser it replaced, on generated heads."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsroute_sync.http import BadRequest, http_response, parse_request_head


def h11_parse(head: bytes) -> Optional[Tuple[str, str, str, List[Tuple[str, str]]]]:
    """What h11 makes of a head: the request's parts, or None when it refuses it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request) or event.http_version not in (b"1.0", b"1.1"):
        return None
    return (event.method.decode(), event.target.decode("latin-1"),
            event.http_version.decode(),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers])


def ours(head: bytes) -> Optional[Tuple[str, str, str, List[Tuple[str, str]]]]:
    try:
        request = parse_request_head(head)
    except BadRequest:
        return None
    return request.method, request.target, request.http_version, request.headers.items()


names = st.sampled_from(["Host", "host", "Upgrade", "Connection", "X-Custom", "Content-Length",
                         "Transfer-Encoding", "Sec-WebSocket-Key", "bad name", "bad:name", "",
                         "X\x00"])
values = st.sampled_from(["example.com", "", "  padded  ", "websocket", "Upgrade, keep-alive",
                          "12", "x12", "chunked", "gzip", "caf\xe9", "a\rb", "tab\tinside",
                          "\x7f"])


@st.composite
def heads(draw: Any) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "G(T", "GET "]))
    target = draw(st.sampled_from(["/", "/ws?x=1", "*", "/a b", "/caf\xe9", ""]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1", "http/1.1"]))
    lines = [f"{method} {target} {version}"]
    for _ in range(draw(st.integers(0, 5))):
        separator = draw(st.sampled_from([": ", ":", " : ", ":\t"]))
        lines.append(draw(names) + separator + draw(values))
    end = draw(st.sampled_from(["\r\n", "\n"]))
    return (end.join(lines) + end + end).encode("latin-1")


@settings(max_examples=1500, deadline=None)
@given(head=heads())
def test_parser_agrees_with_h11(head: bytes) -> None:
    mine, reference = ours(head), h11_parse(head)
    if mine is None and reference is not None:
        # The two intended differences, both refusals RFC 9112/9110 allow or require:
        # obsolete line folding (a line starting with SP or HTAB), which h11 joins to the
        # previous value; and control characters such as DEL (0x7f) in a field value,
        # which h11 takes (anything but NUL and whitespace) and RFC 9110 5.5 does not.
        folded = b"\n " in head or b"\n\t" in head
        control = any(b < 0x20 and b != 0x09 or b == 0x7F
                      for _, value in reference[3] for b in value.encode("latin-1"))
        assert folded or control, head
        return
    assert mine == reference


@pytest.mark.parametrize("head, status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),  # obsolete line folding
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400),  # bare CR
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x7f\r\n\r\n", 400),  # DEL is no field-vchar
    (b"\x16\x03\x01\x00\x05hello\r\n\r\n", 400),
])
def test_refusals(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request_head(head)
    assert info.value.status == status


def test_http10_needs_no_host_and_headers_keep_order() -> None:
    request = parse_request_head(b"GET /x?y=1 HTTP/1.0\r\nX-A: 1\r\nx-a:2 \r\n\r\n")
    assert (request.path, request.query, request.http_version) == ("/x", "y=1", "1.0")
    assert request.headers.get_all("X-A") == ["1", "2"]


def test_http_response_merges_connection_tokens() -> None:
    raw = http_response(426, "x", headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")])
    assert b"\r\nConnection: Upgrade, close\r\n" in raw
    assert raw.endswith(b"\r\n\r\nx")
