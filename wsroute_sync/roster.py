"""The live connections of one server: the slots they hold, their count per client
address, their ids and the table of them by id, and the numbers of those that ended.

A connection is admitted with a slot of a bounded semaphore, taken without waiting (over
the limit the client gets 503 before any upgrade), and registered under the roster's
lock before its thread starts, so that shutdown never misses one; it gives the slot
back when it ends, from its thread's ``finally`` beside the socket close.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from typing import Any, Callable, Dict, List, Optional, Union

from .connection import ServerConnection
from .http import HTTPRequest, http_response
from .limits import PerClientCounter, client_address
from .metrics import Totals, render_prometheus
from .options import ServerOptions

__all__ = ["Roster"]

_Logger = Union[logging.Logger, logging.LoggerAdapter]  # type: ignore[type-arg]


class Roster:
    """Admission's bookkeeping for one server (see the module docstring)."""

    def __init__(self, options: ServerOptions, logger: _Logger) -> None:
        self.max_connections = options.max_connections
        self._options = options
        self._logger = logger
        self._slots = threading.BoundedSemaphore(options.max_connections)
        per_ip = options.max_connections_per_ip
        self._per_ip = None if per_ip is None else PerClientCounter(per_ip)
        self._ip_of: Dict[str, str] = {}  # connection id -> the address it counts under
        self._live: Dict[str, ServerConnection] = {}
        self._lock = threading.Lock()
        self._totals = Totals()
        self._sealed = False
        self._ids = itertools.count(1)
        #: This instance's id: every connection id is ``f"{instance_id}-{n}"``, so that
        #: ``send_to`` can tell, through a backplane, which instance holds a client.
        self.instance_id = secrets.token_hex(4)

    def renew_instance_id(self) -> None:
        """A new :attr:`instance_id`, for a freshly forked worker process."""
        self.instance_id = secrets.token_hex(4)

    def admit(self, remote: Any, request: HTTPRequest,
              connect: Callable[[str], ServerConnection]
              ) -> Union[bytes, ServerConnection]:
        """A slot for a complete request head and the connection ``connect(id)`` makes,
        registered; or the answer refusing it (503 full or closing, 429 per client)."""
        if not self._slots.acquire(blocking=False):
            with self._lock:
                self._totals.rejected += 1
            self._logger.warning(
                "too many connections (max %d): refusing %s with 503", self.max_connections,
                remote,
            )
            return http_response(503, "Too many connections\n",
                                 headers=[("Retry-After", "1")])
        ip: Optional[str] = None
        if self._per_ip is not None:
            options = self._options
            ip = client_address(request, remote, trusted_proxies=options.trusted_proxies,
                                header=options.client_ip_header)
            if not self._per_ip.acquire(ip):
                self._slots.release()
                with self._lock:
                    self._totals.rejected += 1
                self._logger.warning(
                    "too many connections from %s (max %d): refusing with 429", ip,
                    options.max_connections_per_ip,
                )
                return http_response(429, "Too many connections from this address\n",
                                     headers=[("Retry-After", "1")])
        connection = connect(f"{self.instance_id}-{next(self._ids)}")
        with self._lock:
            if not self._sealed:
                # Registered before it starts, so close() never misses a connection.
                self._live[connection.id] = connection
                if ip is not None:
                    self._ip_of[connection.id] = ip
                self._totals.accepted += 1
                return connection
        if ip is not None and self._per_ip is not None:
            self._per_ip.release(ip)
        self._slots.release()
        return http_response(503, "server shutting down\n")

    def done(self, connection: ServerConnection) -> None:
        """A connection has ended: forget it, count it, free its slot."""
        with self._lock:
            self._live.pop(connection.id, None)
            ip = self._ip_of.pop(connection.id, None)
            self._totals.add(connection.metrics)
        if ip is not None and self._per_ip is not None:
            self._per_ip.release(ip)
        self._slots.release()
        self._logger.debug(
            "connection %s: closed (%s %s)", connection.id, connection.close_code,
            connection.close_reason,
        )

    def seal(self) -> List[ServerConnection]:
        """Admit nobody any more; the connections still live, a list no one joins."""
        with self._lock:
            self._sealed = True
            return list(self._live.values())

    def connections(self) -> List[ServerConnection]:
        """The live connections."""
        with self._lock:
            return list(self._live.values())

    def get(self, connection_id: str) -> Optional[ServerConnection]:
        """The live connection with this id, if any."""
        with self._lock:
            return self._live.get(connection_id)

    def count(self) -> int:
        """How many connections are live."""
        with self._lock:
            return len(self._live)

    def serves(self, thread: threading.Thread) -> bool:
        """True if ``thread`` is the thread of a live connection."""
        with self._lock:
            return any(c.thread is thread for c in self._live.values())

    def stats(self) -> Dict[str, Any]:
        """Connections, messages, errors and handler latency (see ``Server.stats``)."""
        with self._lock:
            live = [c.metrics for c in self._live.values()]
            totals = self._totals.snapshot(live)
        return {
            "active": len(live),
            "max": self.max_connections,
            "accepted": totals.accepted,
            "rejected": totals.rejected,
            "messages_in": totals.messages_in,
            "messages_out": totals.messages_out,
            "errors": dict(sorted(totals.errors.items())),
            "handler_latency": totals.latency_summary(),
        }

    def metrics_text(self) -> str:
        """The same numbers in the Prometheus text format."""
        with self._lock:
            live = [c.metrics for c in self._live.values()]
            totals = self._totals.snapshot(live)
        return render_prometheus({"active": len(live), "max": self.max_connections}, totals)
