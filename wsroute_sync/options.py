"""Server options: one validated record of every keyword of :class:`~wsroute_sync.Server`.

``None`` switches a feature off. The Go seed's functional options are aliases over the
same keywords (:mod:`wsroute_sync.functional`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, Union

from .backplane import Backplane
from .limits import check_client_ip_header, check_trusted_proxies
from .pool import check_thread_policy

if TYPE_CHECKING:  # pragma: no cover - imported for annotations only
    from .http import HTTPRequest

__all__ = [
    "ServerOptions",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_MAX_HEADER_SIZE",
]

#: The Go original's default: a thread per connection makes this a memory budget too.
DEFAULT_MAX_CONNECTIONS = 1000
#: 1 MiB bounds the memory one client can pin; raise it for bulk transfers.
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20
#: The whole HTTP request head (request line plus headers), as a browser sends 1-4 KiB.
DEFAULT_MAX_HEADER_SIZE = 16 << 10

OriginCheck = Callable[["HTTPRequest"], bool]


def _check_timeout(name: str, value: Optional[float]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (or None to switch it off), got {value!r}")


def _check_size(name: str, value: Optional[int], *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """The validated options of a server; see :class:`~wsroute_sync.Server` for each."""

    # Limits
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    max_pending_handshakes: Union[int, str, None] = "auto"
    # Per-client limits
    max_connections_per_ip: Optional[int] = None
    message_rate: Optional[float] = None
    message_burst: Optional[int] = None
    trusted_proxies: Optional[Tuple[str, ...]] = None
    client_ip_header: str = "X-Forwarded-For"
    # Timeouts, in seconds
    handshake_timeout: Optional[float] = 10.0
    ping_interval: Optional[float] = 20.0
    ping_timeout: Optional[float] = 20.0
    write_timeout: Optional[float] = 10.0
    close_timeout: Optional[float] = 10.0
    handler_timeout: Optional[float] = 10.0
    # Protocol
    path: Optional[Tuple[str, ...]] = None
    subprotocols: Optional[Tuple[str, ...]] = None
    compression: Optional[str] = None
    # Security
    allowed_origins: Optional[Tuple[str, ...]] = None
    check_origin: Optional[OriginCheck] = None
    authenticate: Optional[Callable[..., Any]] = None
    # Plain HTTP endpoints
    health_path: Optional[str] = "/healthz"
    metrics_path: Optional[str] = "/metrics"
    # Scale-out
    backplane: Optional[Backplane] = None
    # Threads
    thread_policy: Optional[str] = "auto"
    # Logging
    logger: Optional[Union[logging.Logger, logging.LoggerAdapter]] = None  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        _check_size("max_connections", self.max_connections, allow_none=False)
        _check_size("max_message_size", self.max_message_size)
        _check_size("max_header_size", self.max_header_size, allow_none=False)
        if self.max_header_size < 256:
            raise ValueError("max_header_size must be at least 256 bytes")
        _check_size("max_connections_per_ip", self.max_connections_per_ip)
        _check_size("message_burst", self.message_burst)
        _check_timeout("message_rate", self.message_rate)  # a positive number or None
        if self.message_burst is not None and self.message_rate is None:
            raise ValueError("message_burst needs message_rate")
        check_client_ip_header(self.client_ip_header)
        if self.trusted_proxies is not None:
            object.__setattr__(self, "trusted_proxies",
                               check_trusted_proxies(self.trusted_proxies))
        if self.max_pending_handshakes != "auto":
            _check_size("max_pending_handshakes", self.max_pending_handshakes)  # type: ignore[arg-type]
        for name in (
            "handshake_timeout",
            "ping_interval",
            "ping_timeout",
            "write_timeout",
            "close_timeout",
            "handler_timeout",
        ):
            _check_timeout(name, getattr(self, name))
        if self.compression not in (None, "deflate"):
            raise ValueError(f"compression must be 'deflate' or None, got {self.compression!r}")
        for name in ("path", "subprotocols", "allowed_origins"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a string, a sequence of strings or None")
            if not value:
                raise ValueError(f"{name} must not be empty (use None to switch it off)")
            object.__setattr__(self, name, tuple(value))
        if self.path is not None:
            for p in self.path:
                if not p.startswith("/"):
                    raise ValueError(f"path entries must start with '/', got {p!r}")
        for name in ("health_path", "metrics_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.startswith("/")):
                raise ValueError(f"{name} must be a path starting with '/' or None")
        for name in ("check_origin", "authenticate"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable or None")
        if self.check_origin is not None and self.allowed_origins is not None:
            raise ValueError("give check_origin or allowed_origins, not both")
        if self.backplane is not None and not isinstance(self.backplane, Backplane):
            raise TypeError("backplane must be a wsroute_sync.Backplane (e.g. RedisBackplane) "
                            "or None")
        check_thread_policy(self.thread_policy, allow_auto=True)
        if self.logger is not None and not isinstance(
            self.logger, (logging.Logger, logging.LoggerAdapter)
        ):
            raise TypeError("logger must be a logging.Logger or LoggerAdapter")
