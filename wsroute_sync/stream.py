"""Whole messages in, frames out: the WebSocket connection's codec, sans-I/O.

wsproto does most of the protocol work (extension negotiation, control frames, close
codes, every malformed frame, sending with permessage-deflate); :class:`MessageStream`
turns frames into whole messages and control outcomes under the server's limits. Data
frames, which are most of the bytes, it reads itself, so that a message costs at most
about twice ``max_message_size`` however it is fragmented or compressed. It imports
neither ``socket`` nor ``threading``: bytes in, bytes and values out.
"""

from __future__ import annotations

from typing import List, Optional, Union

from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError

from .assembly import MessageAssembler
from .frames import (
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    FIN_BINARY,
    FIN_CLOSE,
    FIN_TEXT,
    INT_UNMASK_LIMIT,
    CloseReceived,
    Message,
    Outcome,
    ProtocolFailure,
    data_frame,
    unmask,
)

__all__ = ["MessageStream", "PreparedMessage"]

# The codes an endpoint may never send (RFC 6455 7.4.1), which wsproto replaces with 1000.
_LOCAL_ONLY_CODES = (1005, 1006, 1015)
_from_bytes = int.from_bytes


class MessageStream(MessageAssembler):
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
    __slots__ = ()  # all in MessageAssembler

    @property
    def open(self) -> bool:
        """True until either side has started the closing handshake."""
        return self.writable

    @property
    def state(self) -> ConnectionState:
        if self._peer_closed:
            return ConnectionState.CLOSED if self._answered else ConnectionState.REMOTE_CLOSING
        return self._ws.state

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
        if (n > 6 and self.plain and self.writable and not self._left
                and not self._fragmented):
            b0 = data[0]
            if b0 == FIN_TEXT or b0 == FIN_BINARY:
                length = data[1] ^ 0x80  # clears the MASK bit, or sets it if it was clear
                if length < 126:
                    header = 6
                elif length == 126 and n > 8:
                    length = (data[2] << 8) | data[3]
                    header = 8 if length > 125 else 0  # 0: not minimal, _split decides
                else:
                    header = 0
                if header and n == header + length and length <= self._whole_max:
                    # Within INT_UNMASK_LIMIT (_whole_max): unmask's integer form, bytes.
                    payload: bytes = unmask(  # type: ignore[assignment]
                        data, header, n, data[header - 4:header])
                    if b0 == FIN_BINARY:
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
                self.plain
                and (b0 == FIN_TEXT or b0 == FIN_BINARY)
                and b1 & 0x80
                and length <= INT_UNMASK_LIMIT
                and minimal
                and not self._fragmented
                and self.writable
            ):
                if end - pos >= total:
                    # RFC 6455 5.3. Within INT_UNMASK_LIMIT: unmask's integer form, bytes.
                    payload: bytes = unmask(  # type: ignore[assignment]
                        buf, pos + header, pos + total, buf[pos + header - 4:pos + header])
                    if b0 == FIN_BINARY:
                        out.append(payload)
                        pos += total
                        continue
                    try:
                        out.append(payload.decode("utf-8"))
                        pos += total
                        continue
                    except UnicodeDecodeError:
                        pass  # read below as any data frame, which reports it (1007)
                elif b0 == FIN_BINARY:
                    # Wait for the whole (small) frame: decoded at once above, it needs
                    # no message buffer.
                    self._hold(buf, pos, total)
                    return out
                # Text that is not all here is read below as it comes, so that invalid
                # UTF-8 in its first part fails the connection before the rest arrives
                # (RFC 6455 8.1; Autobahn 6.4.3 and 6.4.4 send a frame in three parts).
            if opcode < 3 and b1 & 0x80 and minimal and (self.plain or self._inflates):
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
                b0 == FIN_CLOSE
                and header == 6  # masked, and a length under 126 as control frames have
                and length != 1
                and end - pos >= total
                and self.plain
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
    def send(self, data: Message) -> bytes:
        """A data frame: text for ``str``, binary for bytes-like.

        Raises wsproto's ``LocalProtocolError`` once closing has started.
        """
        if self.plain and self.writable:
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
            return bytes((FIN_CLOSE, len(payload))) + payload
        try:
            return self._ws.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:  # pragma: no cover - state checked above
            return b""
        finally:
            self.writable = self._ws.state is ConnectionState.OPEN



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
