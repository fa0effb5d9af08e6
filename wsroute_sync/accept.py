"""The listening socket and its accept loop: it holds each accepted socket, without a
thread or a slot, until its request head is in, then hands it on.

It waits on one selector over the listening socket, a wake-up pipe (so that ``stop()``
needs no polling) and the sockets still in admission (:mod:`wsroute_sync.admission`).
On Linux, plain sockets are accepted by follower threads instead (:mod:`.follow`), which
serve what comes with its head and hand the rest to this loop.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import ssl
import sys
import threading
import time
from typing import Any, Callable, Deque, Optional, Tuple, Union

from .admission import PendingHandshakes
from .follow import Admit, Followers, Spawn
from .limits import default_max_pending
from .http import HTTPRequest
from .listen import ACCEPT_PAUSE_SECONDS, UNKNOWN_TIMEOUT, open_listener, prepare_listener
from .options import ServerOptions

__all__ = ["Acceptor", "OnHead"]

#: ``on_head(sock, remote_address, request, rest)``: a complete request head; returns
#: ``None`` once the socket is taken care of, or the HTTP answer refusing it.
OnHead = Callable[[socket.socket, Any, HTTPRequest, bytes], Optional[bytes]]
_Logger = Union[logging.Logger, logging.LoggerAdapter]  # type: ignore[type-arg]

# What the selector keys carry besides the pending handshakes' sockets.
_LISTENER = "listener"
_WAKE = "wake"
# Accepting in batches keeps a burst of connects from starving the wake-up pipe.
_ACCEPT_BATCH = 64


class Acceptor:
    """Listens on ``addr`` (see :func:`~wsroute_sync.listen.parse_address`) from its
    construction, which raises ``OSError`` if the address cannot be bound.

    :meth:`run` serves until :meth:`stop`, then closes the listener and every socket
    still in admission; :meth:`close` then frees the wake-up pipe and a unix socket's
    file. ``reuse_port``: share the port with other processes (``SO_REUSEPORT``).
    ``admit`` and ``spawn``: follower threads (:class:`~wsroute_sync.follow.Followers`)
    accept plain sockets on Linux and serve the connections ``admit`` gives them.
    """

    def __init__(
        self,
        addr: str,
        *,
        reuse_port: bool,
        ssl_context: Optional[ssl.SSLContext],
        options: ServerOptions,
        on_head: OnHead,
        logger: _Logger,
        admit: Optional[Admit] = None,
        spawn: Optional[Spawn] = None,
    ) -> None:
        listener, address = open_listener(addr, reuse_port=reuse_port)
        #: The bound ``(host, port)``, or a unix socket's path.
        self.address: Any = address
        self._unix_path = address if listener.family == socket.AF_UNIX else None
        #: The read timeout accepted sockets inherit (see ``prepare_listener``).
        self.inherited_read_timeout: Optional[float] = UNKNOWN_TIMEOUT
        if ssl_context is None and prepare_listener(listener):
            self.inherited_read_timeout = None
        max_pending = options.max_pending_handshakes
        if max_pending == "auto":
            max_pending = default_max_pending(options.max_connections)
        assert max_pending is None or isinstance(max_pending, int)
        self._listener = listener
        self._family = listener.family
        self._ssl_context = ssl_context
        self._handshake_timeout = options.handshake_timeout
        self._max_header_size = options.max_header_size
        self._max_pending: Optional[int] = max_pending
        self._on_head = on_head
        self._logger = logger
        self._stopping = False
        self._followers: Optional[Followers] = None
        if admit is not None and spawn is not None and ssl_context is None and (
                sys.platform.startswith("linux")):
            self._followers = Followers(
                listener, accept=listener._accept,  # type: ignore[attr-defined]
                admit=admit, spawn=spawn, hand_over=self.hand_over,
                max_header_size=options.max_header_size, logger=logger,
            )
        # Sockets the followers hand over (socket, remote, head, answer), and whether
        # the loop has ended (later ones are closed at once); under _handed_lock.
        self._handed: Deque[Tuple[socket.socket, Any, bytes, Optional[bytes]]] = (
            collections.deque())
        self._handed_lock = threading.Lock()
        self._handed_closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def stop(self) -> None:
        """Make :meth:`run` return soon; safe from any thread."""
        self._stopping = True
        if self._followers is not None:
            self._followers.stop()
        self._wake()

    def hand_over(self, sock: socket.socket, remote: Any, head: bytes,
                  answer: Optional[bytes]) -> None:
        """Give the loop a socket a follower accepted: to read the rest of its head
        (``head``: what was read), or, with ``answer``, to answer and close it.
        Thread-safe; the socket is closed if the loop has ended."""
        with self._handed_lock:
            closed = self._handed_closed
            first = not self._handed
            if not closed:
                self._handed.append((sock, remote, head, answer))
        if closed:
            sock.close()
        elif first:
            self._wake()  # one wake-up for all queued before the loop takes them

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full: the loop has wake-ups pending anyway
            pass

    def close(self) -> None:
        """Free the wake-up pipe and a unix socket's file, once :meth:`run` has returned
        (or will never run)."""
        self._wake_r.close()
        self._wake_w.close()
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass

    def run(self) -> None:
        """Accept and admit until :meth:`stop`."""
        listener = self._listener
        wake = self._wake_r
        selector = selectors.DefaultSelector()
        selector.register(wake, selectors.EVENT_READ, _WAKE)
        on_head = self._on_head

        def head_in(sock: socket.socket, remote: Any, request: HTTPRequest, rest: bytes
                    ) -> None:
            refusal = on_head(sock, remote, request, rest)
            if refusal is not None:
                pending.refuse(sock, refusal)

        pending = PendingHandshakes(
            selector, ssl_context=self._ssl_context,
            handshake_timeout=self._handshake_timeout,
            max_header_size=self._max_header_size,
            max_pending=self._max_pending,
            logger=self._logger, on_head=head_in,
        )
        paused_until: Optional[float] = None
        if self._followers is None or not self._followers.start():
            selector.register(listener, selectors.EVENT_READ, _LISTENER)
        try:
            while not self._stopping:
                timeout = pending.timeout()
                if paused_until is not None:
                    pause = max(0.0, paused_until - time.monotonic())
                    timeout = pause if timeout is None else min(timeout, pause)
                for key, events in selector.select(timeout):
                    if key.data is _WAKE:
                        try:
                            wake.recv(4096)
                        except OSError:
                            pass
                        self._take_handed(pending)
                    elif key.data is _LISTENER:
                        if not self._accept_batch(pending):
                            # Out of file descriptors: stop watching the listener for
                            # a moment instead of spinning on a socket we cannot accept.
                            selector.unregister(listener)
                            paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS
                    else:
                        pending.handle(key, events)
                pending.expire()
                if paused_until is not None and time.monotonic() >= paused_until:
                    selector.register(listener, selectors.EVENT_READ, _LISTENER)
                    paused_until = None
        finally:
            if self._followers is not None:
                self._followers.stop()  # run() can end without stop(): an error
            with self._handed_lock:
                self._handed_closed = True
            self._take_handed(pending)
            pending.close()
            selector.close()
            listener.close()

    def _take_handed(self, pending: PendingHandshakes) -> None:
        with self._handed_lock:
            handed, self._handed = self._handed, collections.deque()
        for sock, remote, head, answer in handed:
            if answer is None:
                pending.add(sock, remote, head)
            else:
                pending.refuse(sock, answer)

    def _accept_batch(self, pending: PendingHandshakes) -> bool:
        listener = self._listener
        # socket.accept() is this plus a conversion of the listener's family and type
        # to enums for every connection (a tenth of this thread's work per connection).
        accept = listener._accept  # type: ignore[attr-defined]
        family = self._family
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, remote = accept()
                sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                self._logger.error("accept failed: %s; pausing accepts for %.1fs", exc,
                                   ACCEPT_PAUSE_SECONDS)
                return False
            # No slot and no thread yet: the request head (and TLS handshake) is awaited
            # in this loop's selector, so a client that sends nothing costs a socket only.
            pending.add(sock, remote)
        return True
