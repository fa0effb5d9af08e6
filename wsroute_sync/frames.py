"""The WebSocket codec's shared pieces: what receiving yields, close codes, unmasking, frames.

What :class:`~wsroute_sync.stream.MessageStream` returns for the bytes it is fed (messages
and control outcomes), the close codes the server sends, the one unmask helper every
reader of a masked payload uses (RFC 6455 5.3), the unmasked data frame a server writes
(5.1, 5.2), and wsproto's server ``Connection`` as the handshake makes it. Sans-I/O.
"""

from __future__ import annotations

from typing import Optional, Union

from wsproto.connection import Connection, ConnectionType
from wsproto.extensions import PerMessageDeflate

__all__ = [
    "Message",
    "Outcome",
    "PingReceived",
    "PongReceived",
    "CloseReceived",
    "ProtocolFailure",
    "NegotiatedConnection",
    "CLOSE_NORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_INVALID_DATA",
    "CLOSE_TOO_BIG",
    "CLOSE_INTERNAL_ERROR",
    "FIN_TEXT",
    "FIN_BINARY",
    "FIN_CLOSE",
    "INT_UNMASK_LIMIT",
    "unmask",
    "data_frame",
]

Message = Union[str, bytes]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011


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
FIN_TEXT = 0x81
FIN_BINARY = 0x82
FIN_CLOSE = 0x88
# Integer XOR grows faster than linearly with size; past this, translate tables win.
INT_UNMASK_LIMIT = 2048
_XOR_TABLES = [bytes(a ^ b for a in range(256)) for b in range(256)]
_from_bytes = int.from_bytes


def unmask(data: Union[bytes, bytearray], start: int, stop: int, mask: Union[bytes, bytearray]
           ) -> Union[bytes, bytearray]:
    """``data[start:stop]`` XORed with the 4-byte masking key repeated (RFC 6455 5.3),
    the key's first byte on ``data[start]``.

    Up to :data:`INT_UNMASK_LIMIT` bytes, as one integer operation, the cheapest form for
    a small payload (and ``bytes``); larger, each of the four byte lanes through a
    256-byte table (a ``bytearray``). Positions instead of a slice: the large form copies
    the payload once, not twice.
    """
    n = stop - start
    if n <= INT_UNMASK_LIMIT:
        return (
            _from_bytes(data[start:stop], "little")
            ^ _from_bytes((mask * ((n + 3) >> 2))[:n], "little")
        ).to_bytes(n, "little")
    chunk = bytearray(memoryview(data)[start:stop])
    chunk[0::4] = chunk[0::4].translate(_XOR_TABLES[mask[0]])
    chunk[1::4] = chunk[1::4].translate(_XOR_TABLES[mask[1]])
    chunk[2::4] = chunk[2::4].translate(_XOR_TABLES[mask[2]])
    chunk[3::4] = chunk[3::4].translate(_XOR_TABLES[mask[3]])
    return chunk


def data_frame(data: Message) -> bytes:
    """The unfragmented, unmasked server frame for a message with no extension: text for
    ``str``, binary for bytes (RFC 6455 5.2; 5.1: servers do not mask)."""
    if type(data) is str:
        payload = data.encode("utf-8")
        first = FIN_TEXT
    else:
        payload = data  # type: ignore[assignment]
        first = FIN_BINARY
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


class NegotiatedConnection(Connection):
    """wsproto's server :class:`Connection`, remembering the permessage-deflate it uses.

    MessageStream inflates the client's messages itself (wsproto's extension inflates
    whatever it is given, with no bound), so it needs the negotiated parameters.
    """

    def __init__(self, deflate: Optional[PerMessageDeflate]) -> None:
        super().__init__(ConnectionType.SERVER, [deflate] if deflate is not None else [])
        self.deflate = deflate
