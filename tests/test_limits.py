"""The per-client limit bookkeeping, sans-I/O: token bucket, per-address counter, and the
address a request counts under behind proxies."""

from __future__ import annotations

import ipaddress
import threading
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wsroute_sync.http import Headers, HTTPRequest
from wsroute_sync.limits import (
    PerClientCounter,
    TokenBucket,
    check_client_ip_header,
    check_trusted_proxies,
    client_address,
)


def request(*headers: tuple) -> HTTPRequest:  # type: ignore[type-arg]
    return HTTPRequest("GET", "/", Headers(list(headers)), "1.1", ("127.0.0.1", 1))


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(2.0, 3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.25) is False  # half a token
    assert bucket.take(0.5) is True  # one token after 0.5 s at 2/s
    assert bucket.take(100.0) and bucket.take(100.0) and bucket.take(100.0)
    assert bucket.take(100.0) is False  # refills only up to the burst
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_counter_limits_each_key_and_forgets_released_ones() -> None:
    counter = PerClientCounter(2)
    assert counter.acquire("a") and counter.acquire("a")
    assert not counter.acquire("a")
    assert counter.acquire("b")
    counter.release("a")
    assert counter.acquire("a")
    for key in ("a", "a", "b"):
        counter.release(key)
    assert len(counter) == 0


def test_counter_under_threads() -> None:
    counter = PerClientCounter(50)
    results: list = []  # type: ignore[type-arg]
    go = threading.Barrier(8)

    def grab() -> None:
        go.wait()
        results.extend(counter.acquire("x") for _ in range(20))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 50


def test_client_address() -> None:
    peer = ("10.0.0.5", 4000)
    xff = ("X-Forwarded-For", "198.51.100.1, 203.0.113.9")
    # No trusted proxies: the header is never read.
    assert client_address(request(xff), peer, trusted_proxies=None) == "10.0.0.5"
    # The peer is a trusted proxy: the right-most address it did not add itself.
    trusted = check_trusted_proxies(["10.0.0.0/8"])
    assert client_address(request(xff), peer, trusted_proxies=trusted) == "203.0.113.9"
    # A chain of trusted proxies is skipped from the right.
    chain = ("X-Forwarded-For", "203.0.113.9, 10.1.1.1")
    assert client_address(request(chain), peer, trusted_proxies=trusted) == "203.0.113.9"
    # From an untrusted peer, a forged header changes nothing.
    assert client_address(request(xff), ("192.0.2.7", 1),
                          trusted_proxies=trusted) == "192.0.2.7"
    # Garbage in the header: the proxy's own address counts.
    junk = ("X-Forwarded-For", "not-an-ip")
    assert client_address(request(junk), peer, trusted_proxies=trusted) == "10.0.0.5"
    # IPv4-mapped IPv6 peers count as their IPv4 address; unix peers share one key.
    assert client_address(request(), ("::ffff:192.0.2.1", 1, 0, 0),
                          trusted_proxies=None) == "192.0.2.1"
    assert client_address(request(), "", trusted_proxies=None) == "unix"


def test_trusted_proxies_are_checked() -> None:
    assert check_trusted_proxies("127.0.0.1") == ("127.0.0.1/32",)
    with pytest.raises(ValueError, match="not an address"):
        check_trusted_proxies(["nope"])
    with pytest.raises(TypeError):
        check_trusted_proxies([1])


def test_token_bucket_refills_at_its_rate_with_a_fake_clock() -> None:
    bucket = TokenBucket(10.0, 5)
    now = 50.0
    assert sum(bucket.take(now) for _ in range(10)) == 5  # the burst, then nothing
    for _ in range(20):  # 10/s: one token per 0.1 s, never more
        now += 0.1
        assert bucket.take(now) and not bucket.take(now)
    now += 0.05
    assert not bucket.take(now)  # half a token
    # A clock read earlier (say, by another thread) earns nothing twice.
    assert not bucket.take(now - 10.0)
    assert bucket.take(now + 0.05) and not bucket.take(now + 0.05)
    # Idle for long: back to the burst, not beyond it.
    now += 3600
    assert sum(bucket.take(now) for _ in range(10)) == 5


@pytest.mark.parametrize("rate, burst, error", [
    (0, 1, ValueError), (-1.0, 1, ValueError), (float("nan"), 1, ValueError),
    (1.0, 0, ValueError), (1.0, 1.5, TypeError), ("1", 1, TypeError), (True, 1, TypeError),
])
def test_token_bucket_checks_its_arguments(rate: object, burst: object,
                                           error: type) -> None:
    with pytest.raises(error):
        TokenBucket(rate, burst)  # type: ignore[arg-type]


def test_counter_churn_from_threads_leaves_nothing_behind() -> None:
    counter = PerClientCounter(3)
    go = threading.Barrier(6)
    over: list = []  # type: ignore[type-arg]

    def churn(worker: int) -> None:
        go.wait()
        for i in range(2000):
            key = f"10.0.0.{(worker + i) % 4}"
            if counter.acquire(key):
                if counter.count(key) > 3:
                    over.append(key)
                counter.release(key)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert over == [] and len(counter) == 0
    with pytest.raises(ValueError):
        PerClientCounter(0)
    with pytest.raises(TypeError):
        PerClientCounter(2.0)  # type: ignore[arg-type]


def test_spoofed_headers_from_untrusted_peers_are_ignored() -> None:
    trusted = check_trusted_proxies(["10.0.0.0/8", "2001:db8:1::/48"])
    for name, value in [("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "10.0.0.1"),
                        ("Forwarded", "for=1.2.3.4"), ("X-Forwarded-For", "")]:
        assert client_address(request((name, value)), ("192.0.2.7", 5555),
                              trusted_proxies=trusted) == "192.0.2.7"
        assert client_address(request((name, value)), ("2001:db8:2::7", 1, 0, 0),
                              trusted_proxies=trusted) == "2001:db8:2::7"
    # A client that prepends addresses through our proxy only adds hops on the left.
    spoof = ("X-Forwarded-For", "6.6.6.6, 10.0.0.9, 192.0.2.7")
    assert client_address(request(spoof), ("10.0.0.5", 1), trusted_proxies=trusted) == "192.0.2.7"


def test_client_address_ipv6_and_cidr() -> None:
    trusted = check_trusted_proxies(["2001:db8:1::/48", "192.168.0.0/16"])
    assert trusted == ("2001:db8:1::/48", "192.168.0.0/16")
    peer = ("2001:db8:1:2::5", 443, 0, 0)
    hops = ("X-Forwarded-For", "2001:DB8:2::7, 192.168.3.4, 2001:db8:1::9")
    assert client_address(request(hops), peer, trusted_proxies=trusted) == "2001:db8:2::7"
    ported = ("X-Forwarded-For", "[2001:db8:2::7]:4711, 198.51.100.2:80")
    assert client_address(request(ported), peer, trusted_proxies=trusted) == "198.51.100.2"
    # Outside the network: the peer counts, and a bare address is a /32 or /128.
    assert client_address(request(hops), ("2001:db8:3::5", 1, 0, 0),
                          trusted_proxies=trusted) == "2001:db8:3::5"
    assert check_trusted_proxies(["::1"]) == ("::1/128",)
    # Every hop a trusted proxy: the left-most is as far as anyone can say.
    inner = ("X-Forwarded-For", "192.168.9.9, 2001:db8:1::1")
    assert client_address(request(inner), peer, trusted_proxies=trusted) == "192.168.9.9"


def test_forwarded_header_and_repeated_headers() -> None:
    trusted = check_trusted_proxies(["10.0.0.0/8"])
    peer = ("10.0.0.5", 1)
    forwarded = ("Forwarded", 'for=192.0.2.60;proto=http, for="[2001:db8:cafe::17]:4711"')
    assert client_address(request(forwarded), peer, trusted_proxies=trusted,
                          header="Forwarded") == "2001:db8:cafe::17"
    hidden = ("Forwarded", "for=_hidden, for=10.0.0.7")
    assert client_address(request(hidden), peer, trusted_proxies=trusted,
                          header="Forwarded") == "10.0.0.7"  # the proxy that wrote it
    # Two header lines are one list (RFC 9110 5.3), in order.
    twice = request(("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "198.51.100.2"))
    assert client_address(twice, peer, trusted_proxies=trusted) == "198.51.100.2"
    assert client_address(request(("X-Real-IP", "198.51.100.3")), peer,
                          trusted_proxies=trusted, header="X-Real-IP") == "198.51.100.3"


def test_unix_socket_peers() -> None:
    xff = ("X-Forwarded-For", "198.51.100.1")
    assert client_address(request(xff), "", trusted_proxies=None) == "unix"
    assert client_address(request(xff), "", trusted_proxies=("10.0.0.0/8",)) == "unix"
    # A proxy on this host that connects through the socket: trusted by name.
    trusted = check_trusted_proxies(["unix", "127.0.0.1"])
    assert trusted == ("unix", "127.0.0.1/32")
    assert client_address(request(xff), "", trusted_proxies=trusted) == "198.51.100.1"
    assert client_address(request(), b"", trusted_proxies=trusted) == "unix"


def test_client_ip_header_is_checked() -> None:
    assert check_client_ip_header("X-Real-IP") == "X-Real-IP"
    with pytest.raises(ValueError, match="not an HTTP header name"):
        check_client_ip_header("X Forwarded For")
    with pytest.raises(ValueError):
        check_client_ip_header("")
    with pytest.raises(TypeError):
        check_client_ip_header(None)


_client_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@given(written=_client_text, real=st.ip_addresses())
@example(written="", real=ipaddress.ip_address("192.0.2.1"))
@example(written="10.0.0.1, 10.0.0.2", real=ipaddress.ip_address("192.0.2.1"))
@example(written="[", real=ipaddress.ip_address("2001:db8::1"))
@example(written="x", real=ipaddress.ip_address("::ffff:10.1.2.3"))
def test_nothing_a_client_writes_changes_its_key(written: str, real: Any) -> None:
    """Behind one trusted proxy that appends the address it saw, the key is that address,
    whatever the client put in the header itself."""
    trusted = check_trusted_proxies(["10.0.0.0/8"])
    if isinstance(real, ipaddress.IPv6Address) and real.ipv4_mapped is not None:
        real = real.ipv4_mapped  # counted as the IPv4 address it is
    if real in ipaddress.ip_network("10.0.0.0/8"):
        return  # a client inside the proxies' own network is not what this is about
    value = f"{written}, {real}" if written else str(real)
    got = client_address(request(("X-Forwarded-For", value)), ("10.0.0.5", 1),
                         trusted_proxies=trusted)
    assert got == str(real)
