"""A received message put together from its frames, within the size limit: MessageStream's base.

The state of a :class:`~wsroute_sync.stream.MessageStream`, and its receiving work
below the frame walk: a data frame's payload unmasked, inflated where RFC 7692 says so
and checked as UTF-8 for text, as it arrives, into one buffer per message; the client's
ordinary Close; and everything handed to wsproto, turned into outcomes.
"""

from __future__ import annotations

import codecs
import io
import os
import zlib
from typing import Any, List, Optional, Union

from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from .frames import (
    CLOSE_INVALID_DATA,
    CLOSE_TOO_BIG,
    INT_UNMASK_LIMIT,
    CloseReceived,
    Message,
    NegotiatedConnection,
    Outcome,
    PingReceived,
    PongReceived,
    ProtocolFailure,
    unmask,
)

__all__ = ["MessageAssembler"]

# The Close codes _peer_close reads itself, as wsproto reports them.
_SIMPLE_CLOSE_CODES = {1000: CloseReason.NORMAL_CLOSURE, 1001: CloseReason.GOING_AWAY}
# Compressed bytes given to wsproto at a time, when wsproto inflates (deflate expands
# at most ~1032x): with WSROUTE_SYNC_PURE_WSPROTO, or a Connection that accept_upgrade
# did not make. Otherwise MessageStream inflates, within the limit.
_INFLATE_CHUNK = 1024
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


# Looked up once: codecs.lookup() on every new connection showed in the churn profile.
_UTF8_DECODER = codecs.getincrementaldecoder("utf-8")


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return _UTF8_DECODER("strict")


# Shared by every stream between text messages, and never used to decode: most
# connections never read a text message here, so they make no decoder of their own.
_IDLE_DECODER = _utf8_decoder()


# A switch for diagnosis and for measuring what the fast path buys: with it set (in the
# environment the process starts with), every frame goes through wsproto's own parser
# and serialiser. Read once: a look-up per connection cost more than its stream's set-up.
_PURE_WSPROTO = os.environ.get("WSROUTE_SYNC_PURE_WSPROTO", "") not in ("", "0")


class MessageAssembler:
    """The receiving state and work of a :class:`~wsroute_sync.stream.MessageStream`,
    which extends it with the frame walk and the sending side (see its docstring)."""


    __slots__ = (
        "_ws", "_max_size", "_parts", "_size", "_text", "plain", "_framed", "_chunk", "_buf",
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
        pure = _PURE_WSPROTO
        #: True when frames are written without extension, the same bytes for everyone:
        #: then they are sent, and single frames decoded, here rather than by wsproto.
        #: Read-only; set once, here.
        self.plain = not extensions and not pure
        # Compressed messages are inflated here when the negotiated permessage-deflate
        # is known (accept_upgrade's connections); otherwise wsproto inflates them.
        deflate = ws.deflate if extensions and isinstance(ws, NegotiatedConnection) else None
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
        self._decoder = _IDLE_DECODER  # replaced by _begin() for each text message
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
            INT_UNMASK_LIMIT, INT_UNMASK_LIMIT if max_message_size is None else max_message_size
        )

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
            data = unmask(masked, 0, len(masked), mask)
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
            chunk = unmask(buf, pos, pos + n, mask)
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
