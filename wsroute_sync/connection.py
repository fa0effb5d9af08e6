"""One client connection, served by one thread: handshake, then read → dispatch → write.

All socket and timing work of a connection lives here; protocol decisions are made by
the sans-I/O :mod:`wsroute_sync.protocol`. There is no keepalive or reader thread per
connection: the read timeouts that drive keepalive and the closing handshake are kernel
socket options (``SO_RCVTIMEO``/``SO_SNDTIMEO``) on a blocking socket, so a message costs
one ``recv`` and one ``send`` system call, and an idle connection costs no wake-ups.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Optional, Union

from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError

from .errors import ConnectionClosed, HandshakeRejected
from .metrics import ConnectionMetrics
from .http import (
    BadRequest,
    HTTPRequest,
    check_request_start,
    find_head_end,
    http_response,
    parse_request_head,
)
from .protocol import (
    CLOSE_INTERNAL_ERROR,
    CloseReceived,
    MessageStream,
    PingReceived,
    PongReceived,
    ProtocolFailure,
    accept_upgrade,
    check_upgrade,
    is_upgrade_request,
    rejection_response,
)
from .routing import encode_result

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server

__all__ = ["ServerConnection", "UNKNOWN_TIMEOUT", "prepare_listener"]

# CPython allocates the whole buffer of a recv() before it blocks, so an idle connection
# holds its read size in memory for as long as it waits. Reads start small (a JSON
# request fits in a few hundred bytes) and grow while they come back full, so that a
# large message still arrives in few system calls; the next short read shrinks them.
# Small reads go into one buffer kept for the connection's life (recv_into): the same
# memory an idle recv() would hold, without a malloc and a realloc for every message.
_RECV_SMALL = 2048
_RECV_LARGE = 262144
# The request head is read in small pieces too: a slow client must not pin much memory.
_HEAD_READ = 4096
# How long a refused client gets to read our answer before the socket is closed.
_LINGER_SECONDS = 1.0

_TIMEOUT_ERRORS = (BlockingIOError, socket.timeout)
#: ``ServerConnection._read_timeout`` before the socket's SO_RCVTIMEO is known.
UNKNOWN_TIMEOUT = -1.0


def _timeval(seconds: Optional[float]) -> bytes:
    # SO_RCVTIMEO/SO_SNDTIMEO take a struct timeval; zero means "block forever".
    if seconds is None:
        return struct.pack("ll", 0, 0)
    whole = int(seconds)
    micros = int((seconds - whole) * 1e6)
    if whole == 0 and micros == 0:
        micros = 1  # a tiny timeout must not turn into "forever"
    return struct.pack("ll", whole, micros)


def prepare_listener(listener: socket.socket, *, read_timeout: Optional[float],
                     write_timeout: Optional[float]) -> bool:
    """Set the options every accepted socket needs on the listener instead; ``True`` if
    accepted sockets inherit them.

    Linux copies a listening socket's TCP_NODELAY, SO_RCVTIMEO and SO_SNDTIMEO to the
    sockets ``accept()`` returns, which saves three system calls per connection (a
    measurable share of a short connection's cost). Elsewhere each socket sets its own.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        if listener.family != socket.AF_UNIX:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(read_timeout))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(write_timeout))
    except OSError:  # pragma: no cover - every Linux socket family here has them
        return False
    return True


class ServerConnection:
    """A client connection: its request, its state, and thread-safe ``send``/``close``.

    Created by the server for each accepted socket and run by its own thread. Handlers
    reach it as ``ctx.connection``; ``server.connections`` lists the live ones.
    """

    #: The rooms joined with :meth:`join`. Replaced, never mutated, so that a broadcast
    #: reads it without a lock; the class attribute costs idle connections nothing.
    rooms: FrozenSet[str] = frozenset()
    _rooms_lock = threading.Lock()

    def __init__(
        self,
        server: "Server",
        sock: socket.socket,
        remote_address: Any,
        connection_id: str,
    ) -> None:
        self.server = server
        self.id = connection_id
        self.remote_address = remote_address
        #: The handshake request (path, query, headers); ``None`` until it is read.
        self.request: Optional[HTTPRequest] = None
        #: What the ``authenticate`` hook returned, if there is one.
        self.identity: Any = None
        self.subprotocol: Optional[str] = None
        #: Handlers' own per-connection state.
        self.values: Dict[str, Any] = {}
        #: ``(code, reason)`` of the close, once known.
        self.close_code: Optional[int] = None
        self.close_reason = ""
        self.opened_at = time.time()
        #: Counters written by this connection's thread (read by ``server.stats()``).
        self.metrics = ConnectionMetrics()
        #: The thread serving this connection, once it has started.
        self.thread: Optional[threading.Thread] = None
        # Held until run() has finished everything (threads are pooled, so the thread's
        # end cannot tell): close() waits on it.
        self._running = threading.Lock()
        self._running.acquire()
        self._sock = sock
        self._stream: Optional[MessageStream] = None
        self._send_lock = threading.Lock()
        self._closed_event: Optional[threading.Event] = None
        self._finished = False
        # Kernel timeouts only work on plain sockets; TLS sockets use Python timeouts.
        self._kernel_timeouts = type(sock) is socket.socket
        # The SO_RCVTIMEO in force, so that it is only set when it changes (a socket
        # accepted from a prepared listener starts with the listener's), or
        # UNKNOWN_TIMEOUT: then the handshake sets the socket's options itself.
        self._read_timeout: Optional[float] = server._accepted_read_timeout
        self._logger = server.logger

    # Public API, for handlers and other threads.

    @property
    def path(self) -> str:
        return self.request.path if self.request is not None else ""

    @property
    def query(self) -> str:
        return self.request.query if self.request is not None else ""

    @property
    def open(self) -> bool:
        """True while messages can be sent to the client."""
        stream = self._stream
        return not self._finished and stream is not None and stream.open

    @property
    def closed(self) -> threading.Event:
        """An event set when this connection closes (and so when the server shuts down)."""
        event = self._closed_event
        if event is None:
            # Made on first use: most connections never need one, and an Event is a
            # Condition and two locks, a few hundred bytes for each idle connection.
            with self._send_lock:
                event = self._closed_event
                if event is None:
                    event = self._closed_event = threading.Event()
                    if self._finished:
                        event.set()
        return event

    def send(self, message: Any) -> None:
        """Send a message to this client, from any thread.

        ``str`` goes as a text frame, bytes-like as a binary frame, anything else as
        JSON text. Raises :class:`~wsroute_sync.ConnectionClosed` once the connection is
        closing or the write failed (the connection is then dropped), and
        ``UnicodeEncodeError`` for text that has no UTF-8 form (lone surrogates).
        """
        if isinstance(message, str):
            if not message.isascii():
                message.encode("utf-8")  # lone surrogates: UnicodeEncodeError, here
            data: Union[str, bytes] = message
        elif isinstance(message, (bytes, bytearray, memoryview)):
            data = bytes(message)
        else:
            encoded = encode_result(message, True)
            assert isinstance(encoded, str)
            data = encoded
        if not self._send(data):
            raise ConnectionClosed(self.close_code, self.close_reason)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (from any thread); the client's answer ends it.

        A client that does not answer within ``close_timeout`` is disconnected.
        """
        self._start_close(code, reason, lock_timeout=self.server.options.write_timeout)

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
        if self._running.acquire(timeout=-1 if timeout is None else timeout):
            self._running.release()
            return True
        return False

    def __repr__(self) -> str:
        return f"<ServerConnection {self.id} {self.remote_address!r}>"

    # Internals shared with the server.

    def _start_close(self, code: int, reason: str, *, lock_timeout: Optional[float]) -> bool:
        """Send a Close frame; ``False`` if there was nothing to do or it failed."""
        stream = self._stream
        if stream is None or self._finished:
            # Still in the handshake: there is no WebSocket to close, only a socket.
            self._abort()
            return False
        if not self._send_lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout):
            # Another thread is stuck writing to this client: it cannot take a Close
            # frame either, so drop it.
            self._abort()
            return False
        try:
            data = stream.close(code, reason)
            if not data:
                return False
            self._sock.sendall(data)
        except OSError:
            self._abort()
            return False
        finally:
            self._send_lock.release()
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if self.thread is not threading.current_thread():
            # The reading thread is blocked in recv with the keepalive timeout; the
            # server makes sure the closing handshake is bounded by close_timeout.
            self.server._schedule_abort(self)
        return True

    def _abort(self) -> None:
        """Drop the TCP connection now; wakes the connection thread if it is reading."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, data: Union[str, bytes]) -> bool:
        stream = self._stream
        if stream is None:
            return False
        with self._send_lock:
            try:
                frame = stream.send(data)
            except LocalProtocolError:
                return False  # closing has started: RFC 6455 5.5.1, no data after Close
            try:
                self._sock.sendall(frame)
            except _TIMEOUT_ERRORS:
                self._write_failed("write timed out (write_timeout) - client not reading")
                return False
            except OSError as exc:
                self._write_failed(f"write failed: {exc}")
                return False
        self.metrics.messages_out += 1
        return True

    def _frame_shared(self, data: Union[str, bytes], shared: Dict[bool, bytes]
                      ) -> Optional[bytes]:
        """The frame for ``data`` (send lock held); ``None`` if closing.

        Connections without an extension all write the same bytes for a message, so a
        broadcast frames it once (``shared``); a compressing one frames its own.
        """
        stream = self._stream
        if stream is None or self._finished:
            return None
        plain = stream.plain
        if plain and True in shared:
            return shared[True]
        try:
            frame = stream.send(data)
        except LocalProtocolError:
            return None
        if plain:
            shared[True] = frame
        return frame

    def _write_nowait(self, data: memoryview) -> Optional[memoryview]:
        """Write what the socket takes now (send lock held); the rest, or ``None`` on error."""
        try:
            n = self._sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return data
        except OSError as exc:
            self._write_failed(f"write failed: {exc}")
            return None
        return data[n:]

    def _write_failed(self, why: str) -> None:
        self._logger.info("connection %s: %s; dropping it", self.id, why)
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, why
        try:
            # A client that cannot take our data will not read what is queued for it
            # either: close with RST, so the kernel frees that memory now.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self._abort()

    def _set_read_timeout(self, seconds: Optional[float]) -> None:
        if self._kernel_timeouts:
            if seconds != self._read_timeout:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
                self._read_timeout = seconds
        else:
            self._sock.settimeout(seconds)

    # The connection thread.

    def run(self) -> None:
        """Serve the connection until it closes; always releases its server slot."""
        logger = self._logger
        self.thread = threading.current_thread()
        try:
            if self._handshake():
                self._serve()
        except Exception:
            logger.error("connection %s: unexpected error", self.id, exc_info=True)
        finally:
            with self._send_lock:
                self._finished = True
                event = self._closed_event
            try:
                self._sock.close()
            finally:
                if event is not None:
                    event.set()
                try:
                    self.server._connection_done(self)
                finally:
                    self._running.release()

    def _handshake(self) -> bool:
        """Read the request head and answer it; ``True`` once upgraded."""
        server = self.server
        options = server.options
        sock = self._sock
        timeout = options.handshake_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        kernel = self._kernel_timeouts
        if self._read_timeout == UNKNOWN_TIMEOUT:
            # Not inherited from the listener (see prepare_listener): set here.
            if sock.family != socket.AF_UNIX:
                # Replies are small and the client waits for each one: do not let
                # Nagle's algorithm hold them back for the ACK of the previous one.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if kernel:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                _timeval(options.write_timeout))
                self._set_read_timeout(timeout)
        if isinstance(sock, ssl.SSLSocket):
            # The TLS handshake counts against handshake_timeout too.
            try:
                sock.settimeout(timeout)
                sock.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                self._logger.warning("connection %s: TLS handshake failed: %s", self.id, exc)
                return False
        buffer = bytearray()
        limit = options.max_header_size
        end = -1
        first = True
        while end < 0:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._refuse_timeout()
                    return False
                if not kernel:
                    sock.settimeout(remaining)
                elif not first:
                    # The first read waits handshake_timeout; later ones what is left.
                    self._set_read_timeout(remaining)
            first = False
            try:
                chunk = sock.recv(_HEAD_READ)
            except _TIMEOUT_ERRORS:
                self._refuse_timeout()
                return False
            except OSError as exc:
                self._logger.debug("connection %s: lost during handshake: %s", self.id, exc)
                return False
            if not chunk:
                self._logger.debug("connection %s: closed before a request", self.id)
                return False
            start = len(buffer)
            buffer += chunk
            if start < 16:
                # Refuse a TLS hello or binary junk now: it never ends with a blank
                # line, so waiting for one would hold the slot for handshake_timeout.
                try:
                    check_request_start(buffer)
                except BadRequest as exc:
                    self._refuse(exc.status, exc.reason)
                    return False
            end = find_head_end(buffer, start)
            if (end < 0 and len(buffer) > limit) or end > limit:
                self._refuse(431, f"request head larger than {limit} bytes")
                return False
        head, rest = bytes(buffer[:end]), bytes(buffer[end:])
        try:
            request = parse_request_head(head, self.remote_address)
        except BadRequest as exc:
            self._refuse(exc.status, exc.reason)
            return False
        self.request = request
        if not is_upgrade_request(request):
            self._send_and_linger(server._plain_http(request))
            return False
        try:
            check_upgrade(
                request,
                paths=options.path,
                allowed_origins=options.allowed_origins,
                check_origin=options.check_origin,
            )
            if options.authenticate is not None:
                self.identity = server._authenticate(request)
            try:
                response, ws, self.subprotocol, deflate = accept_upgrade(
                    request, subprotocols=options.subprotocols, compression=options.compression
                )
            except ValueError as exc:
                # wsproto parses extension parameters with int() and lets the error out:
                # "permessage-deflate; client_max_window_bits=abc" is the client's fault.
                raise HandshakeRejected(400, "invalid Sec-WebSocket-Extensions") from exc
        except HandshakeRejected as exc:
            self._logger.warning(
                "connection %s: handshake refused with %d: %s", self.id, exc.status, exc.reason
            )
            self._send_and_linger(rejection_response(exc, head_only=request.method == "HEAD"))
            return False
        stream = MessageStream(
            ws, max_message_size=options.max_message_size, extensions=deflate
        )
        # Open for sending before the client can see the 101 (a broadcast made after the
        # client connected must reach it), but under the send lock, so that no frame
        # can be written ahead of the 101 response.
        with self._send_lock:
            self._stream = stream
            try:
                sock.sendall(response)
            except OSError as exc:
                self._logger.debug("connection %s: lost during handshake: %s", self.id, exc)
                return False
        self._pending = rest
        self._logger.debug("connection %s: open from %s, path %s", self.id,
                           self.remote_address, request.path)
        return True

    def _refuse_timeout(self) -> None:
        self._logger.warning("connection %s: no complete request within handshake_timeout",
                             self.id)
        self._send_and_linger(http_response(408, "request head not received in time\n"))

    def _refuse(self, status: int, reason: str) -> None:
        self._logger.warning("connection %s: bad request, answered %d: %s", self.id, status,
                             reason)
        self._send_and_linger(http_response(status, reason + "\n"))

    def _send_and_linger(self, response: bytes) -> None:
        """Answer, then half-close and read what the client still sends for a moment.

        Closing a socket with unread input makes the kernel send RST, which can destroy
        our answer before the client reads it; draining first lets the client see it.
        """
        sock = self._sock
        try:
            sock.settimeout(_LINGER_SECONDS)
            sock.sendall(response)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            drained = 0
            while drained < (1 << 20) and time.monotonic() < deadline:
                chunk = sock.recv(_HEAD_READ)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def _serve(self) -> None:
        """The message loop: read, hand whole messages to the server's handler, reply."""
        server = self.server
        options = server.options
        sock = self._sock
        stream = self._stream
        assert stream is not None
        logger = self._logger
        ping_interval = options.ping_interval
        if self._kernel_timeouts:
            # SO_SNDTIMEO (write_timeout) was set with the handshake; reads now wait
            # for keepalive's interval (or forever).
            self._set_read_timeout(ping_interval)
        else:
            # A TLS socket has one Python timeout for reads and writes: keepalive's
            # interval when there is one, else write_timeout (reads then just go on).
            sock.settimeout(ping_interval or options.write_timeout)
        handle = server._message_handler
        send = self._send
        metrics = self.metrics
        recv = sock.recv
        recv_into = sock.recv_into
        small = bytearray(_RECV_SMALL)
        small_view = memoryview(small)
        awaiting_pong = False
        closing = False  # we sent Close and wait for the client's (close_timeout applies)
        data: Optional[bytes] = self._pending
        del self._pending
        size = _RECV_SMALL
        while True:
            if data is None and stream.deferred:
                data = b""  # the rest of the last read, held back behind earlier replies
            if data is None:
                try:
                    if size == _RECV_SMALL:
                        data = small_view[:recv_into(small)].tobytes()
                    else:
                        data = recv(size)
                except _TIMEOUT_ERRORS:
                    if stream.state is ConnectionState.LOCAL_CLOSING or closing:
                        logger.info("connection %s: no Close answer in time, dropping", self.id)
                        return
                    if ping_interval is None:
                        continue  # TLS without keepalive: only writes are bounded
                    if awaiting_pong:
                        # RFC 6455 7.1.7 allows failing a connection that stopped
                        # responding; 1011 says the server gave up on it.
                        logger.info("connection %s: no pong within ping_timeout", self.id)
                        self._start_close(CLOSE_INTERNAL_ERROR, "keepalive ping timeout",
                                          lock_timeout=0.0)
                        self.close_code = 1011
                        return
                    if not self._send_control(stream.ping):
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
                    stream.receive(None)
                    if self.close_code is None:
                        self.close_code = 1006
                    return
            for item in stream.receive(data):
                kind = type(item)
                if kind is str or kind is bytes:
                    metrics.messages_in += 1
                    reply = handle(self, item)  # type: ignore[arg-type]
                    if reply is not None:
                        send(reply)
                elif kind is PingReceived:
                    self._send_control(stream.pong, item.payload)  # type: ignore[union-attr]
                elif kind is PongReceived:
                    if awaiting_pong:
                        awaiting_pong = False
                        self._set_read_timeout(ping_interval)
                elif kind is CloseReceived:
                    assert isinstance(item, CloseReceived)
                    if not item.closed:
                        # Echo the code (RFC 6455 5.5.1); 1005 "no status" becomes an
                        # empty Close, which wsproto writes for it.
                        self._start_close(item.code, "", lock_timeout=options.write_timeout)
                    if self.close_code is None or not item.closed:
                        self.close_code, self.close_reason = item.code, item.reason
                    # RFC 6455 7.1.1: the server closes TCP first, so return now.
                    return
                elif kind is ProtocolFailure:
                    assert isinstance(item, ProtocolFailure)
                    logger.info("connection %s: failing with %d: %s", self.id, item.code,
                                item.reason)
                    self._start_close(item.code, item.reason, lock_timeout=options.write_timeout)
                    self.close_code, self.close_reason = item.code, item.reason
                    return
            data = None
            if not closing and not stream.writable:
                # Still here with the stream no longer open: a handler (or close() in
                # this thread) sent Close, as the client's Close would have returned.
                # The closing handshake has started:
                # from now on the wait for the client's Close is bounded by close_timeout.
                closing = True
                self._set_read_timeout(options.close_timeout)

    def _send_control(self, make: Any, *args: Any) -> bool:
        with self._send_lock:
            try:
                frame = make(*args)
            except LocalProtocolError:
                return True  # closing: no more pings or pongs, nothing is wrong
            try:
                self._sock.sendall(frame)
            except OSError as exc:
                self._write_failed(f"write failed: {exc}")
                return False
        return True

