"""The sending half of a client connection: frames from any thread, written in order,
each write bounded; and the close state that ends them.

:class:`~wsroute_sync.connection.ServerConnection` extends :class:`Sender` with its own
thread, which reads the same socket (taking ``_lock`` around the stream's ``receive``;
a TLS socket is a :class:`~wsroute_sync.sharedtls.SharedTLSSocket`, which takes its own
lock around each OpenSSL call). These two modules are the only code that touches a
connection's socket, its locks, its queue of frames and its close state; everyone else
(fan-out, the server, the backplane) uses the public methods.

Any thread may write to a connection at any moment (its own thread's replies, a
handler's ``ctx.send``, a broadcast, keepalive Pings, ``close()``), so:

* frames are encoded under ``_lock`` and go, in that order, straight to the socket (by
  the thread holding ``_writer`` when nothing is queued) or into ``_out``. Whoever holds
  ``_writer`` writes ``_out`` as far as the socket takes it; the thread that queued a
  frame drives it to the end (a blocking wait, or :meth:`Sender.progress`). ``_lock`` is
  never held across a system call that can wait; ``_writer`` is, for one write.
* every write is non-blocking (``MSG_DONTWAIT`` on plain sockets, never on TLS ones,
  which are non-blocking) and waits in ``poll`` for the time its caller allows.
* once our Close is queued (or the client's Close is read, or a write failed), no data
  frame is encoded any more (RFC 6455 5.5.1), and ``closed`` is set.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, Deque, Optional, Tuple, Union

from .errors import ConnectionClosed
from .metrics import ConnectionMetrics
from .frames import Message, data_frame
from .routing import as_message
from .sharedtls import SharedTLSSocket, wait_ready
from .stream import MessageStream, PreparedMessage

__all__ = ["Sender", "Progress"]

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_MSG_DONTWAIT = socket.MSG_DONTWAIT


class Progress(enum.Enum):
    """How far a non-blocking send (:meth:`Sender.try_send`) has got."""

    #: The whole frame is written to the socket.
    DONE = "done"
    #: Part of it waits for the socket to take more: wait until :meth:`Sender.fileno`
    #: is writable, then call :meth:`Sender.progress` again.
    WAIT_WRITABLE = "wait_writable"
    #: Another thread is writing to this client and will write this frame after its own;
    #: call :meth:`Sender.progress` again a little later.
    WAIT_WRITER = "wait_writer"
    #: Not sent: the connection is closing or closed, or the write failed.
    CLOSED = "closed"


class _WriteFailed(Exception):
    """A write that cannot complete: the connection is dropped (see ``drop``)."""


class Sender:
    """Thread-safe writes to one client's socket, and its close state.

    Nothing can be sent until :meth:`_start` has written the 101 that opens the stream.
    """

    # Slots: with its subclass's, more attributes than an instance keeps without a dict
    # of its own (~1.5 KiB a connection). "__dict__", made when first used, takes others.
    __slots__ = ("id", "close_code", "close_reason", "metrics", "_sock", "_tls_sock", "_tls",
                 "_stream", "_lock", "_writer", "_out", "_out_offset", "_queued", "_written",
                 "_closing", "_broken", "_finished", "_closed_event", "_logger",
                 "_write_timeout", "__dict__", "__weakref__")

    def __init__(self, sock: socket.socket, connection_id: str, *, logger: Any,
                 write_timeout: Optional[float]) -> None:
        self.id = connection_id
        #: ``(code, reason)`` of the close, once known.
        self.close_code: Optional[int] = None
        self.close_reason = ""
        #: Counters of this connection (see metrics.py for who writes which).
        self.metrics = ConnectionMetrics()
        self._sock = sock
        # OpenSSL objects must not be entered by two threads at once: TLS reads and
        # writes go through the shared socket's lock, held only around one call.
        self._tls_sock = SharedTLSSocket(sock) if isinstance(sock, ssl.SSLSocket) else None
        self._tls = self._tls_sock is not None
        self._stream: Optional[MessageStream] = None
        # _lock: the stream's protocol state, _out, _queued and the close state. Short
        # sections only. _writer: held by the one thread writing to the socket.
        self._lock = threading.Lock()
        self._writer = threading.Lock()
        self._out: Optional[Deque[bytes]] = None  # frames waiting for _writer: _queue
        self._out_offset = 0  # bytes of _out[0] already written
        # Bytes of frames encoded so far, and bytes written: a frame is out once
        # _written reaches the _queued value it was given (its "ticket").
        self._queued = 0
        self._written = 0
        self._closing = False  # no more data frames: Close queued or read, or dropped
        self._broken = False  # aborted: nothing more can be written
        self._finished = False  # socket closed
        self._closed_event: Optional[threading.Event] = None
        self._logger = logger
        self._write_timeout = write_timeout

    # Public API, for handlers and other threads.

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
        writer = self._writer
        # Usually nobody else writes to this client: the frame goes straight to the socket.
        direct = writer.acquire(False)
        with self._lock:
            stream = self._stream
            if self._closing or stream is None or not stream.writable:
                if direct:
                    writer.release()
                return Progress.CLOSED, 0
            frame = message.frame_for(stream)
            self.metrics.messages_out += 1
            self._queued += len(frame)
            ticket = self._queued
            if direct and self._out:
                direct = False
                writer.release()
            if not direct:
                self._queue().append(frame)
        if not direct:
            return self.progress(ticket), ticket
        try:
            n = self._send_once(frame)[0]
        except _WriteFailed as exc:
            self.drop(str(exc))
            n = len(frame)
        if n < len(frame):
            with self._lock:  # the rest goes before frames queued meanwhile (encoded later)
                self._queue().appendleft(frame)
                self._out_offset = n
        self._release_writer()
        if self._written >= ticket:
            return Progress.DONE, ticket
        return (Progress.CLOSED if self._broken else Progress.WAIT_WRITABLE), ticket

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

    def abort(self) -> None:
        """Drop the TCP connection now; wakes this connection's thread and its writers."""
        self._broken = True
        self._mark_closing()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def drop(self, why: str) -> None:
        """Drop a client that cannot take our data (a write failed or timed out), now,
        with a TCP reset so that the kernel frees what is queued for it; ``why`` is
        logged and becomes the close reason (1006)."""
        if self._broken:
            return  # already dropped or aborted
        self._logger.info("connection %s: %s; dropping it", self.id, why)
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, why
        with contextlib.suppress(OSError):  # linger 0: close() sends RST
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    # Opening and closing.

    def _start(self, stream: MessageStream, response: bytes) -> bool:
        """Write the 101 that opens ``stream``; ``False`` if the client is gone."""
        # Open for sending before the client sees the 101 (a broadcast made after it
        # connected must reach it), with the writer held: frames queued wait for the 101.
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
        return True

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
                ticket = self._enqueue(frame)
                if self.close_code is None:
                    self.close_code, self.close_reason = code, reason
        if event is not None:
            event.set()
        return ticket

    def _close_socket(self) -> None:
        """The end: write what other threads queued, then close the socket."""
        if self._out and not self._broken:
            # Frames another thread queued and has not written yet, our Close among them
            # (its Close and the client's can cross): they go out before TCP closes.
            timeout = self._write_timeout
            self._deliver(self._queued, None if timeout is None else time.monotonic() + timeout)
        writer = self._writer
        if writer.acquire(False):
            # Nobody is writing, and a writer that comes later finds the stream closed:
            # no other thread waits on this socket, so it needs no shutdown() to wake one.
            self._broken = True
            if not self._closing:
                self._mark_closing()
        else:
            # Wake the thread still writing (its write fails at once), then wait for it: a
            # socket closed under a writer could see its fd number reused by another client.
            self.abort()
            writer.acquire()
        try:
            with self._lock:
                self._finished = True
                self._out = None
            self._sock.close()
        finally:
            writer.release()

    def _queue(self) -> Deque[bytes]:
        """``_out``, made on first use (an empty deque is ~760 bytes); ``_lock`` held."""
        if self._out is None:
            self._out = collections.deque()
        return self._out

    def _enqueue(self, frame: bytes) -> int:
        """Queue ``frame`` behind everything else; its ticket. ``_lock`` held."""
        self._queued += len(frame)
        self._queue().append(frame)
        return self._queued

    # Writing. Every method below that writes is called with _writer held.

    def _send_once(self, data: Union[bytes, memoryview]) -> Tuple[int, int]:
        """One non-blocking send: the bytes taken, and the poll event to wait for if none."""
        tls_sock = self._tls_sock
        try:
            if tls_sock is None:
                n = self._sock.send(data, _MSG_DONTWAIT)
            else:
                n = tls_sock.send_nowait(data)
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
            if (wait is not None and wait <= 0) or not wait_ready(self._sock, events, wait):
                raise _WriteFailed("write timed out - client not reading")

    def _flush(self, deadline: Optional[float], *, blocking: bool) -> None:
        """Write the queued frames, in order (all of them, unless non-blocking)."""
        while True:
            with self._lock:
                out = self._out
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
        """Release ``_writer``, first writing what others queued as far as the socket takes."""
        writer = self._writer
        while True:
            writer.release()
            if not self._out or self._broken or not writer.acquire(False):
                return
            written = self._written
            try:
                self._flush(None, blocking=False)
            except _WriteFailed as exc:
                self.drop(str(exc))
            if self._written == written:  # nothing taken: retrying now would only spin
                writer.release()
                return

    def _acquire_writer(self, deadline: Optional[float]) -> bool:
        if self._writer.acquire(False):
            return True  # the usual case: nobody else is writing to this client
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
                    self._queue().append(frame)
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
        """The connection thread's reply (:meth:`_send_data`), the usual case (no other
        writer, nothing queued) in few steps: it runs for every message."""
        writer = self._writer
        if not writer.acquire(False):
            self._send_data(data, None)  # another thread is writing: wait in turn
            return
        lock = self._lock
        lock.acquire()
        stream = self._stream
        if self._closing or self._out or stream is None or not stream.writable:
            lock.release()
            writer.release()
            self._send_data(data, None)
            return
        # With no extension, the frame is what stream.send() builds once it has made
        # the check just made above under the same lock (as PreparedMessage.frame_for).
        frame = data_frame(data) if stream.plain else stream.send(data)
        self.metrics.messages_out += 1
        self._queued += len(frame)
        lock.release()
        try:
            if self._tls_sock is None:  # _send_once inline: a call and a tuple less per reply
                try:
                    n = self._sock.send(frame, _MSG_DONTWAIT)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    raise _WriteFailed(f"write failed: {exc}") from None
                self._written += n
            else:
                n = self._send_once(frame)[0]
            if n < len(frame):
                self._write(memoryview(frame)[n:], None)
        except _WriteFailed as exc:
            self.drop(str(exc))
        finally:
            self._release_writer() if self._out else writer.release()

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
