"""Limits and budgets, sans-I/O: connections per client address, a message rate per
connection, which address a request counts under behind trusted proxies, how many
sockets may wait for their handshake, and how often a refusal may be logged.

No sockets and no clocks here: the server asks, passing the time where it matters. The
per-address counter takes a ``threading.Lock`` because connection threads release it.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from .http import HTTPRequest

try:
    import resource
except ImportError:  # pragma: no cover - Windows: the package must still import
    resource = None  # type: ignore[assignment]

__all__ = [
    "PerClientCounter",
    "TokenBucket",
    "client_address",
    "check_trusted_proxies",
    "check_client_ip_header",
    "LOCAL_CLIENT",
    "MAX_LINGERING",
    "default_max_pending",
    "WarningThrottle",
]

_Logger = Union[logging.Logger, logging.LoggerAdapter]  # type: ignore[type-arg]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
#: The key every unix-socket client counts under: they have no address of their own.
#: As an entry of ``trusted_proxies`` it trusts the header from unix-socket peers (a
#: reverse proxy on the same host that connects through the socket).
LOCAL_CLIENT = "unix"

# RFC 9110 5.1: a field name is a token.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class PerClientCounter:
    """How many connections each client address holds, at most ``limit`` each;
    thread-safe.

    Entries exist only while an address holds a connection: an attacker cycling through
    addresses leaves no memory behind.
    """

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit!r}")
        self.limit = limit
        self._counts: Dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> bool:
        """Count one more connection for ``key``; ``False`` (nothing counted) at the limit."""
        with self._lock:
            held = self._counts.get(key, 0)
            if held >= self.limit:
                return False
            self._counts[key] = held + 1
            return True

    def release(self, key: str) -> None:
        """Count one connection of ``key`` less (one that :meth:`acquire` counted)."""
        with self._lock:
            held = self._counts.get(key, 0) - 1
            if held > 0:
                self._counts[key] = held
            else:
                self._counts.pop(key, None)

    def count(self, key: str) -> int:
        """Connections ``key`` holds now."""
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        """Addresses holding at least one connection."""
        return len(self._counts)


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; one message takes one.

    Starts full. Sans-I/O: the caller passes the time (``time.monotonic()``), so tests
    drive it with a clock of their own.
    """

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: int) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise TypeError(f"rate must be a number, not {type(rate).__name__}")
        if isinstance(burst, bool) or not isinstance(burst, int):
            raise TypeError(f"burst must be an int, not {type(burst).__name__}")
        if not rate > 0 or burst < 1:  # "not >" refuses NaN too
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._last: Optional[float] = None

    def take(self, now: float) -> bool:
        """Take a token at time ``now``; ``False`` if none is left."""
        last = self._last
        tokens = self._tokens
        if last is None or now > last:
            if last is not None:
                tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            # Never backwards: an earlier ``now`` must not earn the same time twice.
            self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


def check_trusted_proxies(proxies: Any) -> Tuple[str, ...]:
    """Validate ``trusted_proxies``: addresses, networks (``"10.0.0.0/8"``) or ``"unix"``;
    the normalised tuple. Raises ``TypeError``/``ValueError`` saying what is wrong."""
    if isinstance(proxies, str):
        proxies = (proxies,)
    if not isinstance(proxies, (list, tuple)) or not proxies:
        raise TypeError("trusted_proxies must be a non-empty list of addresses or networks")
    out = []
    for entry in proxies:
        if not isinstance(entry, str):
            raise TypeError(f"trusted_proxies entries are strings, not {type(entry).__name__}")
        if entry.strip() == LOCAL_CLIENT:
            out.append(LOCAL_CLIENT)
            continue
        try:
            out.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
        except ValueError:
            raise ValueError(
                f"trusted_proxies: {entry!r} is not an address, a network or 'unix'"
            ) from None
    return tuple(out)


def check_client_ip_header(name: Any) -> str:
    """Validate ``client_ip_header``: an HTTP field name (``X-Forwarded-For``,
    ``X-Real-IP``, ``Forwarded``...)."""
    if not isinstance(name, str):
        raise TypeError(f"client_ip_header must be a header name, not {type(name).__name__}")
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"client_ip_header: {name!r} is not an HTTP header name")
    return name


@functools.lru_cache(maxsize=16)
def _networks(proxies: Tuple[str, ...]) -> Tuple[Network, ...]:
    # Cached: parsing a few networks costs ~20 us, a fifth of a short connection.
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies if p != LOCAL_CLIENT)


def _parse_ip(text: str) -> Optional[Address]:
    """An address from a header hop or a peer: ``v4``, ``v4:port``, ``v6``, ``[v6]:port``."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: one client, one key.
        return address.ipv4_mapped
    return address


def _hops(request: HTTPRequest, header: str) -> list[str]:
    """The addresses in ``header``, in order (repeated headers joined, RFC 9110 5.3)."""
    values = request.headers.get_all(header)
    if header.lower() != "forwarded":
        return [hop for value in values for hop in value.split(",")]
    # RFC 7239 4: elements "for=...;proto=...", the address possibly quoted and bracketed.
    hops = []
    for value in values:
        for element in value.split(","):
            hop = ""
            for pair in element.split(";"):
                name, _, param = pair.partition("=")
                if name.strip().lower() == "for":
                    hop = param.strip().strip('"')
            hops.append(hop)
    return hops


def client_address(request: HTTPRequest, peer: Any, *,
                   trusted_proxies: Optional[Sequence[str]],
                   header: str = "X-Forwarded-For") -> str:
    """The address a request counts under, as text (IPv4-mapped IPv6 as IPv4).

    The peer's own address, unless the peer is a trusted proxy: then the right-most
    address in ``header`` that is not itself a trusted proxy. Right-most, because each
    proxy appends the address it received the request from: everything left of what our
    own proxies appended was written by the client and proves nothing, so a client that
    sends ``X-Forwarded-For: 1.2.3.4`` only adds a hop our proxies then step past.
    A hop that is not an address (``unknown``, junk) stops the walk and the proxy's own
    address counts, so junk cannot mint fresh keys.

    Unix-socket peers count as :data:`LOCAL_CLIENT`, unless ``"unix"`` is among the
    trusted proxies: then the header names the client. ``header`` may be ``Forwarded``
    (RFC 7239; its ``for=`` parameters are read).
    """
    proxies = tuple(trusted_proxies) if trusted_proxies else ()
    networks = _networks(proxies) if proxies else ()
    if not isinstance(peer, tuple) or not peer:
        if LOCAL_CLIENT not in proxies:
            return LOCAL_CLIENT
        fallback = LOCAL_CLIENT
    else:
        peer_ip = _parse_ip(str(peer[0]))
        if peer_ip is None:
            return str(peer[0])
        fallback = str(peer_ip)
        if not any(peer_ip in net for net in networks):
            return fallback
    for hop in reversed(_hops(request, header)):
        ip = _parse_ip(hop)
        if ip is None:
            return fallback
        if not any(ip in net for net in networks):
            return str(ip)
        fallback = str(ip)
    return fallback


# Refused sockets lingering at once (admission); past it the oldest is closed at once.
MAX_LINGERING = 512
# default_max_pending: descriptors kept for everything that is not a pending socket, a
# lingering one or a connection (listener, wake-up pipe, selector, log files, a
# backplane's connections, the application's own), and the bounds. The upper bound is
# for memory: an idle pending socket costs ~400 bytes here and a few KiB in the kernel,
# and a limit of a million descriptors is common in containers.
_FD_RESERVE = 256
_MIN_PENDING = 64
_MAX_PENDING = 16384
# At most one WARNING per kind and interval; the rest go to DEBUG and are counted, so
# that a flood of junk connections cannot flood the logs too.
_WARN_INTERVAL = 1.0


def default_max_pending(max_connections: int) -> int:
    """A generous bound on sockets waiting for their head, from the process's fd limit.

    Pending sockets must not take the descriptors admitted connections need: this is
    the soft ``RLIMIT_NOFILE`` less ``max_connections``, the refused sockets that may be
    lingering (512) and a reserve of 256, clamped to 64..16384. With the oldest dropped
    first, 16384 is plenty: to lock a client out an attacker must open that many
    connections within the client's round trip, far more than one accept loop takes.
    Where no limit can be read (Windows), 1024 descriptors are assumed.
    """
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise TypeError(f"max_connections must be an int, not {type(max_connections).__name__}")
    soft = 1024
    if resource is not None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        soft = 1 << 30 if limit == resource.RLIM_INFINITY else limit
    spare = soft - max_connections - MAX_LINGERING - _FD_RESERVE
    return max(_MIN_PENDING, min(_MAX_PENDING, spare))


class WarningThrottle:
    """One kind of WARNING, logged at most once per interval; the rest at DEBUG."""

    __slots__ = ("_logger", "_clock", "_next", "_suppressed")

    def __init__(self, logger: _Logger, clock: Callable[[], float]) -> None:
        self._logger = logger
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            self._logger.debug(msg, *args)
            return
        self._next = now + _WARN_INTERVAL
        if self._suppressed:
            msg += " (%d more like it since the last report)"
            args += (self._suppressed,)
            self._suppressed = 0
        self._logger.warning(msg, *args)
