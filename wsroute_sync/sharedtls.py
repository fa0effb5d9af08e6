"""A TLS socket that a reading thread and writing threads may share: one OpenSSL call at
a time, and no thread ever blocks inside one.

OpenSSL does not allow ``SSL_read`` and ``SSL_write`` on one connection at the same time,
and ``ssl.SSLSocket`` adds no lock: a client whose reader thread sits in a blocking
``recv`` while another thread sends breaks that rule. Messages TLS 1.3 sends after the
handshake (session tickets, key updates) are then processed by one thread while the
other writes. :class:`SharedTLSSocket` keeps the socket non-blocking, takes a lock around
every read and write, and waits for the socket with ``poll()`` outside the lock. A write
waits holding it, so that its bytes stay in order, and up to ``write_timeout``.

The client uses it for ``wss://`` (the server's connections have their own lock, in
:mod:`wsroute_sync.sender`).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import Any, Optional, Union

__all__ = ["SharedTLSSocket"]

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT


class SharedTLSSocket:
    """Wraps a connected ``ssl.SSLSocket`` whose handshake is done (and switches it to
    non-blocking mode).

    The methods a client needs, with a socket's meaning: :meth:`recv` waits up to the
    :meth:`settimeout` value and raises ``socket.timeout``; :meth:`sendall` (and
    :meth:`send`, which also writes everything) waits up to :attr:`write_timeout`
    (``None``: no limit) and raises ``socket.timeout`` then, the stream being broken.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._timeout: Optional[float] = sock.gettimeout()
        #: Seconds a write may wait for the peer to take its bytes; ``None``: no limit.
        self.write_timeout: Optional[float] = None
        sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    def settimeout(self, timeout: Optional[float]) -> None:
        """The read timeout (the socket itself stays non-blocking)."""
        self._timeout = timeout

    def recv(self, size: int) -> bytes:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            with self._lock:
                try:
                    return self._sock.recv(size)
                except ssl.SSLWantReadError:
                    events = _POLLIN
                except ssl.SSLWantWriteError:  # TLS must write before it can read
                    events = _POLLOUT
            self._wait(events, deadline, "read")

    def sendall(self, data: Union[bytes, bytearray, memoryview]) -> None:
        view = memoryview(data).cast("B")
        timeout = self.write_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while view:
                try:
                    n = self._sock.send(view)
                except ssl.SSLWantWriteError:
                    self._wait(_POLLOUT, deadline, "write")
                    continue
                except ssl.SSLWantReadError:  # TLS must read before it can write
                    self._wait(_POLLIN, deadline, "write")
                    continue
                view = view[n:]

    def send(self, data: Union[bytes, bytearray, memoryview]) -> int:
        """Writes all of ``data`` (a TLS record cannot be taken back half-written)."""
        self.sendall(data)
        return len(data)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def _wait(self, events: int, deadline: Optional[float], what: str) -> None:
        """Wait until the socket is ready for ``events``; ``socket.timeout`` at
        ``deadline``."""
        fd = self._sock.fileno()
        if fd < 0:
            raise OSError("socket closed")
        poller = select.poll()
        poller.register(fd, events)
        if deadline is None:
            poller.poll()
            return
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(int(left * 1000) + 1):
            raise socket.timeout(f"TLS {what} timed out")
