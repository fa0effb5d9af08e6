"""Shared fixtures: a server on 127.0.0.1 port 0 that always shuts down, and a check that
every test leaves the thread and file-descriptor counts where it found them."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import threading
import time
import tracemalloc
from typing import Any, Callable, Iterator, List, Set, Tuple

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


# With CI=true a test never skips: a skip there hides a component that failed to install
# (a browser, Redis, nginx, TLS, kosoku), so it fails instead and says what is missing.
# xfail is left alone: it is a known failure written down, not a missing component.
_CI = os.environ.get("CI", "").lower() == "true"


def _ci_refuses(report: Any) -> None:
    """Turn a skipped report into a failure that names the skip's reason."""
    if not (_CI and report.skipped and not hasattr(report, "wasxfail")):
        return
    longrepr = report.longrepr
    # A skip's longrepr is (path, line, "Skipped: <reason>"); anything else, as text.
    reason = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3
                 else longrepr)
    reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    report.outcome = "failed"
    report.longrepr = f"CI=true: this test would skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    # Skips during a test (pytest.skip, importorskip) and during its set-up (skipif and
    # skip marks, a fixture that skips).
    outcome = yield
    _ci_refuses(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    # A module-level importorskip or pytest.skip(allow_module_level=True) skips a whole
    # file while it is collected: under CI that is a collection error, which stops the run.
    outcome = yield
    _ci_refuses(outcome.get_result())


@pytest.fixture(autouse=True)
def thread_deaths() -> Iterator[None]:
    """A thread that dies with an uncaught exception during a test fails the test."""
    deaths: List[str] = []
    previous = threading.excepthook

    def hook(args: Any) -> None:
        name = args.thread.name if args.thread is not None else "?"
        deaths.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")
        previous(args)  # the default prints the traceback, which pytest shows

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
    assert not deaths, f"threads died: {deaths}"


@pytest.fixture(autouse=True)
def no_leaks(thread_deaths: None) -> Iterator[None]:
    """Threads and file descriptors return to their baseline after each test."""
    # Asking for thread_deaths puts its hook around this teardown too: the threads this
    # waits for are the ones most likely to die late (a connection ending after close).
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


@pytest.fixture(scope="module")
def tls() -> Tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts for 127.0.0.1, from a throwaway CA (trustme)."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    # No TLS 1.3 session tickets. python-websockets' sync client reads its SSLSocket in
    # one thread while another writes the request, and the tickets arrive just then;
    # OpenSSL does not allow SSL_read and SSL_write on one connection at once. With
    # tickets, 18 of 1,500 sequential wss connections of that client lost their request
    # (the server answered 408 after handshake_timeout); without, 0 of 800. A plain
    # ssl client, one thread, lost none of 1,500 with tickets. The tests that failed
    # at random this way were handshakes of that client, not the behaviour under test.
    server_ctx.num_tickets = 0
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


@contextlib.contextmanager
def allocation_peak() -> Iterator[List[int]]:
    """The peak of Python allocations (all threads) inside the block, above its start,
    appended to the yielded list when the block ends."""
    result: List[int] = []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        yield result
        result.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


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


class ErrorLogs(ListHandler):
    """ERROR (and CRITICAL) records of the ``wsroute_sync`` logger tree, with tracebacks."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.ERROR)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def assert_none(self) -> None:
        """Fail, showing each record and its traceback, if anything was logged at ERROR."""
        assert not self.records, "ERROR logs:\n" + "\n".join(
            self.format(r) for r in self.records)


@pytest.fixture
def error_logs() -> Iterator[ErrorLogs]:
    """Collects what the library logs at ERROR during the test; not autouse, since some
    tests expect ERROR records (a handler that fails is logged with its traceback).
    Loggers given with ``logger=`` outside the ``wsroute_sync`` tree are not seen."""
    handler = ErrorLogs()
    logger = logging.getLogger("wsroute_sync")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
