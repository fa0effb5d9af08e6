"""Recover what kosoku actually put on the wire from its wire log.

kosoku keeps Autobahn's wire log: a list of entries whose first element is a
tag. ``("TO", (length, hex), sync)`` records octets written to the socket, in
order. Re-parsing those octets as RFC 6455 frames and unmasking them gives the
exact payload bytes the server received, independent of how kosoku's Python
layer described the message. That is the evidence that the UTF-8 vector
workaround works. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Frame", "TruncatedWirelog", "first_text_message", "sent_frames"]

_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1


class TruncatedWirelog(ValueError):
    """The log elides octets (kosoku shortens big writes with " ...")."""


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


def _sent_octets(wirelog: Iterable[Sequence[Any]]) -> bytes:
    octets = bytearray()
    for entry in wirelog:
        if entry[0] != "TO":
            continue
        length, hex_data = entry[1]
        if hex_data.endswith(" ..."):
            raise TruncatedWirelog(f"write of {length} octets is elided in the wire log")
        chunk = bytes.fromhex(hex_data)
        if len(chunk) != length:
            raise TruncatedWirelog(f"write of {length} octets logged as {len(chunk)}")
        octets += chunk
    return bytes(octets)


def sent_frames(wirelog: Iterable[Sequence[Any]]) -> list[Frame]:
    """Every frame kosoku wrote, unmasked (RFC 6455 section 5.2/5.3)."""
    data = _sent_octets(wirelog)
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 2:
            raise TruncatedWirelog("frame header cut short")
        first, second = data[pos], data[pos + 1]
        pos += 2
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        elif length == 127:
            length = int.from_bytes(data[pos : pos + 8], "big")
            pos += 8
        mask = b"\x00\x00\x00\x00"
        if second & 0x80:
            mask = data[pos : pos + 4]
            pos += 4
        # A frame claiming more octets than were logged means the log is
        # incomplete (e.g. the connection died mid-write); refuse to guess.
        if pos + length > len(data):
            raise TruncatedWirelog("frame payload cut short")
        masked = data[pos : pos + length]
        pos += length
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(masked))
        frames.append(Frame(fin=bool(first & 0x80), opcode=first & 0x0F, payload=payload))
    return frames


def first_text_message(wirelog: Iterable[Sequence[Any]]) -> bytes | None:
    """Payload bytes of the first text message kosoku sent, reassembled.

    Control frames interleaved in a fragmented message are skipped, as a
    receiver would. ``None`` if no complete text message was sent.
    """
    parts: list[bytes] = []
    in_message = False
    for frame in sent_frames(wirelog):
        if not in_message and frame.opcode == _OP_TEXT:
            in_message = True
        elif not (in_message and frame.opcode == _OP_CONTINUATION):
            continue
        parts.append(frame.payload)
        if frame.fin:
            return b"".join(parts)
    return None
