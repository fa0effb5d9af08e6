"""The route registry: each route's handler, in a dict guarded by a ``threading.Lock``.

Handlers are called outside the lock, and connection threads do not take it for each
message: every change, made under the lock, also hands the dispatcher a fresh copy of
the dict, which nobody changes afterwards, and lookups read the copy handed over last.
With hundreds of threads, a lock taken per message is where they queue: a thread that
loses the GIL while holding it stalls every other one that needs it.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List

from .routing import Dispatcher, Handler, resolve_handler

__all__ = ["Routes"]


class Routes:
    """The routes of one server; every change is published to ``dispatcher``."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._handlers: Dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._dispatcher = dispatcher
        self._publish()

    def register(self, route: str, handler: Any) -> bool:
        """Register ``handler`` (see :func:`~wsroute_sync.routing.resolve_handler`) for
        ``route``, replacing the one it had; ``True`` if it had one."""
        if not isinstance(route, str):
            raise TypeError(f"route must be a str, not {type(route).__name__}")
        resolved = resolve_handler(handler)
        with self._lock:
            replaced = route in self._handlers
            self._handlers[route] = resolved
            self._publish()
        return replaced

    def unregister(self, route: str) -> None:
        """Remove ``route``; raises ``KeyError`` if it is not registered."""
        with self._lock:
            del self._handlers[route]
            self._publish()

    def names(self) -> List[str]:
        """The registered route names."""
        with self._lock:
            return list(self._handlers)

    def _publish(self) -> None:
        # Called with the lock held (or before anyone else can see this object). The
        # dispatcher looks routes up, without the lock, in a copy that is never changed
        # afterwards; replacing its lookup is one attribute store, so a message sees
        # either the old routes or the new ones.
        self._dispatcher.lookup = dict(self._handlers).get
