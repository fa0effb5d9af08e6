"""The least a thread-per-connection WebSocket server can do: a reference, not a peer.

The raw-TCP server's accept loop and threads, the same JSON work (``dispatch``), and
just enough of RFC 6455 for the load generator: the opening handshake, masked frames
in, unmasked frames out, the Close answered. Nothing else: no UTF-8 validation, no
fragmentation, no pings, no limits, no checks of the request. No server should ship
like this; it is here to show what WebSocket itself costs on this design (a bigger
client, masking, framing) apart from what a library adds on top.

Run it by name: ``--servers wsroute-sync,minimal-ws,raw-tcp``.
"""

from __future__ import annotations

import base64
import hashlib
import socket

from _common import dispatch, serve_threads

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3


def handshake(sock: socket.socket) -> bytes | None:
    """Answer the upgrade; return the bytes read past the request head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    key = b""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    sock.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    return rest


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def handle(sock: socket.socket) -> None:
    from_bytes = int.from_bytes
    with sock:
        buf = handshake(sock)
        if buf is None:
            return
        while True:
            # Wait for one whole frame: 2 header bytes, the extended length, the mask.
            while True:
                if len(buf) >= 2:
                    n, start = buf[1] & 0x7F, 2
                    if n == 126 and len(buf) >= 4:
                        n, start = from_bytes(buf[2:4], "big"), 4
                    elif n == 127 and len(buf) >= 10:
                        n, start = from_bytes(buf[2:10], "big"), 10
                    if n < 126 or start > 2:
                        if len(buf) >= start + 4 + n:
                            break
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            opcode = buf[0] & 0x0F
            mask = buf[start:start + 4]
            masked = buf[start + 4:start + 4 + n]
            buf = buf[start + 4 + n:]
            payload = (
                from_bytes(masked, "little") ^ from_bytes((mask * ((n + 3) >> 2))[:n], "little")
            ).to_bytes(n, "little")
            if opcode == 8:  # Close: echo its code, then close TCP (RFC 6455 7.1.1)
                sock.sendall(frame(8, payload[:2]))
                return
            if opcode in (1, 2):
                sock.sendall(frame(opcode, dispatch(payload).encode()))


def main() -> None:
    serve_threads(__doc__ or "", handle)


if __name__ == "__main__":
    main()
