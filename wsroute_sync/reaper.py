"""One thread per server that drops connections whose Close went unanswered in time."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, List, Optional, Tuple

from .connection import ServerConnection

__all__ = ["Reaper"]


class Reaper:
    """One thread for the whole server that drops connections whose Close went unanswered
    within ``close_timeout`` seconds (``None``: never).

    A Close started from another thread (``server.close()``, ``connection.close()``)
    cannot shorten the read timeout the connection thread is already blocked in, so the
    deadline is kept here instead of in a timer per connection.
    """

    def __init__(self, name: str, logger: Any, close_timeout: Optional[float]) -> None:
        self._heap: List[Tuple[float, int, ServerConnection]] = []
        self._cond = threading.Condition(threading.Lock())
        self._counter = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._name = name
        self._logger = logger
        self._close_timeout = close_timeout

    def schedule(self, connection: ServerConnection) -> None:
        """Drop ``connection`` if it has not finished within ``close_timeout``."""
        delay = self._close_timeout
        if delay is None:
            return
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._counter), connection))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, connection = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                if not connection.finished:
                    self._logger.info(
                        "connection %s: no Close answer within close_timeout, dropping",
                        connection.id,
                    )
                    connection.abort()
