"""Follower threads: pooled threads that wait in ``accept()`` themselves and serve, in
that same thread, the connection whose request head came in with its accept.

With one accept thread, every new connection was handed from that thread to a pooled
one: a wake-up, a switch, and a wait for the GIL while the accept thread went on with
its next socket. Under connection churn that hand-over was the largest cost the server
added to a connection (the accept thread used more CPU per connection than it did
before the head was read there, and nothing done to that thread's own work moved the
rate). Here a thread takes a connection straight from the kernel, which wakes one
waiter per connection, and when its connection ends it waits in ``accept()`` again: no
hand-over at all in the common case (benchmarks/README.md, "Follower threads").

Admission is unchanged. A socket whose complete request head is not in when it is
accepted goes to the accept loop's selector (:meth:`Acceptor.hand_over
<wsroute_sync.accept.Acceptor.hand_over>`) with the bytes read so far, so a client that
sends nothing still costs a file descriptor and no thread; bad or oversized heads go
there too, to be answered as they always were. Only a complete, parsed head is
admitted (slot, per-client limits) and served here.

At most ``count`` threads wait in ``accept()``; the last one to take a connection
starts another first, so one is always waiting. Used on Linux for plain sockets only:
stopping relies on ``shutdown()`` of the listener waking the threads blocked in
``accept()`` on it (``EINVAL``), which Linux does for TCP and unix sockets; elsewhere,
and for TLS (whose handshake must not hold a thread), the accept loop accepts.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from typing import Any, Callable, Optional, Protocol, Tuple, Union

from .admission import HEAD_READ
from .http import BadRequest, HTTPRequest, find_head_end, parse_request_head
from .listen import ACCEPT_PAUSE_SECONDS

__all__ = ["Followers", "FOLLOWERS", "Admitted", "Admit", "Spawn", "HandOver"]


class Admitted(Protocol):
    """An admitted connection, as a follower sees it (``ServerConnection``)."""

    @property
    def thread_name(self) -> str:
        """The name its thread takes."""

    def run(self) -> None:
        """Serve it to its end; handles its own errors."""


#: ``admit(sock, remote_address, request, rest)``: a complete request head read by a
#: follower; returns the HTTP answer refusing it, or the connection, which the follower
#: then serves itself.
Admit = Callable[[socket.socket, Any, HTTPRequest, bytes], Union[bytes, Admitted]]
#: ``spawn(job, name)``: run ``job`` in another thread (``ThreadPool.submit``); raises
#: ``RuntimeError`` when no thread can be started.
Spawn = Callable[[Callable[[], None], str], None]
#: ``hand_over(sock, remote_address, head, answer)``: give the accept loop a socket:
#: with ``answer`` ``None``, to go on reading its head (``head``: the bytes read so
#: far); otherwise to send it ``answer`` and close it. Thread-safe.
HandOver = Callable[[socket.socket, Any, bytes, Optional[bytes]], None]
_Logger = Union[logging.Logger, logging.LoggerAdapter]  # type: ignore[type-arg]

#: Threads waiting in ``accept()`` at once. One would do for a steady stream; a second
#: keeps a burst from waiting while the first starts its replacement.
FOLLOWERS = 2
_MSG_DONTWAIT = socket.MSG_DONTWAIT
# accept() failures that concern one client, not the listener: try the next one.
_CLIENT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}


class Followers:
    """The threads that accept on ``listener`` and serve what they accept.

    ``accept()`` returns a new connection's file descriptor and address (the
    listener's ``_accept``, as the accept loop uses it).
    :meth:`start` makes the listener blocking and starts ``count`` followers with
    ``spawn``; :meth:`stop` (any thread) shuts the listener down, which ends their wait,
    and makes each return once its connection, if any, has ended. The listener is
    closed by its owner, after :meth:`stop`.
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        accept: Callable[[], Tuple[int, Any]],
        admit: Admit,
        spawn: Spawn,
        hand_over: HandOver,
        max_header_size: int,
        logger: _Logger,
        count: int = FOLLOWERS,
    ) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        self._listener = listener
        self._accept = accept
        self._admit = admit
        self._spawn = spawn
        self._hand_over = hand_over
        self._limit = max_header_size
        self._logger = logger
        self._count = count
        self._lock = threading.Lock()
        self._waiting = 0  # followers in (or on their way to) accept()
        self._stopping = False
        self._stopped = threading.Event()  # ends a pause early

    @property
    def waiting(self) -> int:
        """Followers waiting for a connection."""
        return self._waiting

    def start(self) -> int:
        """Start the followers; returns how many started (0: accept another way)."""
        self._listener.setblocking(True)
        started = 0
        for _ in range(self._count):
            with self._lock:
                self._waiting += 1
            try:
                self._spawn(self._follow, "wsroute_sync-accept")
            except RuntimeError as exc:
                with self._lock:
                    self._waiting -= 1
                self._logger.error("cannot start an accepting thread: %s", exc)
                break
            started += 1
        if not started:
            self._listener.setblocking(False)
        return started

    def stop(self) -> None:
        """End every follower's wait in ``accept()``; safe from any thread, idempotent."""
        with self._lock:
            self._stopping = True
        self._stopped.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed, or never listened
            pass

    # A follower's life.

    def _follow(self) -> None:
        me = threading.current_thread()
        name = me.name
        while True:
            connection = self._next()
            if connection is None:
                return
            me.name = connection.thread_name
            connection.run()
            del connection  # nothing of it stays alive with this thread
            me.name = name
            if not self._rejoin():
                return

    def _next(self) -> Optional[Admitted]:
        """Accept until a connection is admitted; ``None`` when this thread should end."""
        accept = self._accept
        family = self._listener.family
        while True:
            try:
                fd, remote = accept()
            except OSError as exc:
                if self._stopping:
                    with self._lock:
                        self._waiting -= 1
                    return None
                if exc.errno in _CLIENT_GONE:
                    continue
                # Out of file descriptors, most likely: as the accept loop does.
                self._logger.error("accept failed: %s; pausing accepts for %.1fs", exc,
                                   ACCEPT_PAUSE_SECONDS)
                self._stopped.wait(ACCEPT_PAUSE_SECONDS)
                continue
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            head = self._read_head(sock, remote)
            if head is None:
                continue
            request, rest, data = head
            if not self._leave_one_waiting():
                # No thread for a replacement: the accept loop's way (which answers 503
                # when it cannot start a thread either), and this one goes on waiting.
                self._hand_over(sock, remote, data, None)
                continue
            answer = self._admit(sock, remote, request, rest)
            if not isinstance(answer, bytes):
                return answer
            self._hand_over(sock, remote, b"", answer)
            if not self._rejoin():
                return None

    def _read_head(self, sock: socket.socket, remote: Any
                   ) -> Optional[Tuple[HTTPRequest, bytes, bytes]]:
        """The parsed head, the bytes after it and all bytes read; ``None`` once the
        socket is handed over: everything but a complete, good head is the accept
        loop's (no bytes yet, a client gone, a bad or oversize head), which reads on,
        answers or closes it as it does any socket."""
        try:
            # Read at once, as the accept loop does: a client usually sends its head
            # right behind the TCP handshake. The socket stays blocking for its
            # connection: MSG_DONTWAIT for this read only.
            data = sock.recv(HEAD_READ, _MSG_DONTWAIT)
        except OSError:  # BlockingIOError, or a reset the accept loop's read sees too
            data = b""
        end = find_head_end(data) if data else -1
        if 0 <= end <= self._limit:
            try:
                return parse_request_head(data[:end], remote), data[end:], data
            except BadRequest:
                pass
        self._hand_over(sock, remote, data, None)
        return None

    def _leave_one_waiting(self) -> bool:
        """This follower takes a connection: if it was the last one waiting, start a
        replacement first. ``False`` (this one still counted as waiting) if none could
        be started."""
        with self._lock:
            self._waiting -= 1
            if self._waiting > 0 or self._stopping:
                return True
            self._waiting += 1  # the replacement's place
        try:
            self._spawn(self._follow, "wsroute_sync-accept")
        except RuntimeError as exc:
            # The replacement's place is this thread's again.
            self._logger.error("cannot start an accepting thread: %s", exc)
            return False
        return True

    def _rejoin(self) -> bool:
        """After a connection: wait in ``accept()`` again, unless enough do already."""
        with self._lock:
            if self._stopping or self._waiting >= self._count:
                return False
            self._waiting += 1
            return True
