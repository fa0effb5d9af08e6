"""Shared fixtures: a server on 127.0.0.1 port 0 that always shuts down, and a check that
every test leaves the thread and file-descriptor counts where it found them."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, List, Set

import pytest

from wsroute_sync import Server

#: One time unit for every wait in the tests; raise it on a slow machine.
TIMEOUT = 5.0 * float(os.environ.get("WSROUTE_TEST_TIMEOUT_SCALE", "1"))


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Wait for a condition that other threads make true, joining them where possible."""
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        # Threads that are finishing are what we wait for: join them instead of sleeping.
        others = [t for t in threading.enumerate() if t is not threading.current_thread()
                  and not t.daemon]
        if others:
            others[0].join(min(remaining, 0.05))
        else:
            threading.Event().wait(min(remaining, 0.01))
    return True


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Threads and file descriptors return to their baseline after each test."""
    threads: Set[threading.Thread] = set(threading.enumerate())
    fds = _fd_count()
    yield
    extra: List[threading.Thread] = []

    def settled() -> bool:
        extra[:] = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        for t in extra:
            t.join(0.05)
        extra[:] = [t for t in extra if t.is_alive()]
        return not extra and _fd_count() <= fds

    assert _wait_for(settled), (
        f"leaked threads {[t.name for t in extra]} or fds ({_fd_count()} > {fds})"
    )


@contextlib.contextmanager
def running(server: Server, addr: str = "127.0.0.1:0") -> Iterator[Server]:
    """Serve in the background for the duration of a ``with``; always closes."""
    server.start(addr)
    try:
        yield server
    finally:
        server.close(timeout=TIMEOUT)


def make_server(**options: Any) -> Server:
    """A server with the routes most tests use."""
    options.setdefault("handler_timeout", None)
    server = Server(**options)

    @server.route("echo")
    def echo(ctx: Any, message: bytes) -> bytes:
        return message

    return server


@pytest.fixture
def server() -> Iterator[Server]:
    with running(make_server()) as srv:
        yield srv


class ListHandler(logging.Handler):
    """Collects records, for tests that assert on logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> List[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]
