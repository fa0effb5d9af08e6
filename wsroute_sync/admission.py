"""Admission: accepted sockets wait for their TLS handshake and request head in the accept
loop's selector, holding no thread and no connection slot, until they are worth one.

Taking a slot at ``accept()`` let any client that connects and says nothing hold it for
``handshake_timeout``: 200 silent TCP connections locked out every real client of a
server with ``max_connections=200``. Here a socket that has not yet sent a complete
request head costs a file descriptor and a small buffer. :class:`PendingHandshakes`
drives the TLS handshake and reads the head without blocking, answers bad heads itself
(400, 408, 414, 431, ...), and hands each complete head to a callback that decides what
the connection gets (a slot and a thread, a 503, a plain HTTP answer). It all runs in the
thread that owns the selector: nothing here is thread-safe, and nothing blocks.
"""

from __future__ import annotations

import collections
import itertools
import logging
import selectors
import socket
import ssl
import time
from typing import Any, Callable, Optional, Union

from .http import BadRequest, HTTPRequest, check_request_start, find_head_end, http_response
from .http import parse_request_head
from .limits import MAX_LINGERING, WarningThrottle

__all__ = ["PendingHandshakes", "OnHead", "HEAD_READ"]

#: ``on_head(sock, remote_address, request, rest)``: a complete, parsed request head.
OnHead = Callable[[socket.socket, Any, HTTPRequest, bytes], None]
_Logger = Union[logging.Logger, logging.LoggerAdapter]  # type: ignore[type-arg]

#: The head is read in pieces this size (a slow client must not pin much memory).
HEAD_READ = 4096
_MSG_DONTWAIT = socket.MSG_DONTWAIT
# A refused client gets this long to read our answer before the socket is closed...
_LINGER_SECONDS = 2.0
# A lingering client that keeps sending is cut off after this much (we only discard it).
_DRAIN_LIMIT = 1 << 20
# What a socket is waiting for.
_TLS, _HEAD, _LINGER = 0, 1, 2


class _Waiting:
    """One socket in admission; the selector key's ``data``. Small: there may be many."""

    __slots__ = ("sock", "remote", "deadline", "phase", "buf", "events", "unsent")

    def __init__(self, sock: socket.socket, remote: Any, deadline: float, phase: int) -> None:
        self.sock = sock
        self.remote = remote
        self.deadline = deadline
        self.phase = phase
        # The head read so far; while lingering, the count of bytes drained.
        self.buf: Union[bytearray, int] = bytearray()
        # The events it is registered for; 0 while not registered.
        self.events = 0
        # While lingering: the part of the answer the socket could not take yet.
        self.unsent = b""


class PendingHandshakes:
    """Sockets accepted but not yet admitted: TLS handshake and request head, non-blocking.

    Use it from the thread that runs ``selector`` (it is not thread-safe): give it
    sockets with :meth:`add`, pass it the selector keys it :meth:`owns` (:meth:`handle`),
    select with its :meth:`timeout`, call :meth:`expire` after each wake-up and
    :meth:`close` at the end, as :class:`~wsroute_sync.accept.Acceptor` does.

    Args:
        selector: the accept loop's selector; sockets are registered with a ``data``
            that :meth:`owns` recognizes.
        ssl_context: a server context; each socket is wrapped and its TLS handshake
            driven here. ``None`` for plain sockets.
        handshake_timeout: seconds for the TLS handshake and the whole request head
            together; past it the client gets 408 (or, before TLS is up, is closed).
            ``None``: no limit (the :attr:`max_pending` bound still applies).
        max_header_size: bytes of the request head; more gets 431 (414 when the request
            line alone is longer).
        max_pending: sockets waiting at once; one more drops the oldest (closed with no
            answer: under a flood it is the likeliest to be idle, and the newest is
            likeliest to be a client about to send its head). See
            :func:`default_max_pending`; ``None``: no bound.
        logger: where records go (default ``logging.getLogger("wsroute_sync.admission")``).
            Refusals are logged at WARNING at most once a second per kind, with a count
            of the others, which go to DEBUG.
        on_head: called as ``on_head(sock, remote_address, request, rest)`` once a head
            is complete and parsed; ``rest`` holds the bytes read after it (the start of
            the first WebSocket frame, say). From then on the receiver owns ``sock``: it
            is unregistered from the selector, still non-blocking (set the mode you
            need), and an ``ssl.SSLSocket`` with ``ssl_context``, whose TLS object may
            hold more decrypted input (``sock.pending()``) that a selector will not
            report. It runs in the selector's thread and must not block; it may call
            :meth:`refuse`. If it raises, the error is logged and ``sock`` is closed.
        clock: ``time.monotonic`` or a stand-in for tests.
        linger: seconds a refused client gets to read its answer (default 2).
        max_lingering: refused sockets lingering at once (default 512); one more closes
            the oldest.

    Counters, for metrics: :attr:`dropped` (oldest dropped when full), :attr:`timed_out`
    (``handshake_timeout`` ran out), :attr:`refused` (answered by :meth:`refuse`, from
    here or from the server).
    """

    def __init__(
        self,
        selector: selectors.BaseSelector,
        *,
        ssl_context: Optional[ssl.SSLContext],
        handshake_timeout: Optional[float],
        max_header_size: int,
        max_pending: Optional[int],
        on_head: OnHead,
        logger: Optional[_Logger] = None,
        clock: Callable[[], float] = time.monotonic,
        linger: float = _LINGER_SECONDS,
        max_lingering: int = MAX_LINGERING,
    ) -> None:
        for name, value in (("max_header_size", max_header_size),
                            ("max_pending", max_pending), ("max_lingering", max_lingering)):
            if value is None and name == "max_pending":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        for name, seconds in (("handshake_timeout", handshake_timeout), ("linger", linger)):
            if seconds is None and name == "handshake_timeout":
                continue
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise TypeError(f"{name} must be a number of seconds")
            if not seconds > 0:
                raise ValueError(f"{name} must be > 0, got {seconds!r}")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError("ssl_context must be an ssl.SSLContext or None")
        if not callable(on_head):
            raise TypeError("on_head must be callable")
        self._selector = selector
        self._ssl_context = ssl_context
        self._timeout = handshake_timeout
        self._limit = max_header_size
        self._max_pending: float = float("inf") if max_pending is None else max_pending
        self._on_head = on_head
        self._logger: _Logger = (
            logger if logger is not None else logging.getLogger("wsroute_sync.admission")
        )
        self._clock = clock
        self._linger = float(linger)
        self._max_lingering = max_lingering
        # Insertion order is deadline order (every socket gets the same timeout), so the
        # first entry is both the oldest and the next to expire. OrderedDict, not dict:
        # finding a dict's first entry gets slower with every entry deleted before it.
        self._pending: "collections.OrderedDict[_Waiting, None]" = collections.OrderedDict()
        self._lingering: "collections.OrderedDict[_Waiting, None]" = collections.OrderedDict()
        self._scratch = bytearray(65536)  # where lingering input is drained and dropped
        self._closed = False
        self.dropped = 0
        self.timed_out = 0
        self.refused = 0
        self._warn_dropped = WarningThrottle(self._logger, clock)
        self._warn_timeout = WarningThrottle(self._logger, clock)
        self._warn_bad = WarningThrottle(self._logger, clock)
        self._warn_tls = WarningThrottle(self._logger, clock)

    # The accept loop's interface.

    def add(self, sock: socket.socket, remote_address: Any, head: Optional[bytes] = None
            ) -> None:
        """Take a socket fresh from ``accept()`` (``on_head`` may be called before this
        returns), or from a follower thread (:mod:`.follow`) with what it read: ``head``."""
        if self._closed:
            sock.close()
            return
        timeout = self._timeout
        deadline = self._clock() + timeout if timeout is not None else float("inf")
        if self._ssl_context is None:
            # Read at once rather than wait for the selector: a client usually sends its
            # head right behind the handshake, and then this saves three system calls
            # (register, select, unregister) for the one that fails when it has not.
            waiting = _Waiting(sock, remote_address, deadline, _HEAD)
            if head is None:
                self._read_head(waiting)
            elif self._took_in(waiting, head):
                self._wait(waiting, selectors.EVENT_READ)
            return
        try:
            if sock.family != socket.AF_UNIX:
                # Nagle off, as plain sockets get it from the listener: the session
                # tickets a TLS server writes after its handshake waited for the client's
                # delayed ACK, 40 ms of every wss handshake.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sock = self._ssl_context.wrap_socket(sock, server_side=True,
                                                 do_handshake_on_connect=False)
        except OSError as exc:
            self._logger.debug("admission: %s lost at accept: %s", remote_address, exc)
            sock.close()
            return
        self._tls(_Waiting(sock, remote_address, deadline, _TLS))

    def owns(self, key: selectors.SelectorKey) -> bool:
        """Whether ``key`` is one of this object's sockets (pass it to :meth:`handle`)."""
        return type(key.data) is _Waiting

    def handle(self, key: selectors.SelectorKey, events: int) -> None:
        """Make progress on a socket the selector reported ready; keys this object does
        not own (see :meth:`owns`) are ignored."""
        waiting = key.data
        if type(waiting) is not _Waiting:
            return
        phase = waiting.phase
        if phase == _HEAD:
            self._read_head(waiting)
        elif phase == _TLS:
            self._tls(waiting)
        else:
            self._drain(waiting)

    def timeout(self) -> Optional[float]:
        """Seconds until the earliest deadline (0 if one has passed), ``None`` if none."""
        deadline = float("inf")
        if self._pending:
            deadline = next(iter(self._pending)).deadline
        if self._lingering:
            deadline = min(deadline, next(iter(self._lingering)).deadline)
        if deadline == float("inf"):
            return None
        return max(0.0, deadline - self._clock())

    def expire(self) -> None:
        """Answer 408 to heads past ``handshake_timeout`` (close TLS handshakes that never
        finished) and close refused sockets whose linger is over."""
        if not self._pending and not self._lingering:
            return  # the usual case, after each wake-up of a loop that keeps up
        now = self._clock()
        # Both are in deadline order: the expired ones come first (copied, then closed).
        for waiting in list(itertools.takewhile(lambda w: w.deadline <= now, self._pending)):
            self.timed_out += 1
            if waiting.phase == _TLS:
                self._warn_timeout.warning(
                    "admission: TLS handshake with %s not finished within "
                    "handshake_timeout, closing", waiting.remote,
                )
                self._discard(waiting)
            else:
                self._warn_timeout.warning(
                    "admission: no complete request from %s within handshake_timeout, "
                    "answered 408", waiting.remote,
                )
                self._answer(waiting, http_response(408, "request head not received in time\n"))
        for waiting in list(itertools.takewhile(lambda w: w.deadline <= now, self._lingering)):
            self._discard(waiting)

    def refuse(self, sock: socket.socket, response: bytes) -> None:
        """Answer ``response`` and close without blocking: send it, half-close, and keep
        the socket in the selector for ``linger`` seconds to read and drop what the client
        still sends.

        Closing a socket with unread input makes the kernel send RST, which can destroy
        the answer before the client reads it; draining first lets the client see it.
        For sockets from ``accept()`` (a 503 decided before admission) or from
        ``on_head`` (not registered with the selector; plain or TLS). What the socket
        cannot take at once is written when it can, within the same ``linger``; a
        socket that fails is closed. Bounded by ``max_lingering`` (the oldest goes).
        """
        if self._closed:
            sock.close()
            return
        try:
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        self._answer(_Waiting(sock, None, 0.0, _LINGER), response)

    def close(self) -> None:
        """Close every pending and lingering socket; later sockets are closed at once."""
        self._closed = True
        for waiting in list(self._pending) + list(self._lingering):
            self._discard(waiting)

    def __len__(self) -> int:
        """Sockets waiting for their TLS handshake or request head (not lingering)."""
        return len(self._pending)

    @property
    def lingering(self) -> int:
        """Refused sockets still lingering."""
        return len(self._lingering)

    # Internals.

    def _wait(self, waiting: _Waiting, events: int) -> None:
        """Wait in the selector for ``events``: registered, and queued on first use."""
        if waiting.events == events:
            return
        try:
            if waiting.events:
                self._selector.modify(waiting.sock, events, waiting)
            else:
                if waiting.phase != _LINGER:
                    while len(self._pending) >= self._max_pending:
                        self._drop_oldest()
                    self._pending[waiting] = None
                self._selector.register(waiting.sock, events, waiting)
        except (OSError, ValueError) as exc:  # ValueError: select()'s FD_SETSIZE
            self._logger.error("admission: cannot watch %s: %s", waiting.remote, exc)
            self._discard(waiting)
            return
        waiting.events = events

    def _drop_oldest(self) -> None:
        oldest = next(iter(self._pending))
        self.dropped += 1
        self._warn_dropped.warning(
            "admission: %d sockets waiting for a request head (max_pending): "
            "dropping the oldest, from %s", len(self._pending), oldest.remote,
        )
        self._discard(oldest)

    def _discard(self, waiting: _Waiting) -> None:
        """Forget a socket and close it."""
        self._pending.pop(waiting, None)
        self._lingering.pop(waiting, None)
        if waiting.events:
            waiting.events = 0
            try:
                self._selector.unregister(waiting.sock)
            except (KeyError, ValueError):  # pragma: no cover - registered, so known
                pass
        waiting.sock.close()

    def _tls(self, waiting: _Waiting) -> None:
        sock = waiting.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wait(waiting, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._wait(waiting, selectors.EVENT_WRITE)
            return
        except OSError as exc:  # ssl.SSLError too: a plain client, bad versions, resets
            self._warn_tls.warning("admission: TLS handshake with %s failed: %s",
                                   waiting.remote, exc)
            self._discard(waiting)
            return
        waiting.phase = _HEAD
        self._read_head(waiting)

    def _read_head(self, waiting: _Waiting) -> None:
        sock = waiting.sock
        # A plain socket stays blocking for its thread; MSG_DONTWAIT saves switching it
        # to non-blocking and back, two system calls that each hand over the GIL.
        flags = 0 if isinstance(sock, ssl.SSLSocket) else _MSG_DONTWAIT
        while True:
            try:
                chunk = sock.recv(HEAD_READ, flags)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait(waiting, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:  # TLS wants to write to let us read (rare)
                self._wait(waiting, selectors.EVENT_WRITE)
                return
            except OSError as exc:
                self._logger.debug("admission: %s lost before a request: %s",
                                   waiting.remote, exc)
                self._discard(waiting)
                return
            if not chunk:
                self._logger.debug("admission: %s closed before a complete request",
                                   waiting.remote)
                self._discard(waiting)
                return
            if not self._took_in(waiting, chunk):
                return
            # A plain socket's short read emptied the kernel buffer: the selector tells
            # when more comes. A TLS object may still hold decrypted bytes that no
            # selector reports, so TLS reads go on until SSLWantReadError.
            if len(chunk) < HEAD_READ and not isinstance(sock, ssl.SSLSocket):
                self._wait(waiting, selectors.EVENT_READ)
                return

    def _took_in(self, waiting: _Waiting, chunk: bytes) -> bool:
        """Add ``chunk`` to the head read so far; ``False`` once the socket is taken
        care of (the head complete and handed on, or refused)."""
        buf = waiting.buf
        assert isinstance(buf, bytearray)
        limit = self._limit
        start = len(buf)
        buf += chunk
        if start < 16:
            # Refuse a TLS hello or binary junk now: it never ends with a blank line,
            # so waiting for one would keep the socket for handshake_timeout.
            try:
                check_request_start(buf)
            except BadRequest as exc:
                self._bad_request(waiting, exc.status, exc.reason)
                return False
        end = find_head_end(buf, start)
        if (end < 0 and len(buf) > limit) or end > limit:
            # RFC 9112 3: a request line past the limit is a target too long (414).
            if buf.find(b"\n", 0, limit) < 0:
                self._bad_request(waiting, 414, f"request line longer than {limit} bytes")
            else:
                self._bad_request(waiting, 431, f"request head larger than {limit} bytes")
            return False
        if end >= 0:
            self._complete(waiting, buf, end)
            return False
        return True

    def _complete(self, waiting: _Waiting, buf: bytearray, end: int) -> None:
        head = bytes(buf) if end == len(buf) else bytes(buf[:end])
        try:
            request = parse_request_head(head, waiting.remote)
        except BadRequest as exc:
            self._bad_request(waiting, exc.status, exc.reason)
            return
        rest = bytes(buf[end:]) if end < len(buf) else b""
        self._pending.pop(waiting, None)
        sock = waiting.sock
        if waiting.events:
            waiting.events = 0
            self._selector.unregister(sock)
        try:
            self._on_head(sock, waiting.remote, request, rest)
        except Exception:
            self._logger.error("admission: on_head failed for %s", waiting.remote,
                               exc_info=True)
            sock.close()

    def _bad_request(self, waiting: _Waiting, status: int, reason: str) -> None:
        self._warn_bad.warning("admission: bad request from %s, answered %d: %s",
                               waiting.remote, status, reason)
        waiting.sock.setblocking(False)  # a plain socket is still blocking (_read_head)
        self._answer(waiting, http_response(status, reason + "\n"))

    def _answer(self, waiting: _Waiting, response: bytes) -> None:
        """Send ``response``, half-close, and linger (see :meth:`refuse`)."""
        self.refused += 1
        self._pending.pop(waiting, None)
        waiting.phase = _LINGER
        waiting.buf = 0
        waiting.deadline = self._clock() + self._linger
        waiting.unsent = response
        if not self._send_unsent(waiting):
            self._discard(waiting)
            return
        while len(self._lingering) >= self._max_lingering:
            self._discard(next(iter(self._lingering)))
        self._lingering[waiting] = None
        self._wait(waiting, selectors.EVENT_WRITE if waiting.unsent else selectors.EVENT_READ)

    def _send_unsent(self, waiting: _Waiting) -> bool:
        """Write what is left of the answer, half-close once it is out; ``False`` if the
        socket failed."""
        sock = waiting.sock
        try:
            sent = sock.send(waiting.unsent)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            # The answers are a few hundred bytes into an empty send buffer: this is a
            # client that does not read; it gets until the linger ends.
            return True
        except OSError:
            return False
        waiting.unsent = waiting.unsent[sent:]
        if not waiting.unsent:
            try:
                # On a TLS socket this also drops the TLS object (no close_notify: the
                # answer is whole, and says "Connection: close"): the drain then reads
                # raw bytes.
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                return False
        return True

    def _drain(self, waiting: _Waiting) -> None:
        if waiting.unsent:
            if not self._send_unsent(waiting):
                self._discard(waiting)
            elif not waiting.unsent:
                self._wait(waiting, selectors.EVENT_READ)
            return
        try:
            n = waiting.sock.recv_into(self._scratch)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except OSError:
            n = 0
        if n:
            drained = waiting.buf
            assert isinstance(drained, int)
            waiting.buf = drained + n
            if drained + n < _DRAIN_LIMIT:
                return  # the request, still arriving: wait for the client's hang-up
        self._discard(waiting)
