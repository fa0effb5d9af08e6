"""The WebSocket protocol, sans-I/O: handshake decisions and whole messages.

wsproto does most of the protocol work (extension negotiation, control frames, close
codes, every malformed frame, sending with permessage-deflate); this module decides
what the server answers to a request head, and turns frames into whole messages and
control outcomes under the server's limits. Data frames, which are most of the bytes,
it reads itself, so that a message costs at most about twice ``max_message_size``
however it is fragmented or compressed (see :class:`MessageStream`). It imports
neither ``socket`` nor ``threading``: bytes in, bytes and values out.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import os
import zlib
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.connection import ConnectionType
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import LocalProtocolError, generate_accept_token, split_comma_header

from .errors import HandshakeRejected
from .http import HTTPRequest, http_response

__all__ = [
    "Message",
    "PingReceived",
    "PongReceived",
    "CloseReceived",
    "ProtocolFailure",
    "is_upgrade_request",
    "check_upgrade",
    "default_origin_check",
    "accept_upgrade",
    "rejection_response",
    "MessageStream",
    "PreparedMessage",
    "data_frame",
    "CLOSE_GOING_AWAY",
]

Message = Union[str, bytes]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


def is_upgrade_request(request: HTTPRequest) -> bool:
    """Whether the client asks for WebSocket at all (``Upgrade: websocket``).

    Requests without it are plain HTTP: health checks, a browser opening the URL, a
    proxy probing. They get a plain HTTP answer (426 by default), not a handshake error.
    """
    return any(
        token.strip().lower() == "websocket"
        for value in request.headers.get_all("upgrade")
        for token in value.split(",")
    )


def default_origin_check(request: HTTPRequest) -> bool:
    """gorilla/websocket's rule: no ``Origin`` (not a browser), or its host equals ``Host``.

    A browser always sends ``Origin`` on a WebSocket handshake (RFC 6455 4.1 item 8); a
    page from another site must not be able to use a visitor's cookies to talk to us
    (cross-site WebSocket hijacking), hence the same-host rule.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host")
    if host is None:
        return False
    try:
        origin_host = urlsplit(origin).netloc
    except ValueError:
        return False
    return origin_host.lower() == host.lower()


def check_upgrade(
    request: HTTPRequest,
    *,
    paths: Optional[Sequence[str]] = None,
    allowed_origins: Optional[Sequence[str]] = None,
    check_origin: Optional[Callable[[HTTPRequest], bool]] = None,
) -> None:
    """Raise :class:`HandshakeRejected` with the status RFC 6455 4.2.1 calls for.

    Checks the request as wsproto would and more strictly where wsproto is lenient
    (the key's form, the HTTP version), then the server's own policy: path and origin.
    """
    if request.method != "GET":
        # RFC 6455 4.1: "The method of the request MUST be GET".
        raise HandshakeRejected(405, "WebSocket handshakes use GET", headers=[("Allow", "GET")])
    if request.http_version != "1.1":
        raise HandshakeRejected(505, "WebSocket handshakes need HTTP/1.1")
    headers = request.headers
    if "host" not in headers:
        raise HandshakeRejected(400, "missing Host header")
    if not any(
        token.strip().lower() == "upgrade"
        for value in headers.get_all("connection")
        for token in value.split(",")
    ):
        raise HandshakeRejected(
            426,
            "missing 'Connection: Upgrade'",
            headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")],
        )
    versions = headers.get_all("sec-websocket-version")
    if versions != ["13"]:
        # RFC 6455 4.4: answer 426 naming the version we speak.
        raise HandshakeRejected(
            426 if versions else 400,
            "unsupported Sec-WebSocket-Version" if versions else "missing Sec-WebSocket-Version",
            headers=[("Sec-WebSocket-Version", "13")],
        )
    keys = headers.get_all("sec-websocket-key")
    if len(keys) != 1:
        raise HandshakeRejected(400, "missing Sec-WebSocket-Key" if not keys else
                                "more than one Sec-WebSocket-Key")
    try:
        # RFC 6455 4.1 item 7: a base64-encoded 16-byte nonce.
        raw = base64.b64decode(keys[0].strip().encode("latin-1"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeRejected(400, "invalid Sec-WebSocket-Key")
    if paths is not None and request.path not in paths:
        raise HandshakeRejected(404, f"no WebSocket endpoint at {request.path[:200]}")
    if allowed_origins is not None:
        origin = request.headers.get("origin")
        if "*" not in allowed_origins and origin is not None and origin not in allowed_origins:
            raise HandshakeRejected(403, "origin not allowed")
    elif not (check_origin or default_origin_check)(request):
        raise HandshakeRejected(403, "origin not allowed")


def _pick_subprotocol(request: HTTPRequest, supported: Optional[Sequence[str]]) -> Optional[str]:
    if not supported:
        return None
    offered = [
        token.strip()
        for value in request.headers.get_all("sec-websocket-protocol")
        for token in value.split(",")
    ]
    # The server's order of preference decides; with no overlap the header is simply
    # left out (RFC 6455 4.2.2 item 5.4), as gorilla does, and the client decides.
    for name in supported:
        if name in offered:
            return name
    return None


class _ServerConnection(Connection):
    """wsproto's server :class:`Connection`, remembering the permessage-deflate it uses.

    MessageStream inflates the client's messages itself (wsproto's extension inflates
    whatever it is given, with no bound), so it needs the negotiated parameters.
    """

    def __init__(self, deflate: Optional[PerMessageDeflate]) -> None:
        super().__init__(ConnectionType.SERVER, [deflate] if deflate is not None else [])
        self.deflate = deflate


def accept_upgrade(
    request: HTTPRequest,
    *,
    subprotocols: Optional[Sequence[str]] = None,
    compression: Optional[str] = None,
) -> Tuple[bytes, Connection, Optional[str], bool]:
    """Accept a request that :func:`check_upgrade` passed, with wsproto's parts.

    Returns the ``101`` response bytes, wsproto's frame-level :class:`Connection`,
    the chosen subprotocol and whether permessage-deflate was negotiated.

    wsproto's ``H11Handshake`` would parse the request a second time through an h11
    client and server pair (about two thirds of a handshake's CPU); the request is
    already parsed and checked, so its pieces are used directly: wsproto's accept
    token and extension negotiation, and its ``Connection`` for the frames. The
    response is the one ``H11Handshake`` writes (``tests/test_protocol.py`` compares).
    """
    key = request.headers["sec-websocket-key"].strip().encode("latin-1")
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + generate_accept_token(key),
    ]
    subprotocol = _pick_subprotocol(request, subprotocols)
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii"))
    negotiated: Optional[PerMessageDeflate] = None
    if compression == "deflate":
        offers = [
            offer
            for value in request.headers.get_all("sec-websocket-extensions")
            for offer in split_comma_header(value.encode("latin-1"))
        ]
        extension = PerMessageDeflate()
        accepted = server_extensions_handshake(offers, [extension])
        if accepted:
            lines.append(b"Sec-WebSocket-Extensions: " + accepted)
            negotiated = extension
    response = b"\r\n".join(lines) + b"\r\n\r\n"
    return response, _ServerConnection(negotiated), subprotocol, negotiated is not None


def rejection_response(exc: HandshakeRejected, *, head_only: bool = False) -> bytes:
    """The HTTP answer to a refused handshake: status, its headers, the reason as text."""
    body = (exc.reason or "") + "\n" if exc.reason else ""
    return http_response(exc.status, body, headers=exc.headers, head_only=head_only)


class PingReceived:
    """The peer pinged: answer with :meth:`MessageStream.pong`."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class PongReceived:
    """The peer answered a ping (or sent an unsolicited pong, RFC 6455 5.5.3)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class CloseReceived:
    """The peer sent a Close frame; ``closed`` is true when it answered ours."""

    __slots__ = ("code", "reason", "closed")

    def __init__(self, code: int, reason: str, closed: bool) -> None:
        self.code = code
        self.reason = reason
        self.closed = closed


class ProtocolFailure:
    """The peer broke the protocol or a limit: send Close ``code`` and drop TCP.

    RFC 6455 7.1.7 "Fail the WebSocket Connection": no waiting for the peer's Close.
    """

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


Outcome = Union[str, bytes, PingReceived, PongReceived, CloseReceived, ProtocolFailure]


# First header byte of an unfragmented frame with RSV bits clear: FIN | opcode.
_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
_FIN_CLOSE = 0x88
# The Close codes _peer_close reads itself, as wsproto reports them; and the codes an
# endpoint may never send (RFC 6455 7.4.1), which wsproto replaces with 1000.
_SIMPLE_CLOSE_CODES = {1000: CloseReason.NORMAL_CLOSURE, 1001: CloseReason.GOING_AWAY}
_LOCAL_ONLY_CODES = (1005, 1006, 1015)
_from_bytes = int.from_bytes
# Compressed bytes given to wsproto at a time, when wsproto inflates (deflate expands
# at most ~1032x): with WSROUTE_SYNC_PURE_WSPROTO, or a Connection that accept_upgrade
# did not make. Otherwise MessageStream inflates, within the limit.
_INFLATE_CHUNK = 1024
# Integer XOR grows faster than linearly with size; past this, translate tables win.
_INT_UNMASK_LIMIT = 2048
_XOR_TABLES = [bytes(a ^ b for a in range(256)) for b in range(256)]
# A data frame's payload is unmasked, inflated and checked as UTF-8 in steps of at most
# this many bytes, so what a step allocates besides the message itself stays this small
# (times four at most: the check decodes a step of text, up to 4 bytes a character).
# A multiple of 4, so that every step starts at the same place in the masking key.
_STEP = 8192
# RFC 7692 7.2.2: appended to a message's payload before inflating it (the sender took
# it off the sync flush that ends each message, 7.2.1).
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
# Where no message is being collected: closed, so that writing to it would fail loudly.
_NO_MESSAGE = io.BytesIO()
_NO_MESSAGE.close()


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("strict")


def _pure_wsproto_requested() -> bool:
    # A switch for diagnosis and for measuring what the fast path buys: with it set,
    # every frame goes through wsproto's own parser and serialiser.
    return os.environ.get("WSROUTE_SYNC_PURE_WSPROTO", "") not in ("", "0")


class MessageStream:
    """Whole messages in, frames out, on top of a wsproto :class:`Connection`.

    ``receive(data)`` returns what the bytes completed: messages (``str`` for text,
    ``bytes`` for binary) and control outcomes, in order. Sending methods return the
    bytes to write. wsproto objects are not thread-safe, so the caller serialises the
    sending methods (the connection holds a lock); ``receive`` is called by one thread.

    wsproto is the protocol engine: the handshake, pings and pongs, extensions on the
    sending side, every error and every unusual close go through it. What is read here
    instead, at frame boundaries, is what has exactly one meaning and is most of the
    traffic:

    * data frames: masked, minimally encoded lengths, RSV bits as the negotiated
      extensions allow, in an order RFC 6455 5.4 allows (a new message only when none
      is open, a continuation only when one is). Their payload goes, unmasked (5.3),
      inflated where RFC 7692 says so, and checked as UTF-8 as it arrives for text,
      into one buffer per message, never past ``max_message_size``: receiving a
      message costs at most about twice the limit, however it is fragmented or
      compressed (wsproto makes several objects per fragment, kept until the end,
      and inflates whatever it is given). Text costs at most twice the ``str`` it
      becomes, which is more than the limit only when narrow and wide characters
      mix (CPython stores every character at the widest one's size). A complete,
      unfragmented frame of up to 2 KiB is decoded with a few C-level operations
      and no buffer at all.
    * the client's Close while the connection is open, complete, masked, with no
      status or with 1000 or 1001 and a UTF-8 reason: how nearly every connection
      ends (RFC 6455 5.5.1). Its answer is written here too, as wsproto writes it;
      from then on this stream holds the state (``state`` reports REMOTE_CLOSING, then
      CLOSED) and refuses to send anything else, as wsproto would.

    Anything else, control frames and every malformed frame, is handed to wsproto
    byte for byte, from a frame boundary, and wsproto decides.
    ``tests/test_fastpath.py`` checks that both paths give the same results, answers
    and states for the same bytes; ``tests/test_memory.py`` measures the memory bound.
    Replies are framed the same way: an unfragmented, unmasked frame (RFC 6455 5.1:
    servers do not mask). Set ``WSROUTE_SYNC_PURE_WSPROTO=1`` to send every frame
    through wsproto.
    """

    __slots__ = (
        "_ws", "_max_size", "_parts", "_size", "_text", "_fast", "_framed", "_chunk", "_buf",
        "_need", "deferred",
        "_left", "_ours", "_fragmented", "writable", "_whole_max", "_peer_closed", "_answered",
        "_inflates", "_window_bits", "_no_takeover", "_inflater", "_compressed", "_msg",
        "_check", "_decoder", "_pending", "_pieces", "_frame_fin", "_mask",
        "_mask_at",
    )

    def __init__(
        self,
        ws: Connection,
        *,
        max_message_size: Optional[int] = None,
        extensions: bool = False,
    ) -> None:
        self._ws = ws
        self._max_size = max_message_size
        self._parts: List[Any] = []  # wsproto's pieces of a message (its path only)
        self._size = 0  # bytes of the message being received so far
        self._text = False
        pure = _pure_wsproto_requested()
        # Frames are sent, and single frames decoded, here when no extension is in use.
        self._fast = not extensions and not pure
        # Compressed messages are inflated here when the negotiated permessage-deflate
        # is known (accept_upgrade's connections); otherwise wsproto inflates them.
        deflate = ws.deflate if extensions and isinstance(ws, _ServerConnection) else None
        self._inflates = deflate is not None and not pure
        # RFC 7692 7.1.2.2 and 7.1.1.2: the client compresses with this window, and may
        # have agreed to start each message afresh.
        self._window_bits = deflate.client_max_window_bits if deflate is not None else 15
        self._no_takeover = deflate is not None and deflate.client_no_context_takeover
        self._inflater: Any = None  # a zlib decompressobj, kept between messages
        # Frames are always delimited here (only tests switch it off, to compare with
        # wsproto fed whole reads): that is what lets a Close wait for earlier replies.
        self._framed = True
        # wsproto inflates whatever compressed bytes it is given at once: fed in small
        # pieces, a deflate bomb is stopped after ~1 MiB of output, not 1000x its size.
        self._chunk = _INFLATE_CHUNK if extensions else 0
        #: True when receive() stopped before a Close so that the messages before it can
        #: be answered first; call ``receive(b"")`` to go on.
        self.deferred = False
        self._buf = bytearray()  # a frame header (or small frame) not yet complete
        self._need = 0  # bytes _buf must hold before it is worth parsing again
        # Payload bytes of the current frame still to come (one count for both kinds,
        # so that receive()'s single-frame check reads one attribute), and whether the
        # frame is read here (else wsproto is owed them).
        self._left = 0
        self._ours = False
        self._fragmented = False  # a fragmented data message is open
        # The message read here, and whether it is compressed. Binary: its payload so
        # far (a BytesIO hands its buffer over as the message, without a copy).
        self._msg = _NO_MESSAGE
        self._compressed = False
        # Text: every byte is checked as it arrives, and decoded a step at a time into
        # pieces joined at the end. Decoding it whole would briefly take up to 5 bytes a
        # byte (CPython widens its buffer, sized by the input, to 4-byte characters at
        # the first astral one); steps keep that to one step.
        self._check: Optional[codecs.IncrementalDecoder] = None  # None: not text
        self._decoder = _utf8_decoder()
        self._pending = bytearray()  # checked, not yet decoded: less than a step
        self._pieces: List[str] = []
        # The data frame read here: whether it ends its message, its masking key, and
        # the key's position for the next byte.
        self._frame_fin = False
        self._mask = b""
        self._mask_at = 0
        #: wsproto's state is OPEN: data messages can still be sent and received. A copy
        #: refreshed after every call into wsproto (the only place its state changes),
        #: because reading it through wsproto's property costs two calls per message.
        self.writable = True
        # The client's Close was read here, not by wsproto (see _peer_close), and whether
        # it has been answered: from then on this stream, not wsproto, knows the state.
        self._peer_closed = False
        self._answered = False
        # The largest payload receive()'s single-frame check takes (it is inside the
        # message size limit, and small enough for the integer unmask).
        self._whole_max = min(
            _INT_UNMASK_LIMIT, _INT_UNMASK_LIMIT if max_message_size is None else max_message_size
        )

    @property
    def open(self) -> bool:
        """True until either side has started the closing handshake."""
        return self.writable

    @property
    def state(self) -> ConnectionState:
        if self._peer_closed:
            return ConnectionState.CLOSED if self._answered else ConnectionState.REMOTE_CLOSING
        return self._ws.state

    @property
    def plain(self) -> bool:
        """True when frames are written without extension: the same bytes for everyone."""
        return self._fast

    def receive(self, data: Optional[bytes]) -> List[Outcome]:
        """Feed bytes read from the socket (``None`` for end of stream)."""
        if not self._framed or data is None:
            out: List[Outcome] = []
            self._wsproto_receive(data, out)
            return out
        self.deferred = False
        if self._buf:
            return self._resume(data)
        # The usual read of a request-reply client: exactly one whole, final, masked
        # text or binary frame. _split() would decode it the same way, one loop later.
        n = len(data)
        if (n > 6 and self._fast and self.writable and not self._left
                and not self._fragmented):
            b0 = data[0]
            if b0 == _FIN_TEXT or b0 == _FIN_BINARY:
                length = data[1] ^ 0x80  # clears the MASK bit, or sets it if it was clear
                if length < 126:
                    header = 6
                elif length == 126 and n > 8:
                    length = (data[2] << 8) | data[3]
                    header = 8 if length > 125 else 0  # 0: not minimal, _split decides
                else:
                    header = 0
                if header and n == header + length and length <= self._whole_max:
                    mask = data[header - 4:header]
                    payload = (
                        _from_bytes(data[header:], "little")
                        ^ _from_bytes((mask * ((length + 3) >> 2))[:length], "little")
                    ).to_bytes(length, "little")
                    if b0 == _FIN_BINARY:
                        return [payload]
                    try:
                        return [payload.decode("utf-8")]
                    except UnicodeDecodeError:
                        pass  # _split reports it (1007), from the same bytes
        return self._split(data)

    def _resume(self, data: bytes) -> List[Outcome]:
        """Go on from what ``_buf`` holds back: top it up from ``data`` with exactly the
        bytes it needs, parse it, then parse the rest of ``data`` where it lies (a read
        is not copied behind a held header)."""
        out: List[Outcome] = []
        pos = 0
        end = len(data)
        while self._buf:
            held = self._buf
            missing = self._need - len(held)
            if missing > end - pos:
                held += data[pos:]
                return out
            if missing > 0:
                held += data[pos:pos + missing]
                pos += missing
            self._buf = bytearray()
            got = self._split(held)
            out += got
            if self.deferred:
                self._buf += data[pos:]
                return out
            if got and isinstance(got[-1], (CloseReceived, ProtocolFailure)):
                return out  # the stream has ended: the rest is not read
        out += self._split(data, pos)
        return out

    def _split(self, buf: Union[bytes, bytearray], pos: int = 0) -> List[Outcome]:
        """Walk the frames in ``buf`` from ``pos``: read data frames here, pass the rest
        to wsproto."""
        out: List[Outcome] = []
        end = len(buf)
        max_size = self._max_size
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                self._left -= take
                if self._ours:
                    # The middle of a data frame read here: more of its payload.
                    failure = self._payload(buf, pos, take)
                    pos += take
                    if failure is None and not self._left and self._frame_fin:
                        failure = self._message_end(out)
                    if failure is not None:
                        out.append(failure)
                        return out
                    continue
                # The middle of a frame wsproto has started: it gets the rest of it.
                if self._feed(buf, pos, take, out):
                    return out
                pos += take
                continue
            if end - pos < 2:
                self._hold(buf, pos, 2)
                return out
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    self._hold(buf, pos, 4)
                    return out
                length = _from_bytes(buf[pos + 2:pos + 4], "big")
                header = 4
                minimal = length > 125
            elif length == 127:
                if end - pos < 10:
                    self._hold(buf, pos, 10)
                    return out
                length = _from_bytes(buf[pos + 2:pos + 10], "big")
                header = 10
                minimal = 65535 < length < (1 << 63)
            else:
                minimal = True
            opcode = b0 & 0x0F
            if (
                max_size is not None
                and length > max_size
                and minimal
                and b1 & 0x80
                and not b0 & 0x70
                and (opcode == 0) is self._fragmented
                and (opcode < 3)
                and not self._compressed
            ):
                # A valid data frame whose header alone says it is too big: refuse it
                # now instead of reading the payload (wsproto would reach 1009 too, once
                # max_size bytes of it had arrived).
                out.append(self._too_big(length))
                return out
            if b1 & 0x80:
                header += 4
            total = header + length
            if (
                self._fast
                and (b0 == _FIN_TEXT or b0 == _FIN_BINARY)
                and b1 & 0x80
                and length <= _INT_UNMASK_LIMIT
                and minimal
                and not self._fragmented
                and self.writable
            ):
                if end - pos >= total:
                    # RFC 6455 5.3: XOR with the key repeated; as one integer operation,
                    # the cheapest form for a small payload.
                    mask = buf[pos + header - 4:pos + header]
                    payload = (
                        _from_bytes(buf[pos + header:total + pos], "little")
                        ^ _from_bytes((mask * ((length + 3) >> 2))[:length], "little")
                    ).to_bytes(length, "little")
                    if b0 == _FIN_BINARY:
                        out.append(payload)
                        pos += total
                        continue
                    try:
                        out.append(payload.decode("utf-8"))
                        pos += total
                        continue
                    except UnicodeDecodeError:
                        pass  # read below as any data frame, which reports it (1007)
                elif b0 == _FIN_BINARY:
                    # Wait for the whole (small) frame: decoded at once above, it needs
                    # no message buffer.
                    self._hold(buf, pos, total)
                    return out
                # Text that is not all here is read below as it comes, so that invalid
                # UTF-8 in its first part fails the connection before the rest arrives
                # (RFC 6455 8.1; Autobahn 6.4.3 and 6.4.4 send a frame in three parts).
            if opcode < 3 and b1 & 0x80 and minimal and (self._fast or self._inflates):
                if not self.writable and self._ended():
                    return out  # after the peer's Close nothing more is read
                rsv = b0 & 0x70
                if opcode:
                    if self._fragmented:
                        # RFC 6455 5.4: no new message inside a fragmented one (what
                        # wsproto answers, 1002, whatever else is wrong with the frame).
                        out.append(ProtocolFailure(
                            CLOSE_PROTOCOL_ERROR, "expected a continuation frame"))
                        return out
                    # RSV1 marks a compressed message, on its first frame (RFC 7692 6).
                    ours = not rsv or (rsv == 0x40 and self._inflates)
                else:
                    ours = self._fragmented and not rsv
                if ours:
                    if end - pos < header:
                        self._hold(buf, pos, header)
                        return out
                    if opcode:
                        self._begin(opcode == 1, rsv != 0)
                    fin = b0 >= 0x80
                    self._fragmented = not fin
                    self._frame_fin = fin
                    self._left = length
                    self._ours = True
                    self._mask = bytes(buf[pos + header - 4:pos + header])
                    self._mask_at = 0
                    pos += header
                    if not length and fin:
                        failure = self._message_end(out)
                        if failure is not None:
                            out.append(failure)
                            return out
                    continue
            # Everything else is wsproto's: from this frame boundary, the whole frame.
            if opcode == 8 and out:
                # A Close after messages or pings in the same read: stop here, so that
                # their replies go out before wsproto sees the Close (RFC 6455 5.5.1
                # lets them; wsproto refuses to send data once the peer has closed).
                self._buf = bytearray(buf[pos:])
                self._need = 0
                self.deferred = True
                return out
            if (
                b0 == _FIN_CLOSE
                and header == 6  # masked, and a length under 126 as control frames have
                and length != 1
                and end - pos >= total
                and self._fast
                and self.writable
                and not self._fragmented
            ):
                closing = self._peer_close(buf[pos + 2:pos + 6], buf[pos + 6:pos + total])
                if closing is not None:
                    out.append(closing)
                    return out
            if opcode < 3:
                if opcode != 0:
                    self._fragmented = not (b0 & 0x80)
                elif b0 & 0x80:
                    self._fragmented = False
            take = min(total, end - pos)
            self._left = total - take
            self._ours = False
            if self._feed(buf, pos, take, out):
                return out
            pos += take
        return out
    def _peer_close(self, mask: Union[bytes, bytearray], masked: Union[bytes, bytearray]
                    ) -> Optional[CloseReceived]:
        """The client's Close, if it is one of the common kind; else ``None`` (wsproto's).

        The common kind ends most connections: no status, or 1000 (normal) or 1001
        (going away) with a UTF-8 reason. Such a frame has one meaning (RFC 6455 5.5.1,
        7.4.1), which wsproto would reach through its whole frame parser, a third of a
        short connection's Python time. Other codes, whose validity has more rules
        (reserved ranges, local-only codes), stay with wsproto.
        """
        if masked:
            n = len(masked)
            data = (
                _from_bytes(masked, "little")
                ^ _from_bytes((mask * ((n + 3) >> 2))[:n], "little")
            ).to_bytes(n, "little")
            code = _SIMPLE_CLOSE_CODES.get((data[0] << 8) | data[1])
            if code is None:
                return None
            try:
                reason = data[2:].decode("utf-8")
            except UnicodeDecodeError:
                return None  # wsproto fails the connection with 1007
        else:
            code, reason = CloseReason.NO_STATUS_RCVD, ""
        self._peer_closed = True
        self.writable = False
        return CloseReceived(code, reason, closed=False)

    def _feed(self, buf: Union[bytes, bytearray], pos: int, take: int, out: List[Outcome]
              ) -> bool:
        """Give ``take`` bytes at ``pos`` to wsproto; ``True`` once the stream has ended."""
        step = self._chunk or take
        for start in range(pos, pos + take, step):
            if self._wsproto_receive(bytes(buf[start:min(start + step, pos + take)]), out):
                return True
        return False

    def _hold(self, buf: Union[bytes, bytearray], pos: int, need: int) -> None:
        self._buf = bytearray(buf[pos:])
        self._need = need

    def _ended(self) -> bool:
        """The peer's Close has been read: nothing after it is (RFC 6455 5.5.1)."""
        return self._peer_closed or self._ws.state in (
            ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED)

    def _begin(self, text: bool, compressed: bool) -> None:
        """A new message, read here."""
        self._size = 0
        if text:
            # RFC 6455 8.1: invalid UTF-8 fails the connection; it is failed as soon as
            # it is seen (Autobahn 6.4 checks), hence a check of each piece as it
            # arrives, besides the decoding in steps.
            self._check = _utf8_decoder()
            self._decoder = _utf8_decoder()
        else:
            self._msg = io.BytesIO()
        self._compressed = compressed
        if compressed and self._inflater is None:
            self._inflater = zlib.decompressobj(-self._window_bits)

    def _payload(self, buf: Union[bytes, bytearray], pos: int, take: int
                 ) -> Optional[ProtocolFailure]:
        """``take`` payload bytes of the current data frame, at ``pos`` in ``buf``
        (``_left`` already counts them as read)."""
        mask = self._mask
        at = self._mask_at
        if at:
            mask = mask[at:] + mask[:at]  # where this piece starts in the key
        self._mask_at = (at + take) & 3
        stop = pos + take
        while pos < stop:
            n = min(stop - pos, _STEP)
            # RFC 6455 5.3: XOR with the key repeated.
            if n <= _INT_UNMASK_LIMIT:
                chunk: Union[bytes, bytearray] = (
                    _from_bytes(buf[pos:pos + n], "little")
                    ^ _from_bytes((mask * ((n + 3) >> 2))[:n], "little")
                ).to_bytes(n, "little")
            else:
                # Larger: each of the four byte lanes through a 256-byte table.
                chunk = bytearray(memoryview(buf)[pos:pos + n])
                chunk[0::4] = chunk[0::4].translate(_XOR_TABLES[mask[0]])
                chunk[1::4] = chunk[1::4].translate(_XOR_TABLES[mask[1]])
                chunk[2::4] = chunk[2::4].translate(_XOR_TABLES[mask[2]])
                chunk[3::4] = chunk[3::4].translate(_XOR_TABLES[mask[3]])
            pos += n
            failure = self._inflate(chunk) if self._compressed else self._add(chunk)
            if failure is not None:
                return failure
        return None

    def _add(self, data: Union[bytes, bytearray]) -> Optional[ProtocolFailure]:
        """Append ``data`` to the message, unless it makes the message invalid."""
        check = self._check
        if check is not None:
            try:
                check.decode(data)
            except UnicodeDecodeError:
                return self._failed(CLOSE_INVALID_DATA, "invalid UTF-8 in a text message")
        size = self._size + len(data)
        if self._max_size is not None and size > self._max_size:
            return self._too_big(size)
        self._size = size
        if check is None:
            self._msg.write(data)
            return None
        pending = self._pending
        pending += data
        if len(pending) >= _STEP:
            self._pieces.append(self._decoder.decode(pending))
            self._pending = bytearray()
        return None

    def _inflate(self, data: Union[bytes, bytearray]) -> Optional[ProtocolFailure]:
        """Inflate compressed ``data`` into the message, no further than its limit.

        zlib is asked for at most one step, and never for more than one byte past the
        limit: a decompression bomb is refused (1009) having cost that much, not the
        size it would inflate to.
        """
        inflater = self._inflater
        max_size = self._max_size
        while True:
            room = _STEP if max_size is None else min(_STEP, max_size - self._size + 1)
            try:
                chunk = inflater.decompress(data, room)
            except zlib.error:
                return self._failed(CLOSE_INVALID_DATA, "invalid compressed data")
            if chunk:
                failure = self._add(chunk)
                if failure is not None:
                    return failure
            data = inflater.unconsumed_tail
            if not data and len(chunk) < room:
                return None  # all in, all out (a full step may have more to give)

    def _message_end(self, out: List[Outcome]) -> Optional[ProtocolFailure]:
        """The last frame of the message read here is in: deliver the message."""
        if self._compressed:
            failure = self._inflate(_DEFLATE_TAIL)
            if failure is not None:
                return failure
            if self._no_takeover or self._inflater.eof:
                # RFC 7692 7.1.1.2: each message starts afresh. So does the one after a
                # final deflate block, which ends zlib's stream (zlib would set aside
                # whatever came after it, unread).
                self._inflater = None
        self._size = 0
        self._compressed = False
        check = self._check
        if check is None:
            data = self._msg.getvalue()
            self._msg = _NO_MESSAGE
            # RFC 6455 1.4: after sending Close, data frames are read and dropped.
            if self.writable:
                out.append(data)
            return None
        try:
            check.decode(b"", True)
        except UnicodeDecodeError:
            return self._failed(CLOSE_INVALID_DATA, "text message ends inside UTF-8")
        pieces = self._pieces
        pieces.append(self._decoder.decode(self._pending, True))
        self._check = None
        self._pending = bytearray()
        self._pieces = []
        if self.writable:
            out.append(pieces[0] if len(pieces) == 1 else "".join(pieces))
        return None

    def _wsproto_receive(self, data: Optional[bytes], out: List[Outcome]) -> bool:
        """Let wsproto process ``data``; ``True`` once the stream has ended."""
        ws = self._ws
        if self._peer_closed or ws.state is ConnectionState.CLOSED:
            return True
        try:
            return self._wsproto_events(ws, data, out)
        finally:
            self.writable = ws.state is ConnectionState.OPEN

    def _wsproto_events(self, ws: Connection, data: Optional[bytes], out: List[Outcome]
                        ) -> bool:
        ws.receive_data(data)
        max_size = self._max_size
        for event in ws.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                payload = event.data  # type: ignore[attr-defined]
                # The limit is in bytes; wsproto hands text over decoded.
                size = len(payload) if kind is BytesMessage or payload.isascii() else len(
                    payload.encode("utf-8"))
                if event.message_finished and not self._parts:  # type: ignore[attr-defined]
                    # The common case, one frame per message: no copy, no join.
                    if max_size is not None and size > max_size:
                        out.append(self._too_big(size))
                        return True
                    if ws.state is ConnectionState.OPEN:
                        out.append(payload if kind is TextMessage else bytes(payload))
                    continue
                self._parts.append(payload)
                self._size += size
                self._text = kind is TextMessage
                if max_size is not None and self._size > max_size:
                    out.append(self._too_big(self._size))
                    return True
                if event.message_finished:  # type: ignore[attr-defined]
                    joined: Message = "".join(self._parts) if self._text else b"".join(
                        self._parts
                    )
                    self._parts = []
                    self._size = 0
                    # RFC 6455 1.4: after sending Close, data frames are read and dropped.
                    if ws.state is ConnectionState.OPEN:
                        out.append(joined)
            elif kind is Ping:
                out.append(PingReceived(event.payload))  # type: ignore[attr-defined]
            elif kind is Pong:
                out.append(PongReceived(event.payload))  # type: ignore[attr-defined]
            elif kind is CloseConnection:
                code = event.code  # type: ignore[attr-defined]
                reason = event.reason or ""  # type: ignore[attr-defined]
                # Re-read: processing this Close moved wsproto's state.
                state = ws.state
                if state is ConnectionState.REMOTE_CLOSING:
                    out.append(CloseReceived(code, reason, closed=False))
                elif state is ConnectionState.CLOSED and data is not None:
                    out.append(CloseReceived(code, reason, closed=True))
                elif data is None:
                    out.append(CloseReceived(CloseReason.ABNORMAL_CLOSURE, "", closed=True))
                else:
                    # wsproto reports a ParseFailed as a CloseConnection without moving
                    # its state: the peer broke the protocol (1002, 1007...).
                    out.append(ProtocolFailure(code, reason))
                return True
        return False

    def _too_big(self, size: int) -> ProtocolFailure:
        return self._failed(
            CLOSE_TOO_BIG, f"message of {size}+ bytes exceeds the limit of {self._max_size}"
        )

    def _failed(self, code: int, reason: str) -> ProtocolFailure:
        # The connection ends here: what was collected of the message is let go now.
        self._parts = []
        self._size = 0
        self._msg = _NO_MESSAGE
        self._check = None
        self._pending = bytearray()
        self._pieces = []
        return ProtocolFailure(code, reason)

    def send(self, data: Message) -> bytes:
        """A data frame: text for ``str``, binary for bytes-like.

        Raises wsproto's ``LocalProtocolError`` once closing has started.
        """
        if self._fast and self.writable:
            # What wsproto's serialiser writes for it; wsproto keeps no state for it.
            return data_frame(data)
        if self._peer_closed:
            raise LocalProtocolError("the peer has closed: no data after its Close")
        return self._ws.send(
            TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        )

    def ping(self, payload: bytes = b"") -> bytes:
        if self._peer_closed:
            raise LocalProtocolError("the peer has closed: no ping after its Close")
        return self._ws.send(Ping(payload=payload))  # no state change: OPEN only

    def pong(self, payload: bytes) -> bytes:
        if self._peer_closed:
            raise LocalProtocolError("the peer has closed: no pong after its Close")
        return self._ws.send(Pong(payload=payload))  # no state change: OPEN only

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
        """The Close frame to start or answer the closing handshake; ``b""`` if too late."""
        state = self.state
        if state is not ConnectionState.OPEN and state is not ConnectionState.REMOTE_CLOSING:
            return b""
        # RFC 6455 5.5: control frames carry at most 125 bytes; 2 go to the code.
        encoded = reason.encode("utf-8")
        if len(encoded) > 123:
            reason = encoded[:123].decode("utf-8", "ignore")
            encoded = reason.encode("utf-8")
        if self._peer_closed:
            # The answer to a Close read by _peer_close, as wsproto's serialiser writes
            # it: no status stays no status, a local-only code becomes 1000.
            self._answered = True
            if code is CloseReason.NO_STATUS_RCVD:
                return b"\x88\x00"
            if code in _LOCAL_ONLY_CODES:
                code = CLOSE_NORMAL
            payload = int(code).to_bytes(2, "big") + encoded
            return bytes((_FIN_CLOSE, len(payload))) + payload
        try:
            return self._ws.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:  # pragma: no cover - state checked above
            return b""
        finally:
            self.writable = self._ws.state is ConnectionState.OPEN


def data_frame(data: Message) -> bytes:
    """The unfragmented, unmasked server frame for a message with no extension: text for
    ``str``, binary for bytes (RFC 6455 5.2; 5.1: servers do not mask)."""
    if type(data) is str:
        payload = data.encode("utf-8")
        first = _FIN_TEXT
    else:
        payload = data  # type: ignore[assignment]
        first = _FIN_BINARY
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


class PreparedMessage:
    """A message about to go to many connections (fan-out), framed once for all of them.

    Every stream without an extension writes the same bytes for it, so the frame is
    made on first use and shared; a compressing stream frames its own copy.
    """

    __slots__ = ("data", "_frame")

    def __init__(self, data: Message) -> None:
        self.data = data
        self._frame: Optional[bytes] = None

    def frame_for(self, stream: MessageStream) -> bytes:
        """The frame ``stream`` writes for this message (the caller serialises ``stream``
        and has checked that it is still open)."""
        if stream.plain:
            frame = self._frame
            if frame is None:
                frame = self._frame = data_frame(self.data)
            return frame
        return stream.send(self.data)
