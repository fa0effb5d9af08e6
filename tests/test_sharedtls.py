"""SharedTLSSocket: one OpenSSL call at a time, and a write that waits for the peer never
stops another thread's read (the server's connections and the client both use it)."""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any, Iterator, List, Tuple

import pytest

from conftest import TIMEOUT
from wsroute_sync.sharedtls import SharedTLSSocket


@pytest.fixture
def pair(tls: Any) -> Iterator[Tuple[SharedTLSSocket, ssl.SSLSocket]]:
    """(our end, shared; the peer's end, a plain blocking SSLSocket), over loopback TLS."""
    server_ctx, client_ctx = tls
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: List[ssl.SSLSocket] = []

    def accept() -> None:
        sock, _ = listener.accept()
        accepted.append(server_ctx.wrap_socket(sock, server_side=True))

    thread = threading.Thread(target=accept)
    thread.start()
    ours = client_ctx.wrap_socket(socket.create_connection(listener.getsockname(),
                                                           timeout=TIMEOUT),
                                  server_hostname="127.0.0.1")
    thread.join(TIMEOUT)
    listener.close()
    peer = accepted[0]
    peer.settimeout(TIMEOUT)
    shared = SharedTLSSocket(ours)
    try:
        yield shared, peer
    finally:
        shared.close()
        peer.close()


def test_a_read_goes_on_while_a_write_waits_for_the_peer(
        pair: Tuple[SharedTLSSocket, ssl.SSLSocket]) -> None:
    shared, peer = pair
    shared.write_timeout = TIMEOUT
    errors: List[BaseException] = []

    def write_more_than_the_buffers_hold() -> None:
        try:
            shared.sendall(b"x" * (64 << 20))
        except OSError as exc:  # socket.timeout: the peer never read all of it
            errors.append(exc)

    writer = threading.Thread(target=write_more_than_the_buffers_hold)
    writer.start()
    try:
        peer.sendall(b"hello")  # the peer writes, and reads nothing yet
        shared.settimeout(TIMEOUT)
        assert shared.recv(100) == b"hello"  # not held up by the waiting writer
        assert writer.is_alive()  # still waiting: the peer has not read
    finally:
        received = 0
        while received < 64 << 20:
            chunk = peer.recv(1 << 20)
            assert chunk
            received += len(chunk)
        writer.join(TIMEOUT)
    assert not writer.is_alive() and errors == []


def test_reads_and_writes_time_out(pair: Tuple[SharedTLSSocket, ssl.SSLSocket]) -> None:
    shared, _ = pair
    shared.settimeout(0.2)
    with pytest.raises(socket.timeout):
        shared.recv(100)
    shared.write_timeout = 0.2
    with pytest.raises(socket.timeout):
        shared.sendall(b"x" * (64 << 20))  # the peer reads nothing
