"""Accepted sockets waiting for their request head (and TLS handshake) in the accept
loop's selector, non-blocking: they cost a file descriptor and a small buffer, no thread
and no connection slot, until a whole request head has arrived.

A client that connects and sends nothing, or dribbles its head, or never finishes TLS,
waits here under ``handshake_timeout`` and a bound of its own (``max_pending``; when it
is full the oldest pending socket is dropped first), while complete requests go straight
on to a slot and a thread. Refusals made before a connection exists (400, 408, 431, and
the server's 503 and 429) are written here too, without blocking, and the socket lingers
a moment so that the client reads the answer before the close.
"""

from __future__ import annotations

import resource
import selectors
import socket
import ssl
import time
from typing import Any, Callable, Dict, Optional

from .http import BadRequest, HTTPRequest, check_request_start, find_head_end, http_response
from .http import parse_request_head

__all__ = ["PendingHandshakes", "default_max_pending"]

_HEAD_READ = 4096
_MSG_DONTWAIT = socket.MSG_DONTWAIT
# How long a refused client gets to read our answer, and how many refused sockets may
# linger at once (past that they are closed at once).
_LINGER_SECONDS = 2.0
_MAX_LINGERING = 512
# File descriptors kept free for everything that is not a pending handshake or a
# connection: the listener, log files, the backplane, the application's own.
_FD_RESERVE = 256
_MIN_PENDING = 64

OnHead = Callable[[socket.socket, Any, HTTPRequest, bytes], None]


def default_max_pending(max_connections: int) -> int:
    """The default bound on pending handshakes: what the process's file descriptor limit
    leaves beside ``max_connections`` connections and a reserve, at least 64."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - every POSIX system has it
        soft = resource.RLIM_INFINITY
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(_MIN_PENDING, int(soft) - max_connections - _FD_RESERVE)


class _Pending:
    """One socket waiting for its head."""

    __slots__ = ("sock", "remote", "deadline", "buffer", "tls_done", "events")

    def __init__(self, sock: socket.socket, remote: Any, deadline: float, tls_done: bool) -> None:
        self.sock = sock
        self.remote = remote
        self.deadline = deadline
        self.buffer = bytearray()
        self.tls_done = tls_done
        self.events = selectors.EVENT_READ


class _Lingering:
    """A refused socket: answer written (or being written), waiting for the hang-up."""

    __slots__ = ("sock", "deadline", "rest")

    def __init__(self, sock: socket.socket, deadline: float, rest: bytes) -> None:
        self.sock = sock
        self.deadline = deadline
        self.rest = rest


class PendingHandshakes:
    """Sockets accepted but not yet admitted, driven by the accept loop's selector.

    The accept loop calls :meth:`add` for each accepted socket, :meth:`handle` for each
    selector key whose ``data`` it does not own itself (see :meth:`owns`), selects with
    :meth:`timeout` and calls :meth:`expire` after each round. A complete request head
    goes to ``on_head(sock, remote, request, rest)``, which owns the socket from then on
    (a plain socket is still blocking, a TLS one non-blocking; ``rest`` holds bytes read
    past the head).
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        *,
        ssl_context: Optional[ssl.SSLContext],
        handshake_timeout: Optional[float],
        max_header_size: int,
        max_pending: Optional[int],
        logger: Any,
        on_head: OnHead,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._selector = selector
        self._ssl_context = ssl_context
        self._timeout = handshake_timeout
        self._max_header = max_header_size
        self._max_pending = max_pending
        self._logger = logger
        self._on_head = on_head
        self._clock = clock
        # Insertion order is arrival order, and with one timeout for all, deadline
        # order too: the first entry is both the oldest and the next to expire.
        self._pending: Dict[int, _Pending] = {}
        self._lingering: Dict[int, _Lingering] = {}
        self.dropped = 0  # pushed out by the bound, for the logs

    def __len__(self) -> int:
        return len(self._pending)

    def owns(self, key: selectors.SelectorKey) -> bool:
        return isinstance(key.data, (_Pending, _Lingering))

    def add(self, sock: socket.socket, remote: Any) -> None:
        """Take a socket fresh from ``accept()``."""
        now = self._clock()
        limit = self._max_pending
        if limit is not None and len(self._pending) >= limit:
            oldest = next(iter(self._pending.values()))
            self._forget(oldest)
            oldest.sock.close()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                self._logger.warning(
                    "pending handshakes full (%d): dropped the oldest (%d so far)",
                    limit, self.dropped)
        try:
            if self._ssl_context is not None:
                sock.setblocking(False)
                sock = self._ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False)
            # A plain socket stays blocking (as accept() made it): it is read with
            # MSG_DONTWAIT here, and its connection thread reads it blocking, so its mode
            # never needs changing (two system calls saved each way).
        except (OSError, ssl.SSLError) as exc:
            self._logger.debug("connection from %s lost before its request: %s", remote, exc)
            sock.close()
            return
        deadline = float("inf") if self._timeout is None else now + self._timeout
        entry = _Pending(sock, remote, deadline, tls_done=self._ssl_context is None)
        self._pending[sock.fileno()] = entry
        self._selector.register(sock, selectors.EVENT_READ, entry)
        # Most clients send their request at once, often before the accept: try now,
        # saving a trip through the selector.
        self._advance(entry)

    def handle(self, key: selectors.SelectorKey, events: int) -> None:
        data = key.data
        if isinstance(data, _Pending):
            self._advance(data)
        elif isinstance(data, _Lingering):
            self._drain(data)

    def timeout(self) -> Optional[float]:
        """Seconds until the earliest deadline, for ``select()``; ``None`` if none."""
        earliest = float("inf")
        if self._pending:
            earliest = next(iter(self._pending.values())).deadline
        if self._lingering:
            earliest = min(earliest, next(iter(self._lingering.values())).deadline)
        if earliest == float("inf"):
            return None
        return max(0.0, earliest - self._clock())

    def expire(self) -> None:
        now = self._clock()
        while self._pending:
            entry = next(iter(self._pending.values()))
            if entry.deadline > now:
                break
            self._forget(entry)
            if entry.tls_done:
                self._logger.warning("connection from %s: no complete request within "
                                     "handshake_timeout", entry.remote)
                self.refuse(entry.sock, http_response(
                    408, "request head not received in time\n"))
            else:
                self._logger.warning("connection from %s: TLS handshake not finished "
                                     "within handshake_timeout", entry.remote)
                entry.sock.close()
        while self._lingering:
            linger = next(iter(self._lingering.values()))
            if linger.deadline > now:
                break
            self._end_linger(linger)

    def refuse(self, sock: socket.socket, response: bytes) -> None:
        """Answer a client we will not serve, without blocking; then close (after a
        moment of reading what it still sends, so that our answer is not lost to RST)."""
        try:
            sock.setblocking(False)
            sent = sock.send(response)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except (OSError, ValueError):
            sock.close()
            return
        if len(self._lingering) >= _MAX_LINGERING:
            sock.close()
            return
        linger = _Lingering(sock, self._clock() + _LINGER_SECONDS, response[sent:])
        if not linger.rest:
            self._half_close(sock)
        self._lingering[sock.fileno()] = linger
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if linger.rest else 0)
        self._selector.register(sock, events, linger)

    def close(self) -> None:
        """Close every pending and lingering socket (the accept loop is ending)."""
        for entry in list(self._pending.values()):
            self._forget(entry)
            entry.sock.close()
        for linger in list(self._lingering.values()):
            self._end_linger(linger)

    # Internals.

    def _unwatch(self, table: Dict[int, Any], sock: socket.socket) -> None:
        table.pop(sock.fileno(), None)
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _forget(self, entry: _Pending) -> None:
        self._unwatch(self._pending, entry.sock)

    def _want(self, entry: _Pending, events: int) -> None:
        if entry.events != events:
            entry.events = events
            self._selector.modify(entry.sock, events, entry)

    def _advance(self, entry: _Pending) -> None:
        sock = entry.sock
        if not entry.tls_done:
            assert isinstance(sock, ssl.SSLSocket)
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                self._want(entry, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._want(entry, selectors.EVENT_WRITE)
                return
            except (OSError, ssl.SSLError) as exc:
                self._forget(entry)
                self._logger.warning("connection from %s: TLS handshake failed: %s",
                                     entry.remote, exc)
                sock.close()
                return
            entry.tls_done = True
            self._want(entry, selectors.EVENT_READ)
        buffer = entry.buffer
        flags = 0 if self._ssl_context is not None else _MSG_DONTWAIT
        while True:
            try:
                chunk = sock.recv(_HEAD_READ, flags) if flags else sock.recv(_HEAD_READ)
            except (BlockingIOError, ssl.SSLWantReadError):
                # Decrypted bytes OpenSSL already holds make no selector event: read them.
                if isinstance(sock, ssl.SSLSocket) and sock.pending():
                    continue
                return
            except ssl.SSLWantWriteError:
                self._want(entry, selectors.EVENT_WRITE)
                return
            except (OSError, ssl.SSLError) as exc:
                self._forget(entry)
                self._logger.debug("connection from %s lost before its request: %s",
                                   entry.remote, exc)
                sock.close()
                return
            if not chunk:
                self._forget(entry)
                self._logger.debug("connection from %s closed before a request", entry.remote)
                sock.close()
                return
            start = len(buffer)
            buffer += chunk
            try:
                if start < 16:
                    # Refuse a TLS hello or binary junk now: it never ends with a blank
                    # line, so waiting for one would only hold the socket.
                    check_request_start(buffer)
                end = find_head_end(buffer, start)
                limit = self._max_header
                if (end < 0 and len(buffer) > limit) or end > limit:
                    raise BadRequest(431, f"request head larger than {limit} bytes")
                if end < 0:
                    continue  # read again: the selector is for when nothing is left
                request = parse_request_head(bytes(buffer[:end]), entry.remote)
            except BadRequest as exc:
                self._forget(entry)
                self._logger.warning("connection from %s: bad request, answered %d: %s",
                                     entry.remote, exc.status, exc.reason)
                self.refuse(sock, http_response(exc.status, exc.reason + "\n"))
                return
            self._forget(entry)
            self._on_head(sock, entry.remote, request, bytes(buffer[end:]))
            return

    @staticmethod
    def _half_close(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _drain(self, linger: _Lingering) -> None:
        sock = linger.sock
        if linger.rest:
            try:
                sent = sock.send(linger.rest)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except (OSError, ValueError):
                self._end_linger(linger)
                return
            linger.rest = linger.rest[sent:]
            if linger.rest:
                return
            self._half_close(sock)
            self._selector.modify(sock, selectors.EVENT_READ, linger)
        try:
            if sock.recv(65536):
                return  # the request, still arriving: keep waiting for the hang-up
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (OSError, ValueError):
            pass
        self._end_linger(linger)

    def _end_linger(self, linger: _Lingering) -> None:
        self._unwatch(self._lingering, linger.sock)
        linger.sock.close()
