"""Per-client limits, sans-I/O: connections per client address, a message rate per
connection, and which address a request counts under behind trusted proxies."""

from __future__ import annotations

import ipaddress
import threading
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .http import HTTPRequest

__all__ = [
    "PerClientCounter",
    "TokenBucket",
    "client_address",
    "check_trusted_proxies",
]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
#: The key every unix-socket client counts under: they have no address of their own.
LOCAL_CLIENT = "unix"


class PerClientCounter:
    """How many connections each client address holds, at most ``limit`` each.

    Entries exist only while an address holds a connection: an attacker cycling through
    addresses leaves no memory behind.
    """

    def __init__(self, limit: int) -> None:
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
        with self._lock:
            held = self._counts.get(key, 0) - 1
            if held > 0:
                self._counts[key] = held
            else:
                self._counts.pop(key, None)

    def __len__(self) -> int:
        return len(self._counts)


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; one message takes one.

    Sans-I/O: the caller passes the time (``time.monotonic()``), so tests drive it
    with a clock of their own.
    """

    __slots__ = ("rate", "burst", "_tokens", "_last")

    def __init__(self, rate: float, burst: int) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._last: Optional[float] = None

    def take(self, now: float) -> bool:
        """Take a token at time ``now``; ``False`` if none is left."""
        last = self._last
        tokens = self._tokens
        if last is not None and now > last:
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


def check_trusted_proxies(proxies: Any) -> Tuple[str, ...]:
    """Validate ``trusted_proxies`` (addresses or networks); the normalised tuple."""
    if isinstance(proxies, str):
        proxies = (proxies,)
    if not isinstance(proxies, (list, tuple)) or not proxies:
        raise TypeError("trusted_proxies must be a non-empty list of addresses or networks")
    out = []
    for entry in proxies:
        if not isinstance(entry, str):
            raise TypeError(f"trusted_proxies entries are strings, not {type(entry).__name__}")
        try:
            out.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"trusted_proxies: {entry!r} is not an address or network") from None
    return tuple(out)


def _networks(proxies: Sequence[str]) -> Tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _parse_ip(text: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]  # "[v6]:port"
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]  # "v4:port"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(request: HTTPRequest, peer: Any, *,
                   trusted_proxies: Optional[Sequence[str]],
                   header: str = "X-Forwarded-For") -> str:
    """The address a request counts under.

    The peer's own address, unless the peer is a trusted proxy: then the right-most
    address in ``header`` that is not itself a trusted proxy. Right-most, because each
    proxy appends the address it received the request from, and everything to the left
    of what our own proxies appended was written by the client and proves nothing.
    """
    if not isinstance(peer, tuple) or not peer:
        return LOCAL_CLIENT
    peer_ip = _parse_ip(str(peer[0]))
    if peer_ip is None:
        return str(peer[0])
    if not trusted_proxies:
        return str(peer_ip)
    networks = _networks(trusted_proxies)
    if not any(peer_ip in net for net in networks):
        return str(peer_ip)
    hops = [hop for value in request.headers.get_all(header) for hop in value.split(",")]
    for hop in reversed(hops):
        ip = _parse_ip(hop)
        if ip is None:
            return str(peer_ip)  # a malformed hop: trust nothing left of it
        if not any(ip in net for net in networks):
            return str(ip)
    return str(peer_ip)
