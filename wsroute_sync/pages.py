"""Plain HTTP pages: the answer to a request that asks for no WebSocket upgrade (health,
metrics, the application's own pages, else 426 Upgrade Required).

A page runs in the connection's thread before any upgrade; its registry is a dict
guarded by a ``threading.Lock``, and the page is called outside it.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Callable, Dict, Optional, Tuple, Union

from .http import HTTPRequest, http_response

__all__ = ["Pages", "HTTPHandler"]

#: A plain HTTP page: ``handler(request) -> (status, content_type, body)``.
HTTPHandler = Callable[[HTTPRequest], Tuple[int, str, Union[bytes, str]]]
_Logger = Union[logging.Logger, logging.LoggerAdapter]  # type: ignore[type-arg]

_UPGRADE_REQUIRED = "This is a WebSocket endpoint: connect with a WebSocket client.\n"


class Pages:
    """The plain HTTP side of one server.

    The health page tells ``closing()`` (served with 503), ``active()`` connections and
    ``max_connections``; the metrics page serves ``metrics()``, the Prometheus text. A
    ``None`` path switches that page off.
    """

    def __init__(
        self,
        *,
        health_path: Optional[str],
        metrics_path: Optional[str],
        closing: Callable[[], bool],
        active: Callable[[], int],
        max_connections: int,
        metrics: Callable[[], str],
        logger: _Logger,
    ) -> None:
        self._health_path = health_path
        self._metrics_path = metrics_path
        self._closing = closing
        self._active = active
        self._max_connections = max_connections
        self._metrics = metrics
        self._logger = logger
        self._pages: Dict[str, HTTPHandler] = {}
        self._lock = threading.Lock()

    def register(self, path: str, handler: HTTPHandler) -> None:
        """Serve ``handler`` for plain ``GET``/``HEAD`` requests of ``path``."""
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError("an HTTP path starts with '/'")
        if not callable(handler):
            raise TypeError("an HTTP handler is a callable handler(request)")
        with self._lock:
            self._pages[path] = handler

    def answer(self, request: HTTPRequest) -> bytes:
        """The whole HTTP response to a request that does not ask for an upgrade."""
        head_only = request.method == "HEAD"
        if request.method in ("GET", "HEAD"):
            if self._health_path is not None and request.path == self._health_path:
                closing = self._closing()
                health = {
                    "status": "closing" if closing else "ok",
                    "active_connections": self._active(),
                    "max_connections": self._max_connections,
                }
                return http_response(503 if closing else 200, json.dumps(health),
                                     content_type="application/json", head_only=head_only)
            if self._metrics_path is not None and request.path == self._metrics_path:
                return http_response(
                    200, self._metrics(), head_only=head_only,
                    content_type="text/plain; version=0.0.4; charset=utf-8",
                )
            with self._lock:
                page = self._pages.get(request.path)
            if page is not None:
                try:
                    status, content_type, body = page(request)
                except Exception:
                    self._logger.error("HTTP handler for %s failed", request.path,
                                       exc_info=True)
                    return http_response(500, "internal error\n", head_only=head_only)
                return http_response(status, body, content_type=content_type,
                                     head_only=head_only)
        return http_response(
            426, _UPGRADE_REQUIRED,
            headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"),
                     ("Sec-WebSocket-Version", "13")],
            head_only=head_only,
        )
