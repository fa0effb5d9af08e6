"""A TLS socket that a reading thread and writing threads may share: one OpenSSL call at
a time, and no thread ever waits inside one or holding the lock.

OpenSSL does not allow ``SSL_read`` and ``SSL_write`` on one connection at the same time,
and ``ssl.SSLSocket`` adds no lock: a reader thread sitting in a blocking ``recv`` while
another thread sends breaks that rule (messages TLS 1.3 sends after the handshake, such
as session tickets and key updates, are then processed by one thread while the other
writes). :class:`SharedTLSSocket` keeps the socket non-blocking, takes :attr:`lock`
around each single read or write, and waits for the socket in ``poll()`` with the lock
released. A writer waiting for the peer to read therefore never stops the reader: when
both sides write more than the kernel buffers hold, each keeps reading the other.

The server's connections (:mod:`wsroute_sync.sender`, :mod:`wsroute_sync.connection`)
and the client use it for every TLS socket. Ordering whole frames among several writers
is the caller's business (the server's and the client's ``_writer`` locks).
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from typing import Any, Optional, Union

__all__ = ["SharedTLSSocket", "wait_for", "wait_ready"]

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_Data = Union[bytes, bytearray, memoryview]


def wait_ready(sock: Any, events: int, timeout: Optional[float]) -> bool:
    """Wait until ``sock`` (a socket or a file descriptor) is ready for the ``poll``
    ``events``; ``False`` if ``timeout`` seconds (``None``: no limit) ran out first.
    A closed socket raises ``OSError``."""
    return bool(wait_for(sock, events, timeout))


def wait_for(sock: Any, events: int, timeout: Optional[float] = None) -> int:
    """:func:`wait_ready`, returning what ``poll`` reported (``POLLIN``, ``POLLOUT``,
    ``POLLHUP``, ...), 0 if ``timeout`` ran out."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    if fd < 0:
        raise OSError("socket closed")
    poller = select.poll()
    poller.register(fd, events)
    ready = poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
    return ready[0][1] if ready else 0


class SharedTLSSocket:
    """Wraps a connected ``ssl.SSLSocket`` whose handshake is done, and makes it
    non-blocking if it is not yet.

    :meth:`recv` and :meth:`sendall` behave as a socket's with a timeout: ``recv`` waits
    up to the :meth:`settimeout` value, ``sendall`` up to :attr:`write_timeout` (both the
    wrapped socket's own timeout at first), and both raise ``socket.timeout`` when it
    runs out (after a partial ``sendall`` the stream is broken). :meth:`send_nowait` is
    the single non-blocking write they and the server's writer build on.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        #: Held around each OpenSSL call on this connection, never while waiting.
        self.lock = threading.Lock()
        self._timeout: Optional[float] = sock.gettimeout()
        #: Seconds :meth:`sendall` may wait for the peer to take its bytes (the wrapped
        #: socket's timeout at first); ``None``: no limit.
        self.write_timeout: Optional[float] = self._timeout
        if self._timeout != 0.0:
            sock.setblocking(False)  # the server's sockets come non-blocking already

    def fileno(self) -> int:
        return self._sock.fileno()

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    def settimeout(self, timeout: Optional[float]) -> None:
        """The read timeout (the socket itself stays non-blocking)."""
        self._timeout = timeout

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes, ``b""`` at the end of the stream."""
        timeout = self._timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                try:
                    return self._sock.recv(size)
                except ssl.SSLWantReadError:
                    events = _POLLIN
                except ssl.SSLWantWriteError:  # TLS must write before it can read
                    events = _POLLOUT
            self._wait(events, deadline, "read")

    def send_nowait(self, data: _Data) -> int:
        """One non-blocking write: the bytes taken. Raises ``ssl.SSLWantWriteError``
        (wait until writable) or ``ssl.SSLWantReadError`` (TLS must read first: wait
        until readable) when it takes none, ``OSError`` when it fails."""
        with self.lock:
            return self._sock.send(data)

    def sendall(self, data: _Data) -> None:
        view = memoryview(data).cast("B")
        timeout = self.write_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while view:
            try:
                view = view[self.send_nowait(view):]
                continue
            except ssl.SSLWantWriteError:
                events = _POLLOUT
            except ssl.SSLWantReadError:
                events = _POLLIN
            self._wait(events, deadline, "write")

    def _wait(self, events: int, deadline: Optional[float], what: str) -> None:
        """Wait, with the lock released, until the socket is ready for ``events``;
        ``socket.timeout`` once ``deadline`` (``None``: none) has passed."""
        left = None if deadline is None else deadline - time.monotonic()
        if (left is not None and left <= 0) or not wait_ready(self._sock, events, left):
            raise socket.timeout(f"{what} timed out")

    def send(self, data: _Data) -> int:
        """Writes all of ``data`` (a TLS record cannot be taken back half-written)."""
        self.sendall(data)
        return len(data)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)
