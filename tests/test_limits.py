"""The per-client limit bookkeeping, sans-I/O: token bucket, per-address counter, and the
address a request counts under behind proxies."""

from __future__ import annotations

import threading

import pytest

from wsroute_sync.http import Headers, HTTPRequest
from wsroute_sync.limits import (
    PerClientCounter,
    TokenBucket,
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
