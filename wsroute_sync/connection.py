"""One client connection and the thread that serves it: upgrade, then read → dispatch → write.

The thread answers the request head (a plain HTTP answer, a refusal, or the 101, as
:mod:`wsroute_sync.upgrade` decides), then reads: each whole message goes to the owner's
handler and the reply goes back at once, from this thread. Writes from any thread, and
the close state, are :class:`~wsroute_sync.sender.Sender`'s, which this class extends;
the two modules are the only code that touches a connection's socket, locks, queue of
frames and close state.

Reads of a plain socket block in ``recv`` under the kernel's ``SO_RCVTIMEO`` (one system
call per message); TLS reads wait in ``poll``, and take the lock that keeps OpenSSL from
being entered by two threads at once.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Dict, FrozenSet, Optional, Protocol, Tuple

from wsproto.connection import ConnectionState
from wsproto.utilities import LocalProtocolError

from .http import HTTPRequest
from .limits import TokenBucket
from .listen import UNKNOWN_TIMEOUT, timeval
from .options import ServerOptions
from .frames import (
    CLOSE_INTERNAL_ERROR,
    CloseReceived,
    Message,
    PingReceived,
    PongReceived,
    ProtocolFailure,
)
from .handshake import is_upgrade_request
from .routing import error_envelope
from .sender import Progress, Sender
from .upgrade import answer_and_close, negotiate

__all__ = [
    "ConnectionOwner",
    "ServerConnection",
]

# CPython allocates the whole buffer of a recv() before it blocks, so an idle connection
# holds its read size in memory for as long as it waits. Reads start small (a JSON
# request fits in a few hundred bytes) and grow while they come back full, so that a
# large message still arrives in few system calls; the next short read shrinks them.
# Small reads go into one buffer kept for the connection's life (recv_into): the same
# memory an idle recv() would hold, without a malloc and a realloc for every message.
# 1 KiB, not 2: idle connections are what a server holds most of (issue #18's budget is
# 30 KiB each), and a message over 1 KiB costs one more read, after which reads grow.
_RECV_SMALL = 1024
_RECV_LARGE = 262144

_TIMEOUT_ERRORS = (BlockingIOError, socket.timeout)


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

    def keep_alive(self, connection: "ServerConnection") -> None:
        """Ping ``connection`` every ping_interval from now on (keepalive.py)."""

    def expect_close(self, connection: "ServerConnection") -> None:
        """Drop ``connection`` if its closing handshake is not over within close_timeout
        (its thread may be blocked in a read that a Close from elsewhere cannot shorten)."""

    def connection_done(self, connection: "ServerConnection") -> None:
        """The connection has ended: socket closed; free its slot."""


class ServerConnection(Sender):
    """A client connection: its request, its state, and thread-safe ``send``/``close``.

    Created by the server for each admitted request and run by its own thread. Handlers
    reach it as ``ctx.connection``; ``server.connections`` lists the live ones.
    """

    #: The rooms joined with :meth:`join`. Replaced, never mutated, so that a broadcast
    #: reads it without a lock; the class attribute costs idle connections nothing.
    rooms: FrozenSet[str] = frozenset()
    _rooms_lock = threading.Lock()

    # See Sender's. "rooms" is not one: its instance value, once set, goes in __dict__.
    __slots__ = (
        "server", "remote_address", "request", "identity", "subprotocol", "values",
        "opened_at", "thread", "_running", "_rest", "_read_timeout", "_awaiting_pong",
        "_ping_ticket", "_written_at_ping",
    )

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
        super().__init__(sock, connection_id, logger=owner.logger,
                         write_timeout=owner.options.write_timeout)
        #: The server (or other owner) this connection belongs to.
        self.server = owner
        self.remote_address = remote_address
        #: The request that opened the connection (path, query, headers).
        self.request = request
        #: What the ``authenticate`` hook returned, if there is one.
        self.identity: Any = None
        self.subprotocol: Optional[str] = None
        #: Handlers' own per-connection state.
        self.values: Dict[str, Any] = {}
        self.opened_at = time.time()
        #: The thread serving this connection, once it has started.
        self.thread: Optional[threading.Thread] = None
        # Held until run() has finished everything (threads are pooled, so the thread's
        # end cannot tell): wait_finished() waits on it.
        self._running = threading.Lock()
        self._running.acquire()
        self._rest = rest
        # The SO_RCVTIMEO in force on a plain socket, so that it is only set when it
        # changes; TLS reads keep theirs here and wait in poll.
        self._read_timeout: Optional[float] = inherited_read_timeout
        self._awaiting_pong = False  # a keepalive Ping went out; its Pong has not come
        self._ping_ticket = self._written_at_ping = 0  # that Ping's ticket; bytes out then

    # Public API, for handlers and other threads.

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def query(self) -> str:
        return self.request.query

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

    # Keepalive: the server's keepalive thread calls these (keepalive.py).

    def ping_nowait(self) -> Tuple[Progress, int]:
        """Start a keepalive Ping without waiting, unless the last one is unanswered.

        Returns like :meth:`try_send`: ``CLOSED`` once the connection is closing (no more
        Pings), ``DONE`` with ticket 0 when no Ping was due (not open yet, or waiting for
        a Pong); otherwise drive it with :meth:`progress`.
        """
        with self._lock:
            stream = self._stream
            if self._closing or self._broken or self._finished:
                return Progress.CLOSED, 0
            if stream is None or self._awaiting_pong:
                return Progress.DONE, 0
            try:
                frame = stream.ping()
            except LocalProtocolError:
                return Progress.CLOSED, 0  # the client's Close is in
            # Before the frame can leave: its Pong may come back at once.
            self._awaiting_pong = True
            self._written_at_ping = self._written
            ticket = self._ping_ticket = self._enqueue(frame)
        return self.progress(ticket), ticket

    def expire_ping(self) -> bool:
        """The last keepalive Ping has had ping_timeout: unless its Pong came, fail the
        connection (RFC 6455 7.1.7) with 1011, which says the server gave up on it.

        Returns ``False`` to be asked again after another ping_timeout: the Ping is not
        out yet, behind data the client is reading (a long reply), so no Pong can have
        come. A client that read nothing meanwhile is failed.
        """
        if not self._awaiting_pong or self._closing:
            return True
        written = self._written
        if self._written_at_ping < written < self._ping_ticket:
            self._written_at_ping = written
            return False
        self._logger.info("connection %s: no pong within ping_timeout", self.id)
        self.close_nowait(CLOSE_INTERNAL_ERROR, "keepalive ping timeout")
        # The client stopped answering: no wait for its Close. abort() wakes our thread.
        self.abort()
        return True

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

    # Reading.

    def _set_read_timeout(self, seconds: Optional[float]) -> None:
        if seconds != self._read_timeout:
            if self._tls_sock is not None:
                self._tls_sock.settimeout(seconds)
            else:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(seconds))
            self._read_timeout = seconds

    def _send_pong(self, payload: bytes) -> bool:
        """Answer a Ping (blocking, bounded); ``False`` if the connection failed."""
        with self._lock:
            stream = self._stream
            if self._broken or stream is None:
                return False
            try:
                frame = stream.pong(payload)
            except LocalProtocolError:
                return True  # closing: no more Pongs, nothing is wrong
            ticket = self._enqueue(frame)
        timeout = self._write_timeout
        return self._deliver(ticket, None if timeout is None else time.monotonic() + timeout)

    # The connection thread.

    @property
    def thread_name(self) -> str:
        """The name of the thread that serves it."""
        return f"wsroute_sync-conn-{self.id}"

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
        try:
            self._close_socket()
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
        if not self._tls and sock.gettimeout() is not None:
            # Blocking reads under SO_RCVTIMEO; writes never block. Sockets from the
            # accept loop are blocking already (admission reads them with MSG_DONTWAIT).
            # A TLS socket is non-blocking (SharedTLSSocket sees to it).
            sock.setblocking(True)
        if self._read_timeout == UNKNOWN_TIMEOUT and sock.family != socket.AF_UNIX:
            # Not inherited from a prepared listener (another OS, a WSGI server's socket):
            # replies are small and the client waits for each one, so Nagle's algorithm
            # must not hold them back for the ACK of the previous one.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not is_upgrade_request(request):
            answer_and_close(sock, owner.http_answer(request), close=False)
            return False
        upgrade = negotiate(request, options, self._logger, self.id)
        if isinstance(upgrade, bytes):
            answer_and_close(sock, upgrade, close=False)
            return False
        response, stream, self.subprotocol, self.identity = upgrade
        if not self._start(stream, response):
            return False
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
        # Reads wait for as long as it takes: the keepalive thread pings (owner's
        # keep_alive) and drops a client that stops answering; closing sets a timeout.
        self._set_read_timeout(None)
        owner.keep_alive(self)
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
        recv = self._tls_sock.recv if self._tls_sock is not None else sock.recv
        recv_into = sock.recv_into
        small = bytearray(_RECV_SMALL)
        small_view = memoryview(small)
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
                    continue  # only closing sets a read timeout: nothing else to do here
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
                    self._send_pong(item.payload)  # type: ignore[union-attr]
                elif kind is PongReceived:
                    self._awaiting_pong = False
                elif kind is CloseReceived:
                    assert isinstance(item, CloseReceived)
                    # The code and reason first: whoever wakes on ``closed`` reads them.
                    if self.close_code is None or not item.closed:
                        self.close_code, self.close_reason = item.code, item.reason
                    # Echo the code (RFC 6455 5.5.1); 1005 "no status" becomes an empty
                    # Close, which wsproto writes for it. Queuing it marks us closing.
                    ticket = None if item.closed else self._queue_close(item.code, "")
                    if ticket is None:
                        self._mark_closing()
                    else:
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
