"""One client connection and the thread that serves it: upgrade, then read → dispatch → write.

This module is the only code that touches a connection's socket, its locks, its queue of
frames and its close state; everyone else (fan-out, the server, the backplane) uses the
public methods of :class:`ServerConnection`. Protocol decisions are made by the sans-I/O
:mod:`wsroute_sync.handshake` and :mod:`wsroute_sync.protocol`.

Writes. Any thread may write to a connection at any moment (the connection's own thread
with its replies, a handler's ``ctx.send``, a broadcast, ``close()``), so:

* frames are encoded under ``_lock`` and go, in that order, either straight to the socket
  (by the thread holding ``_writer`` when nothing is queued) or into ``_out``, a queue
  that whoever holds ``_writer`` drains. ``_lock`` is never held across a system call
  that can wait; ``_writer`` is held for the whole of one write.
* every write is non-blocking (``MSG_DONTWAIT`` on plain sockets; TLS sockets are
  non-blocking) and waits in ``poll`` for the time its caller allows, so a write is
  bounded the same way on plain and TLS sockets, and no send flag ever reaches an
  ``SSLSocket``. Reads of a plain socket block in ``recv`` under the kernel's
  ``SO_RCVTIMEO`` (one system call per message); TLS reads wait in ``poll`` too, and a
  lock keeps OpenSSL from being entered by two threads at once.
* once our Close is queued (or the client's Close is read, or a write failed), no data
  frame is encoded any more (RFC 6455 5.5.1), and ``closed`` is set.
"""

from __future__ import annotations

import collections
import enum
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Deque, Dict, FrozenSet, Optional, Protocol, Tuple, Union

from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError

from .errors import ConnectionClosed
from .http import HTTPRequest, http_response
from .listen import timeval
from .metrics import ConnectionMetrics
from .limits import TokenBucket
from .routing import as_message, error_envelope
from .options import ServerOptions
from .upgrade import answer_and_close, negotiate
from .protocol import (
    CLOSE_INTERNAL_ERROR,
    is_upgrade_request,
    CloseReceived,
    Message,
    MessageStream,
    PingReceived,
    PongReceived,
    PreparedMessage,
    ProtocolFailure,
)

__all__ = [
    "ConnectionOwner",
    "Progress",
    "ServerConnection",
    "UNKNOWN_TIMEOUT",
]

# CPython allocates the whole buffer of a recv() before it blocks, so an idle connection
# holds its read size in memory for as long as it waits. Reads start small (a JSON
# request fits in a few hundred bytes) and grow while they come back full, so that a
# large message still arrives in few system calls; the next short read shrinks them.
# Small reads go into one buffer kept for the connection's life (recv_into): the same
# memory an idle recv() would hold, without a malloc and a realloc for every message.
_RECV_SMALL = 2048
_RECV_LARGE = 262144

_TIMEOUT_ERRORS = (BlockingIOError, socket.timeout)
#: The ``inherited_read_timeout`` of a socket whose SO_RCVTIMEO is not known.
UNKNOWN_TIMEOUT = -1.0
_POLLIN = select.POLLIN
_MSG_DONTWAIT = socket.MSG_DONTWAIT
_POLLOUT = select.POLLOUT


class ConnectionOwner(Protocol):
    """What a connection needs from the server that owns it (the server implements it)."""

    options: ServerOptions

    @property
    def logger(self) -> Any: ...

    def handle_message(self, connection: "ServerConnection", message: Message
                       ) -> Optional[Message]:
        """The reply to one message (routing, or the raw ``message_handler``)."""

    def http_answer(self, request: HTTPRequest) -> bytes:
        """The whole HTTP response to a request that asks for no upgrade."""

    def expect_close(self, connection: "ServerConnection") -> None:
        """Drop ``connection`` if its closing handshake is not over within close_timeout
        (its thread may be blocked in a read that a Close from elsewhere cannot shorten)."""

    def connection_done(self, connection: "ServerConnection") -> None:
        """The connection has ended: socket closed; free its slot."""


class Progress(enum.Enum):
    """How far a non-blocking send (:meth:`ServerConnection.try_send`) has got."""

    #: The whole frame is written to the socket.
    DONE = "done"
    #: Part of it waits for the socket to take more: wait until :meth:`fileno` is
    #: writable, then call :meth:`ServerConnection.progress` again.
    WAIT_WRITABLE = "wait_writable"
    #: Another thread is writing to this client and will write this frame after its own;
    #: call :meth:`ServerConnection.progress` again a little later.
    WAIT_WRITER = "wait_writer"
    #: Not sent: the connection is closing or closed, or the write failed.
    CLOSED = "closed"


class _WriteFailed(Exception):
    """A write that cannot complete: the connection is dropped (see ``_drop``)."""


class ServerConnection:
    """A client connection: its request, its state, and thread-safe ``send``/``close``.

    Created by the server for each admitted request and run by its own thread. Handlers
    reach it as ``ctx.connection``; ``server.connections`` lists the live ones.
    """

    #: The rooms joined with :meth:`join`. Replaced, never mutated, so that a broadcast
    #: reads it without a lock; the class attribute costs idle connections nothing.
    rooms: FrozenSet[str] = frozenset()
    _rooms_lock = threading.Lock()

    def __init__(
        self,
        owner: ConnectionOwner,
        sock: socket.socket,
        remote_address: Any,
        connection_id: str,
        request: HTTPRequest,
        *,
        rest: bytes = b"",
        inherited_read_timeout: Optional[float] = UNKNOWN_TIMEOUT,
    ) -> None:
        #: The server (or other owner) this connection belongs to.
        self.server = owner
        self.id = connection_id
        self.remote_address = remote_address
        #: The request that opened the connection (path, query, headers).
        self.request = request
        #: What the ``authenticate`` hook returned, if there is one.
        self.identity: Any = None
        self.subprotocol: Optional[str] = None
        #: Handlers' own per-connection state.
        self.values: Dict[str, Any] = {}
        #: ``(code, reason)`` of the close, once known.
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.opened_at = time.time()
        #: Counters of this connection (see metrics.py for who writes which).
        self.metrics = ConnectionMetrics()
        #: The thread serving this connection, once it has started.
        self.thread: Optional[threading.Thread] = None
        # Held until run() has finished everything (threads are pooled, so the thread's
        # end cannot tell): wait_finished() waits on it.
        self._running = threading.Lock()
        self._running.acquire()
        self._sock = sock
        self._rest = rest
        self._tls = isinstance(sock, ssl.SSLSocket)
        # OpenSSL objects must not be entered by two threads at once; held only around
        # one non-blocking SSL call, never while waiting.
        self._tls_lock = threading.Lock() if self._tls else None
        self._stream: Optional[MessageStream] = None
        # _lock: the stream's protocol state, _out, _queued and the close state. Short
        # sections only. _writer: held by the one thread writing to the socket.
        self._lock = threading.Lock()
        self._writer = threading.Lock()
        self._out: Deque[bytes] = collections.deque()
        self._out_offset = 0  # bytes of _out[0] already written
        # Bytes of frames encoded so far, and bytes written: a frame is out once
        # _written reaches the _queued value it was given (its "ticket").
        self._queued = 0
        self._written = 0
        self._closing = False  # no more data frames: Close queued or read, or dropped
        self._broken = False  # aborted: nothing more can be written
        self._finished = False  # socket closed
        self._closed_event: Optional[threading.Event] = None
        self._logger = owner.logger
        options = owner.options
        self._write_timeout = options.write_timeout
        # The SO_RCVTIMEO in force on a plain socket, so that it is only set when it
        # changes; TLS reads keep theirs here and wait in poll.
        self._read_timeout: Optional[float] = inherited_read_timeout

    # Public API, for handlers and other threads.

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def query(self) -> str:
        return self.request.query

    @property
    def open(self) -> bool:
        """True while messages can be sent to the client."""
        stream = self._stream
        return not self._closing and stream is not None and stream.writable

    @property
    def closed(self) -> threading.Event:
        """An event set as soon as this connection starts closing, from either side or
        from ``server.close()``, or fails."""
        event = self._closed_event
        if event is None:
            # Made on first use: most connections never need one, and an Event is a
            # Condition and two locks, a few hundred bytes for each idle connection.
            with self._lock:
                event = self._closed_event
                if event is None:
                    event = self._closed_event = threading.Event()
                    if self._closing:
                        event.set()
        return event

    def send(self, message: Any) -> None:
        """Send a message to this client, from any thread; returns once it is written.

        ``str`` goes as a text frame, bytes-like as a binary frame, anything else as
        JSON text. Raises :class:`~wsroute_sync.ConnectionClosed` once the connection is
        closing or the write failed (a client that takes nothing for ``write_timeout``
        is dropped), ``TypeError`` or ``ValueError`` for a value JSON cannot encode and
        ``UnicodeEncodeError`` for text that has no UTF-8 form (lone surrogates).
        """
        if not self._send_data(as_message(message), None):
            raise ConnectionClosed(self.close_code, self.close_reason)

    def try_send(self, message: PreparedMessage) -> Tuple[Progress, int]:
        """Start sending without waiting, for fan-out: ``(progress, ticket)``.

        The frame is queued behind what this connection is already writing and written
        as far as the socket takes it now. Unless ``progress`` is ``DONE`` or ``CLOSED``,
        drive it with :meth:`progress` (``ticket`` names the frame).
        """
        with self._lock:
            stream = self._stream
            if self._closing or stream is None or not stream.writable:
                return Progress.CLOSED, 0
            frame = message.frame_for(stream)
            self.metrics.messages_out += 1
            self._out.append(frame)
            self._queued += len(frame)
            ticket = self._queued
        return self.progress(ticket), ticket

    def progress(self, ticket: int) -> Progress:
        """Write more of the queued frames without waiting; how far ``ticket`` has got."""
        if self._written >= ticket:
            return Progress.DONE
        if self._broken:
            return Progress.CLOSED
        if not self._writer.acquire(False):
            return Progress.WAIT_WRITER
        try:
            if self._finished:
                return Progress.CLOSED
            try:
                self._flush(None, blocking=False)
            except _WriteFailed as exc:
                self.drop(str(exc))
        finally:
            self._release_writer()
        if self._written >= ticket:
            return Progress.DONE
        return Progress.CLOSED if self._broken else Progress.WAIT_WRITABLE

    def fileno(self) -> int:
        """The socket's file descriptor, to wait until it is writable (-1 once closed)."""
        return -1 if self._finished else self._sock.fileno()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (from any thread); the client's answer ends it.

        Returns once our Close frame is written (at most ``write_timeout``); a client
        that does not answer within ``close_timeout`` is disconnected.
        """
        ticket = self._queue_close(code, reason)
        if ticket is None:
            if self._stream is None:
                self.abort()  # not upgraded yet: there is no WebSocket to close
            return
        timeout = self._write_timeout
        self._deliver(ticket, None if timeout is None else time.monotonic() + timeout)
        if self.thread is not threading.current_thread():
            self.server.expect_close(self)

    def close_nowait(self, code: int, reason: str) -> Tuple[Progress, int]:
        """Queue our Close frame and write what the socket takes now, for shutdown.

        Returns like :meth:`try_send`; ``CLOSED`` when there was nothing to close.
        """
        ticket = self._queue_close(code, reason)
        if ticket is None:
            if self._stream is None:
                self.abort()
            return Progress.CLOSED, 0
        if self.thread is not threading.current_thread():
            self.server.expect_close(self)
        return self.progress(ticket), ticket

    def abort(self) -> None:
        """Drop the TCP connection now; wakes this connection's thread and its writers."""
        self._broken = True
        self._mark_closing()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def join(self, room: str) -> None:
        """Join ``room``: ``server.broadcast(message, room=room)`` reaches this client (on
        every instance, with a backplane). Membership ends with the connection."""
        if not isinstance(room, str):
            raise TypeError(f"room must be a str, not {type(room).__name__}")
        with self._rooms_lock:
            self.rooms = self.rooms | {room}

    def leave(self, room: str) -> None:
        """Leave ``room``; leaving a room not joined does nothing."""
        with self._rooms_lock:
            self.rooms = self.rooms - {room}

    @property
    def finished(self) -> bool:
        """True once the connection's thread is done with it (socket closed, slot freed)."""
        return not self._running.locked()

    def wait_finished(self, timeout: Optional[float] = None) -> bool:
        """Wait until :attr:`finished`; ``False`` if ``timeout`` ran out first."""
        if self._running.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._running.release()
            return True
        return False

    def __repr__(self) -> str:
        return f"<ServerConnection {self.id} {self.remote_address!r}>"

    # Close state.

    def _mark_closing(self) -> None:
        with self._lock:
            self._closing = True
            event = self._closed_event
        if event is not None:
            event.set()

    def _queue_close(self, code: int, reason: str) -> Optional[int]:
        """Queue our Close (or our answer to the client's); its ticket, or ``None``."""
        with self._lock:
            stream = self._stream
            if stream is None or self._finished:
                return None
            frame = stream.close(code, reason)
            self._closing = True
            event = self._closed_event
            ticket: Optional[int] = None
            if frame:
                self._out.append(frame)
                self._queued += len(frame)
                ticket = self._queued
                if self.close_code is None:
                    self.close_code, self.close_reason = code, reason
        if event is not None:
            event.set()
        return ticket

    def drop(self, why: str) -> None:
        """Drop a client that cannot take our data (a write failed or timed out), now,
        with a TCP reset so that the kernel frees what is queued for it; ``why`` is
        logged and becomes the close reason (1006)."""
        if self._broken:
            return  # already dropped or aborted
        self._logger.info("connection %s: %s; dropping it", self.id, why)
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, why
        try:
            # It will not read what is queued for it either: close with RST, so the
            # kernel frees that memory now.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.abort()

    # Writing. Every method below that writes is called with _writer held.

    def _wait(self, events: int, timeout: Optional[float]) -> bool:
        """Wait until the socket is ready for ``events``; ``False`` on timeout."""
        poller = select.poll()
        poller.register(self._sock, events)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)))

    def _send_once(self, data: Union[bytes, memoryview]) -> Tuple[int, int]:
        """One non-blocking send: the bytes the socket took, and the poll event to wait
        for when it took none."""
        tls_lock = self._tls_lock
        try:
            if tls_lock is None:
                n = self._sock.send(data, _MSG_DONTWAIT)
            else:
                with tls_lock:
                    n = self._sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError):
            return 0, _POLLOUT
        except ssl.SSLWantReadError:
            return 0, _POLLIN  # TLS wants to read before it can write
        except OSError as exc:
            raise _WriteFailed(f"write failed: {exc}") from None
        self._written += n
        return n, _POLLOUT

    def _write(self, data: Union[bytes, memoryview], deadline: Optional[float]) -> None:
        """Write all of ``data``; each wait is bounded by write_timeout and ``deadline``."""
        while True:
            n, events = self._send_once(data)
            if n:
                if n == len(data):
                    return
                data = memoryview(data)[n:]
                continue
            wait = self._write_timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                wait = left if wait is None else min(wait, left)
            if (wait is not None and wait <= 0) or not self._wait(events, wait):
                raise _WriteFailed("write timed out - client not reading")

    def _flush(self, deadline: Optional[float], *, blocking: bool) -> None:
        """Write the queued frames, in order (all of them, unless non-blocking)."""
        out = self._out
        while True:
            with self._lock:
                if not out:
                    return
                if self._broken:
                    raise _WriteFailed("connection dropped")
                frame = out[0]
                offset = self._out_offset
            view = memoryview(frame)[offset:]
            if blocking:
                self._write(view, deadline)
                n = len(view)
            else:
                n = self._send_once(view)[0]
            with self._lock:
                if n == len(view):
                    out.popleft()
                    self._out_offset = 0
                else:
                    self._out_offset = offset + n
            if n < len(view):
                return

    def _release_writer(self) -> None:
        """Release ``_writer``; first write what was queued by threads that found it taken."""
        writer = self._writer
        while True:
            writer.release()
            if not self._out or self._broken or not writer.acquire(False):
                return
            try:
                self._flush(None, blocking=False)
            except _WriteFailed as exc:
                self.drop(str(exc))

    def _acquire_writer(self, deadline: Optional[float]) -> bool:
        timeout = self._write_timeout
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            timeout = left if timeout is None else min(timeout, left)
        if self._writer.acquire(timeout=-1 if timeout is None else timeout):
            return True
        # Another thread has been writing to this client all that time: it takes nothing.
        self.drop("write timed out behind another writer - client not reading")
        return False

    def _send_data(self, data: Message, deadline: Optional[float]) -> bool:
        """Encode and write one data message (blocking, bounded); ``False`` if not sent."""
        if not self._acquire_writer(deadline):
            return False
        try:
            with self._lock:
                stream = self._stream
                if self._closing or self._finished or stream is None or not stream.writable:
                    return False
                frame = stream.send(data)
                self.metrics.messages_out += 1
                self._queued += len(frame)
                queued = bool(self._out)
                if queued:
                    self._out.append(frame)
            if queued:
                self._flush(deadline, blocking=True)
            else:
                self._write(frame, deadline)  # the usual case: nothing ahead of it
            return True
        except _WriteFailed as exc:
            self.drop(str(exc))
            return False
        finally:
            self._release_writer()

    def _reply(self, data: Message) -> None:
        """The connection thread's reply: :meth:`_send_data`, with the usual case (no
        other writer, nothing queued, the socket takes it all) in as few steps as
        possible, because it runs for every message."""
        writer = self._writer
        if not writer.acquire(False):
            self._send_data(data, None)  # another thread is writing: wait in turn
            return
        lock = self._lock
        lock.acquire()
        stream = self._stream
        if (self._closing or self._out or stream is None or not stream.writable
                or self._tls_lock is not None):
            lock.release()
            writer.release()
            self._send_data(data, None)
            return
        frame = stream.send(data)
        self.metrics.messages_out += 1
        self._queued += len(frame)
        lock.release()
        try:
            n = self._sock.send(frame, _MSG_DONTWAIT)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.drop(f"write failed: {exc}")
            writer.release()
            return
        self._written += n
        try:
            if n < len(frame):
                self._write(memoryview(frame)[n:], None)
        except _WriteFailed as exc:
            self.drop(str(exc))
        finally:
            if self._out:
                self._release_writer()
            else:
                writer.release()

    def _send_control(self, ping: bool, payload: bytes = b"") -> bool:
        """Write a Ping (``ping``) or a Pong; ``False`` if the connection failed."""
        if not self._acquire_writer(None):
            return False
        try:
            with self._lock:
                stream = self._stream
                if self._broken or stream is None:
                    return False
                try:
                    frame = stream.ping(payload) if ping else stream.pong(payload)
                except LocalProtocolError:
                    return True  # closing: no more pings or pongs, nothing is wrong
                self._queued += len(frame)
                self._out.append(frame)
            self._flush(None, blocking=True)
            return True
        except _WriteFailed as exc:
            self.drop(str(exc))
            return False
        finally:
            self._release_writer()

    def _deliver(self, ticket: int, deadline: Optional[float]) -> bool:
        """Write until the frame ``ticket`` names is out (blocking, bounded)."""
        while self._written < ticket:
            if self._broken or not self._acquire_writer(deadline):
                return False
            try:
                if self._broken:
                    return False
                self._flush(deadline, blocking=True)
            except _WriteFailed as exc:
                self.drop(str(exc))
                return False
            finally:
                self._release_writer()
        return True

    # Reading.

    def _set_read_timeout(self, seconds: Optional[float]) -> None:
        if seconds != self._read_timeout:
            if not self._tls:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(seconds))
            self._read_timeout = seconds

    def _recv_tls(self, size: int) -> bytes:
        """One read of a non-blocking TLS socket, waiting up to the read timeout."""
        sock = self._sock
        tls_lock = self._tls_lock
        assert tls_lock is not None
        timeout = self._read_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with tls_lock:
                try:
                    return sock.recv(size)
                except ssl.SSLWantReadError:
                    events = _POLLIN
                except ssl.SSLWantWriteError:
                    events = _POLLOUT
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not self._wait(events, left):
                raise socket.timeout("read timed out")

    # The connection thread.

    def run(self) -> None:
        """Serve the connection until it closes; always tells the owner it is done."""
        self.thread = threading.current_thread()
        try:
            if self._upgrade():
                self._serve()
        except Exception:
            self._logger.error("connection %s: unexpected error", self.id, exc_info=True)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._out and not self._broken:
            # Frames another thread queued and has not written yet, our Close among them
            # (its Close and the client's can cross): they go out before TCP closes.
            timeout = self._write_timeout
            self._deliver(self._queued, None if timeout is None else time.monotonic() + timeout)
        # Wake any thread still writing (its write fails at once), then wait for it to
        # leave: the socket must not be closed under a writer, whose file descriptor
        # number could by then belong to another client.
        self.abort()
        with self._writer:
            with self._lock:
                self._finished = True
                self._out.clear()
            try:
                self._sock.close()
            finally:
                try:
                    self.server.connection_done(self)
                finally:
                    self._running.release()

    def _upgrade(self) -> bool:
        """Answer the request: a plain HTTP answer, a refusal, or the 101; ``True`` once
        upgraded."""
        owner = self.server
        options = owner.options
        sock = self._sock
        request = self.request
        if self._tls:
            sock.setblocking(False)
        else:
            sock.setblocking(True)  # blocking reads under SO_RCVTIMEO; writes never block
            if self._read_timeout == UNKNOWN_TIMEOUT:
                # Not inherited from a prepared listener: set here.
                if sock.family != socket.AF_UNIX:
                    # Replies are small and the client waits for each one: do not let
                    # Nagle's algorithm hold them back for the ACK of the previous one.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not is_upgrade_request(request):
            answer_and_close(sock, owner.http_answer(request), close=False)
            return False
        upgrade = negotiate(request, options, self._logger, self.id)
        if isinstance(upgrade, bytes):
            answer_and_close(sock, upgrade, close=False)
            return False
        response, stream, self.subprotocol, self.identity = upgrade
        # Open for sending before the client can see the 101 (a broadcast made after the
        # client connected must reach it), but with the writer held, so that a frame
        # queued meanwhile goes out after the 101.
        self._writer.acquire()
        try:
            with self._lock:
                self._stream = stream
                self._queued += len(response)
            self._write(response, None)
        except _WriteFailed as exc:
            self._logger.debug("connection %s: lost during handshake: %s", self.id, exc)
            self.abort()
            return False
        finally:
            self._release_writer()
        self._logger.debug("connection %s: open from %s, path %s", self.id,
                           self.remote_address, request.path)
        return True

    def _serve(self) -> None:
        """The message loop: read, hand whole messages to the owner's handler, reply."""
        owner = self.server
        options = owner.options
        sock = self._sock
        stream = self._stream
        assert stream is not None
        logger = self._logger
        lock = self._lock
        ping_interval = options.ping_interval
        self._set_read_timeout(ping_interval)
        handle = owner.handle_message
        send = self._send_data
        reply_now = self._reply
        lock_acquire = lock.acquire
        lock_release = lock.release
        metrics = self.metrics
        rate = options.message_rate
        bucket = None if rate is None else TokenBucket(
            rate, options.message_burst or max(1, int(rate)))
        clock = time.monotonic
        tls = self._tls
        recv = self._recv_tls if tls else sock.recv
        recv_into = sock.recv_into
        small = bytearray(_RECV_SMALL)
        small_view = memoryview(small)
        awaiting_pong = False
        closing = False  # we sent Close and wait for the client's (close_timeout applies)
        data: Optional[bytes] = self._rest
        self._rest = b""
        size = _RECV_SMALL
        while True:
            if data is None and stream.deferred:
                data = b""  # the rest of the last read, held back behind earlier replies
            if data is None:
                try:
                    if size == _RECV_SMALL and not tls:
                        data = small_view[:recv_into(small)].tobytes()
                    else:
                        data = recv(size)
                except _TIMEOUT_ERRORS:
                    if closing or stream.state is ConnectionState.LOCAL_CLOSING:
                        logger.info("connection %s: no Close answer in time, dropping", self.id)
                        return
                    if ping_interval is None:
                        continue
                    if awaiting_pong:
                        # RFC 6455 7.1.7 allows failing a connection that stopped
                        # responding; 1011 says the server gave up on it.
                        logger.info("connection %s: no pong within ping_timeout", self.id)
                        self.close_code, self.close_reason = 1011, "keepalive ping timeout"
                        self.close_nowait(CLOSE_INTERNAL_ERROR, "keepalive ping timeout")
                        return
                    if not self._send_control(True):
                        return
                    awaiting_pong = True
                    self._set_read_timeout(options.ping_timeout)
                    continue
                except OSError as exc:
                    logger.debug("connection %s: read failed: %s", self.id, exc)
                    if self.close_code is None:
                        self.close_code, self.close_reason = 1006, str(exc)
                    return
                if len(data) == size:
                    size = min(size * 4, _RECV_LARGE)
                elif size != _RECV_SMALL:
                    size = _RECV_SMALL
                if not data:
                    with lock:
                        stream.receive(None)
                    if self.close_code is None:
                        self.close_code = 1006
                    return
            lock_acquire()
            try:
                items = stream.receive(data)
            finally:
                lock_release()
            for item in items:
                kind = type(item)
                if kind is str or kind is bytes:
                    if self._closing:
                        continue  # closing: requests read behind the Close are not run
                    metrics.messages_in += 1
                    if bucket is not None and not bucket.take(clock()):
                        # Over the rate: not handled; the client learns why and may go on.
                        metrics.error("rate_limited")
                        envelope = error_envelope("rate limit exceeded")
                        send(envelope if kind is str else envelope.encode(), None)
                        continue
                    reply = handle(self, item)  # type: ignore[arg-type]
                    if reply is not None:
                        reply_now(reply)
                elif kind is PingReceived:
                    self._send_control(False, item.payload)  # type: ignore[union-attr]
                elif kind is PongReceived:
                    if awaiting_pong:
                        awaiting_pong = False
                        if not closing:
                            # During the closing handshake close_timeout stays in force.
                            self._set_read_timeout(ping_interval)
                elif kind is CloseReceived:
                    assert isinstance(item, CloseReceived)
                    # The code and reason first: whoever wakes on ``closed`` reads them.
                    if self.close_code is None or not item.closed:
                        self.close_code, self.close_reason = item.code, item.reason
                    self._mark_closing()
                    if not item.closed:
                        # Echo the code (RFC 6455 5.5.1); 1005 "no status" becomes an
                        # empty Close, which wsproto writes for it.
                        ticket = self._queue_close(item.code, "")
                        if ticket is not None:
                            timeout = self._write_timeout
                            self._deliver(ticket, None if timeout is None
                                          else time.monotonic() + timeout)
                    # RFC 6455 7.1.1: the server closes TCP first, so return now.
                    return
                elif kind is ProtocolFailure:
                    assert isinstance(item, ProtocolFailure)
                    logger.info("connection %s: failing with %d: %s", self.id, item.code,
                                item.reason)
                    self.close_code, self.close_reason = item.code, item.reason
                    ticket = self._queue_close(item.code, item.reason)
                    if ticket is not None:
                        timeout = self._write_timeout
                        self._deliver(ticket, None if timeout is None
                                      else time.monotonic() + timeout)
                    return
            data = None
            if not closing and self._closing:
                # Still here while closing: our Close went out (a handler, another
                # thread, or server.close()). From now on the wait for the client's
                # Close is bounded by close_timeout.
                closing = True
                self._set_read_timeout(options.close_timeout)
