"""Fan-out: one message to many connections — broadcast, rooms, ``send_to``, backplane
delivery and the Close of a shutdown — through each connection's public, non-blocking send.

A broadcast frames its message once (:class:`~wsroute_sync.stream.PreparedMessage`),
starts a non-blocking send on every target (:meth:`ServerConnection.try_send`: the
connection decides, under its own lock, whether it can still take a data frame and in
what order it goes out), then drives the sends that the sockets did not take at once,
all together in one selector, until the caller's deadline. A client still behind then
cannot take even a Close frame, so it is dropped. Nothing here touches a connection's
socket, lock or queue.
"""

from __future__ import annotations

import logging
import selectors
import threading
import time
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

from .backplane import Backplane, BackplaneMessage
from .connection import ServerConnection
from .errors import ConnectionClosed
from .frames import Message
from .stream import PreparedMessage
from .routing import as_message
from .sender import Progress

__all__ = ["FanOut", "drive", "close_all"]

# How often a send queued behind another thread's write is looked at again. That other
# thread writes our frame after its own; the pause only bounds how late we notice.
_BUSY_POLL_SECONDS = 0.005

Predicate = Callable[[ServerConnection], bool]
Logger = Union[logging.Logger, logging.LoggerAdapter]  # type: ignore[type-arg]


def drive(pending: Iterable[Tuple[ServerConnection, int]], deadline: float
          ) -> Tuple[int, List[ServerConnection]]:
    """Drive started non-blocking sends (``(connection, ticket)`` pairs) until each is
    written or ``deadline`` (a ``time.monotonic()`` value) passes.

    Returns how many were written, and the connections whose frame is still not out.
    Connections found closed are left out of both.
    """
    done = 0
    check = list(pending)
    waiting: dict[int, Tuple[ServerConnection, int]] = {}
    busy: List[Tuple[ServerConnection, int]] = []
    selector: Optional[selectors.BaseSelector] = None
    try:
        while True:
            busy = []
            for connection, ticket in check:
                state = connection.progress(ticket)
                if state is Progress.DONE:
                    done += 1
                elif state is Progress.WAIT_WRITER:
                    busy.append((connection, ticket))
                elif state is Progress.WAIT_WRITABLE:
                    fd = connection.fileno()
                    if fd < 0:
                        continue
                    if selector is None:
                        selector = selectors.DefaultSelector()
                    selector.register(fd, selectors.EVENT_WRITE, (connection, ticket))
                    waiting[fd] = (connection, ticket)
            left = deadline - time.monotonic()
            if (not busy and not waiting) or left <= 0:
                break
            check = busy
            if waiting:
                assert selector is not None
                for key, _ in selector.select(min(left, _BUSY_POLL_SECONDS) if busy else left):
                    selector.unregister(key.fd)
                    del waiting[key.fd]
                    check.append(key.data)
            else:
                time.sleep(min(left, _BUSY_POLL_SECONDS))
    finally:
        if selector is not None:
            selector.close()
    unfinished = [c for c, _ in busy] + [c for c, _ in waiting.values()]
    return done, unfinished


def close_all(connections: Iterable[ServerConnection], code: int, reason: str,
              deadline: float) -> List[ServerConnection]:
    """Start the closing handshake with every connection at once, then wait until
    ``deadline`` (a ``time.monotonic()`` value) for the Close frames to go out and the
    connections' threads to finish; abort those that have not.

    Returns the connections whose threads may still be running (all but the calling
    thread's own: a handler shutting its server down does not wait for itself).
    """
    # Every Close frame is started before any is waited for: a client that stopped
    # reading delays nobody else.
    pending = []
    for connection in connections:
        state, ticket = connection.close_nowait(code, reason)
        if state is Progress.WAIT_WRITABLE or state is Progress.WAIT_WRITER:
            pending.append((connection, ticket))
    if pending:
        _, unfinished = drive(pending, deadline)
        for connection in unfinished:
            connection.abort()  # cannot take a Close frame: nothing more to say
    current = threading.current_thread()
    # A connection whose thread has not started yet has no thread: it is waited for.
    others = [c for c in connections if c.thread is not current]
    for connection in others:
        connection.wait_finished(max(0.0, deadline - time.monotonic()))
    for connection in others:
        if not connection.finished:
            connection.abort()  # unblocks its read; a running handler still finishes
    return others


def _in_room(room: str, predicate: Optional[Predicate]) -> Predicate:
    if predicate is None:
        return lambda connection: room in connection.rooms
    return lambda connection: room in connection.rooms and predicate(connection)


class FanOut:
    """Broadcast, rooms and ``send_to`` for one server instance, and what its backplane
    brings from the others.

    ``connections()`` lists the live connections; ``lookup(id)`` finds one.
    """

    def __init__(
        self,
        *,
        connections: Callable[[], Sequence[ServerConnection]],
        lookup: Callable[[str], Optional[ServerConnection]],
        instance_id: Callable[[], str],
        backplane: Optional[Backplane],
        write_timeout: Optional[float],
        logger: Logger,
    ) -> None:
        self._connections = connections
        self._lookup = lookup
        self._instance_id = instance_id
        self._backplane = backplane
        self._default_timeout = write_timeout if write_timeout is not None else 10.0
        self._logger = logger

    def broadcast(self, message: Any, *, room: Optional[str] = None,
                  predicate: Optional[Predicate] = None, timeout: Optional[float] = None) -> int:
        """See :meth:`Server.broadcast`; the number of local clients that got it."""
        data = as_message(message)
        if room is not None and not isinstance(room, str):
            raise TypeError(f"room must be a str, not {type(room).__name__}")
        # Local clients first and directly: they never wait for, nor depend on, the
        # backplane; other instances ignore what we publish back to us.
        sent = self.local(data, predicate if room is None else _in_room(room, predicate),
                          timeout)
        backplane = self._backplane
        if backplane is not None and predicate is None:
            backplane.publish(BackplaneMessage(
                "broadcast" if room is None else "room", data, target=room,
                origin=self._instance_id(),
            ))
        return sent

    def send_to(self, connection_id: str, message: Any) -> bool:
        """See :meth:`Server.send_to`."""
        data = as_message(message)
        connection = self._lookup(connection_id)
        if connection is not None:
            return self._send_one(connection, data)
        owner = connection_id.rpartition("-")[0] if isinstance(connection_id, str) else ""
        backplane = self._backplane
        if backplane is None or not owner or owner == self._instance_id():
            return False
        return backplane.publish(BackplaneMessage(
            "send_to", data, target=connection_id, origin=self._instance_id(),
            destination=owner,
        ))

    def deliver_remote(self, message: BackplaneMessage) -> None:
        """A message another instance published, to our own clients (on the backplane's
        thread)."""
        if message.kind == "send_to":
            connection = self._lookup(message.target or "")
            if connection is not None:
                self._send_one(connection, message.data)
            return
        room = message.target
        predicate = _in_room(room, None) if message.kind == "room" and room else None
        self.local(message.data, predicate, None)

    def local(self, data: Message, predicate: Optional[Predicate],
              timeout: Optional[float]) -> int:
        """Send ``data`` to this instance's clients that ``predicate`` picks (all when
        ``None``) within ``timeout`` seconds; how many got the whole message."""
        limit = timeout if timeout is not None else self._default_timeout
        deadline = time.monotonic() + limit
        prepared = PreparedMessage(data)
        sent = 0
        pending: List[Tuple[ServerConnection, int]] = []
        for connection in self._connections():
            if predicate is not None and not predicate(connection):
                continue
            state, ticket = connection.try_send(prepared)
            if state is Progress.DONE:
                sent += 1
            elif state is not Progress.CLOSED:
                pending.append((connection, ticket))
        if pending:
            done, unfinished = drive(pending, deadline)
            sent += done
            for connection in unfinished:
                self._logger.warning(
                    "connection %s: too slow to take a broadcast within %.3gs; dropping it",
                    connection.id, limit,
                )
                connection.drop("broadcast write timed out")
        return sent

    def _send_one(self, connection: ServerConnection, data: Message) -> bool:
        try:
            connection.send(data)
        except ConnectionClosed as exc:  # gone meanwhile
            self._logger.debug("connection %s: not delivered: %s", connection.id, exc)
            return False
        return True
