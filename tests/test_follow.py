"""Follower threads: they accept on the listener themselves, serve the connection whose
head came with it, hand everything else to the accept loop, and stop when told.

The Followers object is driven over real TCP (and unix) sockets on 127.0.0.1 with
stand-ins for the server's ``admit``, the pool's ``spawn`` and the accept loop's
``hand_over``; a last test runs a real server and counts its threads.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sys
import threading
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest

from conftest import TIMEOUT, ListHandler
from wsroute_sync import Client, Server
from wsroute_sync.follow import Followers
from wsroute_sync.http import HTTPRequest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="followers are used on Linux only")

HEAD = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\r\n"


class Rig:
    """Followers on a fresh listener, with recording stand-ins.

    ``admit`` answers each head with ``self.answer(request)``: bytes (a refusal) or a
    connection, by default a stand-in whose ``run`` puts its thread's name on ``ran``
    and waits for ``release``.
    """

    def __init__(self, family: int = socket.AF_INET, count: int = 2,
                 spawn_fails: Callable[[int], bool] = lambda n: False,
                 defer: bool = True) -> None:
        if family == socket.AF_UNIX:
            self.path = f"/tmp/wsroute-follow-{os.getpid()}-{id(self)}.sock"
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(self.path)
            self.listener.listen(64)
        else:
            self.path = ""
            self.listener = socket.create_server(("127.0.0.1", 0))
            if defer:
                # accept() returns once the client's first bytes are in: without it, a
                # follower may accept before they arrive and hand the socket over, as
                # the server does, which is right there but would make these tests
                # depend on timing.
                self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
        self.address: Any = self.listener.getsockname()
        self.handed: "queue.Queue[Tuple[socket.socket, bytes, Optional[bytes]]]" = queue.Queue()
        self.admitted: "queue.Queue[HTTPRequest]" = queue.Queue()
        self.ran: "queue.Queue[str]" = queue.Queue()
        self.release = threading.Event()
        self.threads: List[threading.Thread] = []
        self.spawns = 0
        self.spawn_fails = spawn_fails
        self.answer: Callable[[HTTPRequest], Any] = lambda request: self
        self.log = ListHandler()
        logger = logging.getLogger("test.follow")
        logger.addHandler(self.log)
        self.logger = logger
        self.followers = Followers(
            self.listener, accept=self.listener._accept, admit=self.admit, spawn=self.spawn, hand_over=self.hand_over,
            max_header_size=1024, logger=logger, count=count,
        )

    thread_name = "conn-x"

    def run(self) -> None:
        self.ran.put(threading.current_thread().name)
        assert self.release.wait(TIMEOUT)

    def admit(self, sock: socket.socket, remote: Any, request: HTTPRequest, rest: bytes
              ) -> Any:
        self.admitted.put(request)
        answer = self.answer(request)
        if not isinstance(answer, bytes):
            sock.close()  # the stand-in job does not serve it
        return answer

    def spawn(self, job: Callable[[], None], name: str) -> None:
        self.spawns += 1
        if self.spawn_fails(self.spawns):
            raise RuntimeError("can't start new thread")
        thread = threading.Thread(target=job, name=name)
        self.threads.append(thread)
        thread.start()

    def hand_over(self, sock: socket.socket, remote: Any, head: bytes,
                  answer: Optional[bytes]) -> None:
        self.handed.put((sock, head, answer))

    def connect(self, data: bytes = b"") -> socket.socket:
        if self.path:
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(TIMEOUT)
            client.connect(self.path)
        else:
            client = socket.create_connection(self.address, timeout=TIMEOUT)
        if data:
            client.sendall(data)
        return client

    def close(self) -> None:
        self.release.set()
        self.followers.stop()
        for thread in list(self.threads):
            thread.join(TIMEOUT)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        self.listener.close()
        while not self.handed.empty():
            self.handed.get()[0].close()
        self.logger.removeHandler(self.log)
        if self.path:
            os.unlink(self.path)


@pytest.fixture
def rig() -> Iterator[Callable[..., Rig]]:
    made: List[Rig] = []

    def make(**options: Any) -> Rig:
        made.append(Rig(**options))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_a_head_that_came_with_the_connection_is_served_in_the_follower(rig: Any) -> None:
    r = rig()
    assert r.followers.start() == 2
    with r.connect(HEAD):
        assert r.admitted.get(timeout=TIMEOUT).path == "/chat"
        assert r.ran.get(timeout=TIMEOUT) == "conn-x"  # the follower's thread, renamed
        # One follower took the connection; the other still waits, no replacement needed.
        assert r.spawns == 2 and r.followers.waiting == 1
        r.release.set()
    # Back in accept() once its connection ended.
    with r.connect(HEAD):
        assert r.admitted.get(timeout=TIMEOUT).path == "/chat"
    assert r.handed.empty()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX], ids=["tcp", "unix"])
def test_stop_ends_the_followers_waiting_in_accept(rig: Any, family: int) -> None:
    r = rig(family=family)
    assert r.followers.start() == 2
    r.followers.stop()
    for thread in r.threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert r.followers.waiting == 0


@pytest.mark.parametrize("hang_up", [False, True], ids=["silent", "hangs-up"])
def test_a_client_that_sends_nothing_goes_to_the_accept_loop(rig: Any, hang_up: bool
                                                              ) -> None:
    # Silent or gone, it is the accept loop's to wait for or to close, as any socket.
    r = rig(defer=False)
    client = r.connect()
    if hang_up:
        client.close()
    r.followers.start()
    try:
        sock, head, answer = r.handed.get(timeout=TIMEOUT)
        sock.close()
        assert (head, answer) == (b"", None)
    finally:
        client.close()
    assert r.admitted.empty() and r.followers.waiting == 2


@pytest.mark.parametrize("data", [
    HEAD[:20],  # an incomplete head: the accept loop reads the rest
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello: answered 400 there
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # complete and bad: answered there
    b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\nHost: a\r\n\r\n",  # over max_header_size
], ids=["partial", "tls-hello", "bad", "oversize"])
def test_anything_but_a_good_complete_head_goes_to_the_accept_loop_with_its_bytes(
        rig: Any, data: bytes) -> None:
    r = rig()
    r.followers.start()
    with r.connect(data):
        sock, head, answer = r.handed.get(timeout=TIMEOUT)
        sock.close()
    assert head == data and answer is None
    assert r.admitted.empty() and r.followers.waiting == 2


def test_a_refusal_is_handed_over_and_the_follower_keeps_waiting(rig: Any) -> None:
    r = rig()
    r.answer = lambda request: b"HTTP/1.1 503 Service Unavailable\r\n\r\n"
    r.followers.start()
    with r.connect(HEAD):
        sock, head, answer = r.handed.get(timeout=TIMEOUT)
        sock.close()
    assert head == b"" and answer is not None and b" 503 " in answer
    assert r.followers.waiting == 2 and r.spawns == 2


def test_the_last_follower_starts_a_replacement_before_it_serves(rig: Any) -> None:
    r = rig(count=1)
    with r.connect(HEAD) as first, r.connect(HEAD) as second:
        assert r.followers.start() == 1
        # Two connections served at once, by the first follower and its replacement.
        assert r.ran.get(timeout=TIMEOUT) == "conn-x"
        assert r.ran.get(timeout=TIMEOUT) == "conn-x"
        assert r.spawns == 3  # the first follower, then one replacement each
        assert first.fileno() >= 0 and second.fileno() >= 0
    r.release.set()
    # Each ended connection's thread rejoins only up to count: one waits, others leave.
    for thread in r.threads[:2]:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert r.followers.waiting == 1


def test_no_thread_for_a_replacement_hands_the_connection_to_the_accept_loop(
        rig: Any) -> None:
    r = rig(count=1, spawn_fails=lambda n: n > 1)
    assert r.followers.start() == 1
    with r.connect(HEAD):
        sock, head, answer = r.handed.get(timeout=TIMEOUT)
        sock.close()
    # The accept loop gets the whole head (it answers 503 when it cannot start a thread
    # either); this follower goes on waiting, so accepting never stops.
    assert head == HEAD and answer is None and r.admitted.empty()
    assert r.followers.waiting == 1
    assert any("cannot start an accepting thread" in m for m in r.log.messages())
    with r.connect(HEAD):
        r.handed.get(timeout=TIMEOUT)[0].close()


def test_no_thread_at_start_means_no_followers(rig: Any) -> None:
    r = rig(spawn_fails=lambda n: True)
    assert r.followers.start() == 0
    assert r.followers.waiting == 0
    # The listener is given back non-blocking, for the accept loop's selector.
    assert r.listener.getblocking() is False


def test_a_server_with_followers_ends_every_thread_it_started() -> None:
    before = set(threading.enumerate())
    server = Server(max_connections=4)
    server.register("echo", lambda ctx, message: message)
    server.start("127.0.0.1:0")
    try:
        for _ in range(3):  # served by a follower, or by the accept loop's hand-over
            with Client.connect(server.url, timeout=TIMEOUT) as client:
                assert json.loads(client.call("echo", {"x": 1})) == {"x": 1}
    finally:
        server.close(timeout=TIMEOUT)
    # close() stops the followers waiting in accept() and joins every pooled thread.
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not left
