"""One thread per server that pings every open connection each ``ping_interval``, paced,
and fails the ones whose Pong does not come within ``ping_timeout``.

Why not let each connection thread ping its own client when its read times out: a
thread woken by a timeout is far costlier than one woken by data. Measured on the 2-core
benchmark machine with 6,000 connections opened within 4 s, their first round of pings
(all due within those 4 s) cost 8.5 CPU-seconds when each connection thread sent its
own, and 0.45 CPU-seconds when one thread sent them all at the same rate; with 19,000
connections the first way never recovered (load average over 8,000), the second held
them at 8 % of a core. Each ping now wakes its connection's thread once, for the Pong,
as any message would.

Pings are paced: at most about twice the steady rate (connections / ``ping_interval``)
go out per second, so a crowd of connections that arrived together is spread out
rather than pinged, and answered, all at once.

The thread touches connections only through their public methods
(:meth:`~wsroute_sync.connection.ServerConnection.ping_nowait`, ``progress``,
:meth:`~wsroute_sync.connection.ServerConnection.expire_ping`), and never while it holds
its own lock, so that a connection calling :meth:`Keepalive.add` under its locks cannot
deadlock with it. A Ping the socket does not take at once is retried every 0.1 s, never
waited for, until it is out or the connection closes: one client that reads slowly holds
up no other's Ping.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any, Callable, Dict, List, Optional, OrderedDict, Set, Tuple, TypeVar

from .connection import ServerConnection
from .sender import Progress

__all__ = ["Keepalive"]

_T = TypeVar("_T")

#: Seconds between two batches of pings when more are due than one batch may send.
_TICK = 0.01
#: The smallest batch: small servers ping without pacing they do not need.
_MIN_BATCH = 8
#: Seconds without a connection after which the thread ends.
_IDLE_EXIT = 1.0
#: Seconds between two tries at the rest of a Ping the socket did not take at once (a
#: client reading slowly, or another thread writing to it).
_RETRY = 0.1


class Keepalive:
    """Pings each added connection every ``interval`` seconds and fails it (Close 1011)
    when no Pong comes within ``timeout`` seconds; ``interval=None`` turns it off,
    ``timeout=None`` waits for Pongs forever."""

    def __init__(self, name: str, logger: Any, *, interval: Optional[float],
                 timeout: Optional[float]) -> None:
        self._interval = interval
        self._timeout = timeout
        self._name = name
        self._logger = logger
        self._cond = threading.Condition(threading.Lock())
        # Connection -> when it is due. Every entry is added with the same delay from
        # "now", so insertion order is deadline order: the first entry is the next due,
        # and adding, rescheduling and removing are O(1).
        self._ping_due: OrderedDict[ServerConnection, float] = collections.OrderedDict()
        self._pong_due: OrderedDict[ServerConnection, float] = collections.OrderedDict()
        # What the thread has taken out to ping or expire and not yet put back; a
        # connection that ends meanwhile leaves it, so that it is not put back.
        self._taken: Set[ServerConnection] = set()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    def add(self, connection: ServerConnection) -> None:
        """Ping ``connection`` from ``interval`` seconds on, until :meth:`discard`."""
        interval = self._interval
        if interval is None:
            return
        with self._cond:
            if self._stopped:
                return
            # The thread looks again within _IDLE_EXIT seconds anyway; it needs waking
            # only for a first Ping due sooner. Churn adds and discards thousands of
            # connections a second: waking the thread for each would cost more.
            wake = interval < _IDLE_EXIT and not self._ping_due and not self._pong_due
            self._ping_due[connection] = time.monotonic() + interval
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name,
                                                daemon=True)
                self._thread.start()
            elif wake:
                self._cond.notify()

    def discard(self, connection: ServerConnection) -> None:
        """Forget ``connection`` (it has ended)."""
        if self._interval is None:
            return
        with self._cond:
            self._ping_due.pop(connection, None)
            self._pong_due.pop(connection, None)
            self._taken.discard(connection)

    def stop(self) -> None:
        """Stop pinging and wait for the thread to end."""
        with self._cond:
            self._stopped = True
            self._ping_due.clear()
            self._pong_due.clear()
            self._taken.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        unsent: Dict[ServerConnection, int] = {}  # Pings not all written yet: tickets
        retry_at = 0.0
        while True:
            with self._cond:
                now = self._wait(retry_at if unsent else None)
                if now is None:
                    return
                to_ping, to_expire, more = self._take(now)
            retry_at = self._turn(now, to_ping, to_expire, unsent, retry_at)
            # Nothing here refers to a connection while the thread waits: one that ends
            # meanwhile is freed at once (discard() drops the references that count).
            del to_ping, to_expire
            with self._cond:
                if self._stopped:
                    return
                if more:
                    self._cond.wait(_TICK)  # pacing: the rest of what is due, next tick

    def _turn(self, now: float, to_ping: List[ServerConnection],
              to_expire: List[ServerConnection], unsent: Dict[ServerConnection, int],
              retry_at: float) -> float:
        """Retry the Pings not all written, expire, ping, and put the connections back
        in line; returns when to retry next."""
        if unsent and retry_at <= now:
            for connection, ticket in list(unsent.items()):
                state = self._guarded(connection, lambda: connection.progress(ticket),
                                      Progress.CLOSED)
                if state is Progress.DONE or state is Progress.CLOSED:
                    del unsent[connection]
            retry_at = now + _RETRY
        later = [c for c in to_expire if not self._guarded(c, c.expire_ping, True)]
        pinged: List[ServerConnection] = []
        for connection in to_ping:
            state, ticket = self._guarded(connection, connection.ping_nowait,
                                          (Progress.CLOSED, 0))
            if state is Progress.CLOSED:
                continue  # closing: forgotten
            pinged.append(connection)
            if state is not Progress.DONE:
                if not unsent:
                    retry_at = now + _RETRY
                unsent[connection] = ticket
        with self._cond:
            if not self._stopped:
                self._reschedule(pinged, later)
        return retry_at

    def _wait(self, retry_at: Optional[float]) -> Optional[float]:
        """Wait (lock held) until something is due; the time then, or ``None`` for the
        thread to end: stopped, or nothing to do for a while (:meth:`add` starts another;
        a server used only through ``serve_socket`` is never closed)."""
        idle_since = None
        while not self._stopped:
            now = time.monotonic()
            due = [d for d in (_first(self._ping_due), _first(self._pong_due), retry_at)
                   if d is not None]
            if not due:
                if idle_since is None:
                    idle_since = now
                elif now - idle_since >= _IDLE_EXIT:
                    self._thread = None
                    return None
                self._cond.wait(_IDLE_EXIT)
            elif min(due) > now:
                # At most _IDLE_EXIT: then it notices when the last connection has gone.
                self._cond.wait(min(min(due) - now, _IDLE_EXIT))
            else:
                return now
        return None

    def _take(self, now: float) -> Tuple[List[ServerConnection], List[ServerConnection], bool]:
        """Take out (lock held) what is due: a batch of Pings, every expired Pong wait, and
        whether more Pings are due."""
        assert self._interval is not None
        # At most about twice the steady rate (connections / interval per second).
        batch = max(_MIN_BATCH, math.ceil(2 * len(self._ping_due) * _TICK / self._interval))
        to_ping = _take_due(self._ping_due, now, batch)
        to_expire = _take_due(self._pong_due, now, None)
        self._taken.update(to_ping)
        self._taken.update(to_expire)
        first = _first(self._ping_due)
        return to_ping, to_expire, first is not None and first <= now

    def _reschedule(self, pinged: List[ServerConnection], later: List[ServerConnection]
                    ) -> None:
        """Put (lock held) the connections just pinged back in line, and those whose Ping
        still waits behind a reply they are reading."""
        interval, timeout = self._interval, self._timeout
        assert interval is not None
        now = time.monotonic()
        # Those that ended since they were taken out (discard()) are not put back: they
        # would be held, connection, socket and all, until their next turn.
        taken = self._taken
        if timeout is not None:  # else nothing waits for a Pong, and later is empty
            for connection in later:
                if connection in taken:
                    self._pong_due[connection] = now + timeout
        for connection in pinged:
            if connection not in taken:
                continue
            self._ping_due[connection] = now + interval
            if timeout is not None and connection not in self._pong_due:
                self._pong_due[connection] = now + timeout
        taken.clear()

    def _guarded(self, connection: ServerConnection, call: Callable[[], _T], failed: _T) -> _T:
        # A connection's failure must not end the thread that keeps all others alive:
        # logged, it counts as closed.
        try:
            return call()
        except Exception:
            self._logger.error("connection %s: keepalive failed", connection.id,
                               exc_info=True)
            return failed


def _first(due: "OrderedDict[ServerConnection, float]") -> Optional[float]:
    return next(iter(due.values()), None)


def _take_due(due: "OrderedDict[ServerConnection, float]", now: float,
              limit: Optional[int]) -> List[ServerConnection]:
    """Remove and return the connections due by ``now``, at most ``limit``."""
    taken: List[ServerConnection] = []
    while due and (limit is None or len(taken) < limit):
        connection, when = next(iter(due.items()))
        if when > now:
            break
        del due[connection]
        taken.append(connection)
    return taken
