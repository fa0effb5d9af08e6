"""Plain HTTP, sans-I/O: the request head that opens every connection, and the answers
the server gives without upgrading (426, 503, health, errors).

Parsing is delegated to h11, which wsproto already depends on; this module only turns
bytes into an :class:`HTTPRequest` and answers into bytes. It never touches a socket.
"""

from __future__ import annotations

import http
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs

import h11

__all__ = [
    "Headers",
    "HTTPRequest",
    "BadRequest",
    "find_head_end",
    "check_request_start",
    "parse_request_head",
    "http_response",
]

_HEAD_END = b"\r\n\r\n"


class Headers:
    """Request headers: case-insensitive look-ups, order and repeats kept.

    Names are stored lower-case, values as ``str`` decoded from Latin-1 (RFC 9110 5.5:
    field values are octets; Latin-1 maps each one to a code point and back losslessly).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[Tuple[str, str]] = ()) -> None:
        self._items: List[Tuple[str, str]] = [(k.lower(), v) for k, v in items]

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first value of ``name``, or ``default``."""
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> List[str]:
        """Every value of ``name``, in order."""
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> List[Tuple[str, str]]:
        """All ``(name, value)`` pairs, names lower-case."""
        return list(self._items)

    def raw(self) -> List[Tuple[bytes, bytes]]:
        """The pairs as bytes, the form h11 and wsproto take."""
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._items]

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class HTTPRequest:
    """The request head a client sent: what hooks (origin, auth) and handlers can see."""

    __slots__ = ("method", "target", "path", "query", "headers", "http_version", "remote_address")

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers,
        http_version: str = "1.1",
        remote_address: Optional[Tuple[str, int]] = None,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers
        self.http_version = http_version
        self.remote_address = remote_address

    @property
    def query_params(self) -> dict[str, list[str]]:
        """The query string decoded into ``{name: [values]}``."""
        return parse_qs(self.query, keep_blank_values=True)

    def __repr__(self) -> str:
        return f"<HTTPRequest {self.method} {self.target} HTTP/{self.http_version}>"


class BadRequest(Exception):
    """The head is not HTTP the server can answer; ``status`` is the answer to give."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """The index just past the blank line ending the head, or -1 while it is incomplete."""
    # Rescan a few bytes before ``start`` in case the terminator straddles two reads.
    index = buffer.find(_HEAD_END, max(0, start - 3))
    return -1 if index < 0 else index + 4


def check_request_start(data: bytes | bytearray) -> None:
    """Raise :class:`BadRequest` if ``data`` (the first bytes read) cannot start a request.

    Works on an incomplete head too, so the connection thread can refuse a TLS hello or
    binary junk as soon as it arrives: a real ClientHello never contains a blank line,
    and waiting for one would pin the slot for the whole ``handshake_timeout``.
    """
    if not data or data.startswith((b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ",
                                    b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")):
        return
    # h11 would accept any token as a method; a request that does not start with a
    # method we know is almost always a TLS hello or a port scan.
    if data[:1] in (b"\x16", b"\x80"):
        raise BadRequest(400, "TLS handshake received on a plain (ws://) listener")
    # A prefix of a method ("GE") is still letters, so this holds for partial reads.
    if not bytes(data[:16]).split(b" ", 1)[0].isalpha():
        raise BadRequest(400, "malformed HTTP request line")


def parse_request_head(
    head: bytes, remote_address: Optional[Tuple[str, int]] = None
) -> HTTPRequest:
    """Parse a complete request head (ending with the blank line) with h11.

    Raises :class:`BadRequest` with 400 for anything h11 refuses (garbage, bad header
    syntax) and 505 for an HTTP version it does not speak.
    """
    check_request_start(head)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    conn.receive_data(bytes(head))
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint
        if status == 400 and b"HTTP/" in head.split(b"\r\n", 1)[0] and not head.split(
            b"\r\n", 1
        )[0].endswith((b"HTTP/1.1", b"HTTP/1.0")):
            status = 505
        # h11's text can quote the client's bytes: keep the answer short.
        raise BadRequest(status, f"malformed HTTP request: {str(exc)[:120]}") from exc
    if not isinstance(event, h11.Request):
        raise BadRequest(400, "malformed HTTP request")
    if event.http_version not in (b"1.0", b"1.1"):
        raise BadRequest(505, "only HTTP/1.1 can be upgraded to WebSocket")
    headers = Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
    return HTTPRequest(
        method=event.method.decode("ascii"),
        target=event.target.decode("latin-1"),
        headers=headers,
        http_version=event.http_version.decode("ascii"),
        remote_address=remote_address,
    )


def http_response(
    status: int,
    body: bytes | str = b"",
    *,
    headers: Sequence[Tuple[str, str]] = (),
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    """An HTTP/1.1 response that closes the connection after it (``Connection: close``)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}"]
    names = {name.lower() for name, _ in headers}
    connection = ["close"]
    for name, value in headers:
        if name.lower() == "connection":
            # RFC 9110 7.8: a 426 names "upgrade" here; every answer also closes.
            connection.insert(0, value)
            continue
        lines.append(f"{name}: {value}")
    if body and "content-type" not in names:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: " + ", ".join(connection))
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + body
