"""The listening socket and its accept loop: one thread accepts connections and holds
each, without a thread or a slot, until its request head is in, then hands it on.

It waits on one selector over the listening socket, a wake-up pipe (so that ``stop()``
needs no polling) and the sockets still in admission (:mod:`wsroute_sync.admission`).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import ssl
import time
from typing import Any, Callable, Optional, Union

from .admission import PendingHandshakes
from .limits import default_max_pending
from .http import HTTPRequest
from .listen import UNKNOWN_TIMEOUT, open_listener, prepare_listener
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
# Out of file descriptors, the listener is left alone this long.
_PAUSE_SECONDS = 0.1


class Acceptor:
    """Listens on ``addr`` (see :func:`~wsroute_sync.listen.parse_address`) from its
    construction, which raises ``OSError`` if the address cannot be bound.

    :meth:`run` serves until :meth:`stop`, then closes the listener and every socket
    still in admission; :meth:`close` then frees the wake-up pipe and a unix socket's
    file. ``reuse_port``: share the port with other processes (``SO_REUSEPORT``).
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
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def stop(self) -> None:
        """Make :meth:`run` return soon; safe from any thread."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:  # pragma: no cover - the pipe is never full: one byte
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
        selector.register(listener, selectors.EVENT_READ, _LISTENER)
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
        try:
            while not self._stopping:
                timeout = pending.timeout()
                if paused_until is not None:
                    pause = max(0.0, paused_until - time.monotonic())
                    timeout = pause if timeout is None else min(timeout, pause)
                for key, events in selector.select(timeout):
                    if key.data is _WAKE:
                        try:
                            wake.recv(64)
                        except OSError:
                            pass
                    elif key.data is _LISTENER:
                        if not self._accept_batch(pending):
                            # Out of file descriptors: stop watching the listener for
                            # a moment instead of spinning on a socket we cannot accept.
                            selector.unregister(listener)
                            paused_until = time.monotonic() + _PAUSE_SECONDS
                    else:
                        pending.handle(key, events)
                pending.expire()
                if paused_until is not None and time.monotonic() >= paused_until:
                    selector.register(listener, selectors.EVENT_READ, _LISTENER)
                    paused_until = None
        finally:
            pending.close()
            selector.close()
            listener.close()

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
                                   _PAUSE_SECONDS)
                return False
            # No slot and no thread yet: the request head (and TLS handshake) is awaited
            # in this loop's selector, so a client that sends nothing costs a socket only.
            pending.add(sock, remote)
        return True
