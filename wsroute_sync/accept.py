"""The accept loop: one thread accepts connections and holds each, without a thread or a
slot, until its request head is in, then hands it to the server.

It waits on one selector over the listening socket, a wake-up pipe (so that ``stop()``
needs no polling) and the sockets still in admission (:mod:`wsroute_sync.admission`).
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import time
from typing import Any, Callable, Optional, Union

from .admission import PendingHandshakes
from .http import HTTPRequest

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
    """The accept loop over one listening socket (non-blocking, already listening).

    :meth:`run` serves until :meth:`stop`, then closes the listener and every socket
    still in admission; :meth:`close` then frees the wake-up pipe.
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        ssl_context: Optional[ssl.SSLContext],
        handshake_timeout: Optional[float],
        max_header_size: int,
        max_pending: Optional[int],
        on_head: OnHead,
        logger: _Logger,
    ) -> None:
        self._listener = listener
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._max_header_size = max_header_size
        self._max_pending = max_pending
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
        """Free the wake-up pipe, once :meth:`run` has returned (or will never run)."""
        self._wake_r.close()
        self._wake_w.close()

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
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, remote = listener.accept()
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
