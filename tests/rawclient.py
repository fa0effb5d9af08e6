"""A deliberately small WebSocket client over a raw socket, for tests that need to see or
send exact bytes (status lines, frame headers, masks, broken frames).

Well-behaved traffic in the tests goes through real client libraries (websockets,
websocket-client, our own Client); this one exists to misbehave on purpose.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from typing import Dict, List, Optional, Sequence, Tuple

from conftest import TIMEOUT

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def handshake_request(
    host: str,
    path: str = "/",
    *,
    key: Optional[str] = None,
    extra: Sequence[Tuple[str, str]] = (),
    omit: Sequence[str] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    headers: Dict[str, str] = {
        "Host": host,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key or base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    for name in omit:
        headers.pop(name, None)
    lines = [f"GET {path} {version}"] + [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: Optional[int] = None,
    key: Optional[bytes] = None,
    extended: bool = False,
) -> bytes:
    """A client frame, byte by byte.

    ``length`` lies about the payload length when given; ``key`` fixes the masking key
    (random otherwise); ``extended`` writes a short length in the 16-bit form, which
    RFC 6455 5.2 forbids (the length must be minimal).
    """
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if n < 126 and not extended:
        header = struct.pack("!BB", first, (0x80 if mask else 0) | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        header = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4) if key is None else key
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + key + masked


class RawClient:
    """One TCP connection; ``connect()`` does the opening handshake unless told not to."""

    def __init__(self, address: Tuple[str, int], timeout: float = TIMEOUT) -> None:
        self.address = address
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buffer = b""
        self.status: Optional[int] = None
        self.headers: Dict[str, str] = {}
        self.body = b""

    @classmethod
    def connect(cls, address: Tuple[str, int], path: str = "/", **kwargs: object) -> "RawClient":
        client = cls(address)
        client.sock.sendall(handshake_request(f"{address[0]}:{address[1]}", path, **kwargs))  # type: ignore[arg-type]
        client.read_response()
        assert client.status == 101, (client.status, client.body)
        return client

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def read_response(self) -> int:
        """Read an HTTP response head (and its body, by Content-Length)."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before a response: {self.buffer!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status != 101:
            length = int(self.headers.get("content-length", "0"))
            while len(self.buffer) < length:
                if not self._fill():
                    break
            self.body, self.buffer = self.buffer[:length], self.buffer[length:]
        return self.status

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, opcode: int, payload: bytes = b"", **kwargs: object) -> None:
        self.sock.sendall(encode_frame(opcode, payload, **kwargs))  # type: ignore[arg-type]

    def send_text(self, text: str) -> None:
        self.send_frame(OP_TEXT, text.encode("utf-8"))

    def recv_frame(self) -> Tuple[int, bytes, bool, int, bool]:
        """``(opcode, payload, fin, rsv, masked)`` of the next frame from the server."""
        while len(self.buffer) < 2:
            if not self._fill():
                raise ConnectionError("closed")
        b0, b1 = self.buffer[0], self.buffer[1]
        n = b1 & 0x7F
        pos = 2
        if n == 126:
            while len(self.buffer) < 4:
                if not self._fill():
                    raise ConnectionError("closed")
            n = struct.unpack("!H", self.buffer[2:4])[0]
            pos = 4
        elif n == 127:
            while len(self.buffer) < 10:
                if not self._fill():
                    raise ConnectionError("closed")
            n = struct.unpack("!Q", self.buffer[2:10])[0]
            pos = 10
        masked = bool(b1 & 0x80)
        if masked:
            pos += 4
        while len(self.buffer) < pos + n:
            if not self._fill():
                raise ConnectionError("closed")
        payload = self.buffer[pos:pos + n]
        self.buffer = self.buffer[pos + n:]
        return b0 & 0x0F, payload, bool(b0 & 0x80), (b0 >> 4) & 7, masked

    def recv_message(self) -> Tuple[int, bytes]:
        """The next data frame, answering nothing and skipping pings."""
        while True:
            opcode, payload, _, _, _ = self.recv_frame()
            if opcode in (OP_TEXT, OP_BINARY, OP_CLOSE):
                return opcode, payload

    def recv_text(self) -> str:
        opcode, payload = self.recv_message()
        assert opcode == OP_TEXT, (opcode, payload)
        return payload.decode("utf-8")

    def expect_close(self) -> Tuple[int, str]:
        """Read until the server's Close frame; return its code and reason."""
        while True:
            opcode, payload, _, _, _ = self.recv_frame()
            if opcode == OP_CLOSE:
                if len(payload) < 2:
                    return 1005, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")

    def at_eof(self, timeout: float = TIMEOUT) -> bool:
        """True when the server closes TCP within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


def all_frames(client: RawClient) -> List[Tuple[int, bytes]]:
    out = []
    try:
        while True:
            opcode, payload, _, _, _ = client.recv_frame()
            out.append((opcode, payload))
    except (ConnectionError, socket.timeout):
        return out
