"""Plain HTTP, sans-I/O: the request head that opens every connection, and the answers
the server gives without upgrading (426, 503, health, errors).

This module turns a request head into an :class:`HTTPRequest` by RFC 9112's grammar and
answers into bytes. It never touches a socket.
"""

from __future__ import annotations

import http
import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs

__all__ = [
    "Headers",
    "HTTPRequest",
    "BadRequest",
    "find_head_end",
    "check_request_start",
    "parse_request_head",
    "http_response",
]


class Headers:
    """Request headers: case-insensitive look-ups, order and repeats kept.

    Names are stored lower-case, values as ``str`` decoded from Latin-1 (RFC 9110 5.5:
    field values are octets; Latin-1 maps each one to a code point and back losslessly).
    """

    __slots__ = ("_items", "_index")

    def __init__(self, items: Iterable[Tuple[str, str]] = ()) -> None:
        self._items: List[Tuple[str, str]] = [(k.lower(), v) for k, v in items]
        # name -> its value, or its values when repeated: the upgrade checks make ~10
        # look-ups per request, and a list per name would cost every idle connection
        # ~70 bytes a header.
        index: Dict[str, Union[str, List[str]]] = {}
        for key, value in self._items:
            seen = index.get(key)
            if seen is None:
                index[key] = value
            elif type(seen) is str:
                index[key] = [seen, value]
            else:
                assert isinstance(seen, list)
                seen.append(value)
        self._index = index

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first value of ``name``, or ``default``."""
        values = self._index.get(name.lower())
        if values is None:
            return default
        return values if type(values) is str else values[0]

    def get_all(self, name: str) -> List[str]:
        """Every value of ``name``, in order."""
        values = self._index.get(name.lower())
        if values is None:
            return []
        return [values] if type(values) is str else list(values)

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> List[Tuple[str, str]]:
        """All ``(name, value)`` pairs, names lower-case."""
        return list(self._items)

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


# RFC 9112 3 and 5 (with RFC 9110 5.6.2 tokens): the request line and a field line.
# A field value is field-vchars (VCHAR and obs-text) with SP/HTAB between them; h11
# takes any byte but NUL and whitespace, so control characters and DEL are refused
# here and not there (RFC 9110 5.5 does not allow them).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])")
_FIELD_LINE = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[ \t]*[\x21-\x7e\x80-\xff])*)?)[ \t]*"
)
_BLANK_LINE = re.compile(rb"\n\r?\n")
# The same grammar over a whole head (decoded as Latin-1): one match and one findall
# instead of a match per line. parse_request_head takes it for the common head and
# leaves everything else, errors included, to the line-by-line checks.
_T = _TOKEN.decode("ascii")
_VALUE = r"[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*"
_HEAD = re.compile(
    r"(" + _T + r") ([\x21-\x7e]+) HTTP/1\.([01])\r?\n"
    r"((?:" + _T + r":[ \t]*(?:" + _VALUE + r")?[ \t]*\r?\n)*)\r?\n"
)
_FIELD = re.compile(r"(" + _T + r"):[ \t]*((?:" + _VALUE + r")?)[ \t]*\r?\n")
_DIGITS = re.compile(rb"[0-9]+")
#: h11's bound on a Content-Length (20 digits, just over 2**64).
_CONTENT_LENGTH_MAX_DIGITS = 20


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """The index just past the blank line ending the head, or -1 while it is incomplete."""
    # RFC 9112 2.2 lets a recipient take a bare LF as a line end, and parse_request_head
    # does: so the head ends at the first LF [CR] LF, where h11 ends it too. Looking
    # for CRLF CRLF only would leave a client that sends bare LFs waiting for the
    # handshake timeout. Rescan two bytes before ``start``: the terminator may straddle
    # two reads.
    match = _BLANK_LINE.search(buffer, max(0, start - 2))
    return -1 if match is None else match.end()


def check_request_start(data: bytes | bytearray) -> None:
    """Raise :class:`BadRequest` if ``data`` (the first bytes read) cannot start a request.

    Works on an incomplete head too, so the connection thread can refuse a TLS hello or
    binary junk as soon as it arrives: a real ClientHello never contains a blank line,
    and waiting for one would pin the slot for the whole ``handshake_timeout``.
    """
    if not data or data.startswith((b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ",
                                    b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")):
        return
    if data[:1] in (b"\x16", b"\x80"):
        raise BadRequest(400, "TLS handshake received on a plain (ws://) listener")
    # Any token is a method (RFC 9110 9.1), as in h11; a prefix of one ("GE") is still
    # a token, so this holds for partial reads.
    if _TOKEN_RE.fullmatch(bytes(data[:16]).split(b" ", 1)[0]) is None:
        raise BadRequest(400, "malformed HTTP request line")


def parse_request_head(
    head: bytes, remote_address: Optional[Tuple[str, int]] = None
) -> HTTPRequest:
    """Parse a complete request head (ending with its blank line), strictly.

    Raises :class:`BadRequest`: 400 for anything that is not an HTTP/1.x request head
    by RFC 9112 (bad request line, field syntax, bare CR, obsolete line folding, bytes
    after the blank line, a missing Host on HTTP/1.1 or more than one Host, a bad or
    conflicting ``Content-Length``), 505 for an HTTP version other than 1.0 and 1.1,
    501 for a transfer coding other than one ``chunked``.

    This used h11 and now does the same checks with two regular expressions: h11's
    general machinery was a third of a connection's CPU under connection churn. It
    accepts what h11 accepts and gives the same method, target, version and headers,
    except for three refusals (obsolete line folding, control characters in a field
    value, bytes after the first blank line); ``tests/test_http.py`` compares the two.
    """
    match = _HEAD.fullmatch(head.decode("latin-1"))
    if match is not None:
        method, target, minor, fields = match.groups()
        headers = Headers(_FIELD.findall(fields))
        hosts = len(headers.get_all("host"))
        # A length or a coding to check, or a Host missing or repeated: the long way.
        if (hosts == 1 or (hosts == 0 and minor == "0")) and (
                "content-length" not in headers and "transfer-encoding" not in headers):
            return HTTPRequest(method=method, target=target, headers=headers,
                               http_version="1." + minor, remote_address=remote_address)
    return _parse_line_by_line(head, remote_address)


def _parse_line_by_line(head: bytes, remote_address: Optional[Tuple[str, int]]
                        ) -> HTTPRequest:
    """:func:`parse_request_head` for any head: each check, with its error."""
    check_request_start(head)
    # RFC 9112 2.2: a recipient may take a bare LF as a line end; a bare CR is invalid
    # (the patterns below refuse it).
    lines = head.split(b"\n")
    if len(lines) < 3 or lines[-1] or lines[-2] not in (b"", b"\r"):
        raise BadRequest(400, "malformed HTTP request: incomplete head")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines[:-2]]
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadRequest(400, "malformed HTTP request line")
    method, target, major, minor = match.groups()
    if (major, minor) not in ((b"1", b"0"), (b"1", b"1")):
        raise BadRequest(505, "only HTTP/1.1 can be upgraded to WebSocket")
    items: List[Tuple[str, str]] = []
    hosts = 0
    content_length: Optional[bytes] = None
    chunked = False
    for line in lines[1:]:
        field = _FIELD_LINE.fullmatch(line)
        if field is None:
            raise BadRequest(400, "malformed HTTP request: " + _field_line_error(line))
        name = field.group(1).lower()
        value = field.group(2)
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            # RFC 9112 6.3: digits, or a list of one length repeated; several fields
            # must agree. As in h11, the length is kept once, as plain digits.
            lengths = {length.strip(b" \t") for length in value.split(b",")}
            length = lengths.pop()
            if lengths or not _DIGITS.fullmatch(length) or (
                    len(length) > _CONTENT_LENGTH_MAX_DIGITS):
                raise BadRequest(400, "malformed HTTP request: bad Content-Length")
            if content_length is not None:
                if length != content_length:
                    raise BadRequest(400, "malformed HTTP request: bad Content-Length")
                continue
            content_length = value = length
        elif name == b"transfer-encoding":
            # RFC 9112 6.1: 501 for a coding we do not implement; chunked applied
            # twice (two fields, or a list) is not one we implement either (h11 agrees).
            value = value.lower()
            if chunked or value != b"chunked":
                raise BadRequest(501, "only chunked transfer coding is supported")
            chunked = True
        items.append((name.decode("ascii"), value.decode("latin-1")))
    # RFC 9112 3.2: never more than one Host; exactly one on HTTP/1.1.
    if hosts > 1:
        raise BadRequest(400, "malformed HTTP request: more than one Host header")
    if minor == b"1" and not hosts:
        raise BadRequest(400, "malformed HTTP request: missing Host header")
    return HTTPRequest(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        headers=Headers(items),
        http_version=f"{major.decode()}.{minor.decode()}",
        remote_address=remote_address,
    )


def _field_line_error(line: bytes) -> str:
    """Why ``line`` is no field line, for the 400's text."""
    if not line:
        # h11 would stop at this blank line and leave the rest unread: one head
        # must not carry a second one.
        return "data after the blank line ending the head"
    if line[:1] in (b" ", b"\t"):
        # RFC 9112 5.2: obsolete line folding may be refused with 400.
        return "obsolete line folding"
    return "invalid header line"


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
