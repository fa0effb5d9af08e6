"""Server options: one validated record of every keyword of :class:`~wsroute_sync.Server`.

``None`` switches a feature off. The Go seed's functional options are aliases over the
same keywords (:mod:`wsroute_sync.functional`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable, FrozenSet, Optional, Tuple, Union

from .backplane import Backplane
from .limits import check_client_ip_header, check_trusted_proxies
from .pool import check_cpu_affinity, check_thread_policy

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
    """The validated options of a server: every keyword of :class:`~wsroute_sync.Server`
    but ``message_handler``. ``None`` switches a feature off.

    Limits:
        max_connections: open connections at once (default 1000); one more gets
            HTTP 503 "Too many connections" with ``Retry-After`` before any upgrade.
        max_message_size: bytes in one message, after reassembly and decompression
            (default 1 MiB); more closes the connection with 1009.
        max_header_size: bytes of the HTTP request head (default 16 KiB); more gets 431
            (414 when the request line alone is longer).
        max_pending_handshakes: accepted sockets still waiting for their request head (or
            TLS handshake); they wait in the accept loop, without a thread or a slot.
            Past it the oldest is dropped. ``"auto"`` (default): what the process's file
            descriptor limit leaves beside ``max_connections``; ``None``: no bound.

    Per-client limits (off by default):
        max_connections_per_ip: open connections from one client address; one more
            gets HTTP 429 "Too many connections from this address" before any upgrade.
        message_rate, message_burst: messages per second a connection may send (a token
            bucket holding ``message_burst`` tokens, default ``max(1, message_rate)``);
            a message over it is not handled and gets the error envelope
            ``{"code":1,"msg":"rate limit exceeded","data":null}``.
        trusted_proxies: addresses or networks (``"10.0.0.0/8"``) of proxies whose
            ``client_ip_header`` (default ``X-Forwarded-For``) names the client; from
            any other peer the header is ignored and the peer's address counts.

    Timeouts (seconds):
        handshake_timeout: to receive the whole request head (default 10); else 408.
        ping_interval, ping_timeout: every open connection is pinged each
            ``ping_interval`` and closed with 1011 if no pong comes within
            ``ping_timeout`` (defaults 20 and 20); one thread pings them all.
        write_timeout: a write that makes no progress for this long drops the client
            (default 10), so a client that stops reading cannot pin a thread.
        close_timeout: how long to wait for the client's answer to our Close (default 10).
        handler_timeout: a handler's deadline (default 10), on ``ctx.deadline``.
            Python cannot stop a thread, so it is cooperative; overruns are logged.

    Protocol:
        path: accept upgrades only on this path (or these paths); default: any path.
        subprotocols: subprotocols the server speaks, in order of preference.
        compression: ``"deflate"`` to offer permessage-deflate (RFC 7692); default off,
            because it costs more CPU than it saves on small JSON messages.

    Security:
        allowed_origins: origins allowed to connect (``["*"]`` for any); default: the
            gorilla rule, no ``Origin`` or an ``Origin`` whose host equals ``Host``.
        check_origin: ``check_origin(request) -> bool`` instead of that rule.
        authenticate: ``authenticate(request) -> identity`` run before the upgrade; a
            falsy result refuses with 403, raising ``HandshakeRejected`` picks the status.

    HTTP:
        health_path: plain ``GET`` answered with the server's health (default
            ``/healthz``); metrics_path: Prometheus text (default ``/metrics``).

    Scale-out:
        backplane: a :class:`~wsroute_sync.Backplane` such as ``RedisBackplane(url)``;
            ``broadcast()`` (with or without ``room=``) and ``send_to()`` then reach the
            clients of every instance that shares it; default: this process only.

    Threads:
        thread_policy: ``"batch"`` runs connection threads under Linux's ``SCHED_BATCH``
            policy, so that hundreds of threads waking up to wait for the GIL do not
            preempt the one holding it; ``None`` leaves them under the policy they
            inherit. ``"auto"`` (default): ``"batch"`` in a single server process,
            ``None`` in the worker processes of ``serve(workers=N)``, where it measured
            slower. Elsewhere, or where the system refuses, batch changes nothing.
        cpu_affinity: bind the server's threads (the accept loop, and every connection
            thread) to CPUs: ``"one"`` is one CPU of those the process may use, a
            different one in each worker process of ``serve(workers=N)``; or a set of
            CPU numbers. With the threads on one core a hand-over of the GIL wakes no
            other core, which more than doubled busy round trips on the benchmark
            machine. The price: code that releases the GIL (TLS, compression, C
            extensions in handlers) no longer runs on another core beside Python, the
            threads cannot move off a CPU that other programs keep busy, and threads
            started from a handler inherit the binding. Default ``None``: the system
            places the threads. Linux only; elsewhere, or where the system refuses,
            nothing changes.

    Logging:
        logger: where records go (default ``logging.getLogger("wsroute_sync.server")``).
    """

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
    cpu_affinity: Union[None, str, FrozenSet[int]] = None
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
        object.__setattr__(self, "cpu_affinity", check_cpu_affinity(self.cpu_affinity))
        if self.logger is not None and not isinstance(
            self.logger, (logging.Logger, logging.LoggerAdapter)
        ):
            raise TypeError("logger must be a logging.Logger or LoggerAdapter")
