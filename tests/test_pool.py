"""Pooled connection threads: reused, bounded, retired when idle, all joined at close."""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import threading
from typing import Any, List

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conftest import TIMEOUT, ListHandler, _wait_for, make_server, running
from wsroute_sync import Server
from wsroute_sync.http import parse_request_head
from wsroute_sync.pool import ThreadPool, set_thread_policy


def url(server: Server, scheme: str = "ws") -> str:
    host, port = server.address
    return f"{scheme}://{host}:{port}/"


def test_a_finished_jobs_thread_runs_the_next_job() -> None:
    pool = ThreadPool(max_idle=4)
    seen: List[threading.Thread] = []
    for i in range(3):
        done = threading.Event()
        pool.submit(lambda: (seen.append(threading.current_thread()), done.set()), f"job-{i}")
        assert done.wait(TIMEOUT)
        assert _wait_for(lambda: pool.idle == 1)
    assert len(set(seen)) == 1 and pool.threads == 1
    assert seen[0].name == "wsroute_sync-idle"  # renamed while it waits
    assert pool.close(TIMEOUT)
    assert not seen[0].is_alive()


def test_busy_threads_are_never_shared_and_idle_ones_are_capped() -> None:
    pool = ThreadPool(max_idle=2)
    release = threading.Event()
    started = threading.Barrier(6)
    names: List[str] = []

    def job() -> None:
        names.append(threading.current_thread().name)
        started.wait(TIMEOUT)  # all five jobs run at once: five threads
        release.wait(TIMEOUT)

    for i in range(5):
        pool.submit(job, f"job-{i}")
    started.wait(TIMEOUT)
    assert sorted(names) == [f"job-{i}" for i in range(5)]
    assert pool.threads == 5 and pool.idle == 0
    release.set()
    # Two stay for the next jobs; the other three exit.
    assert _wait_for(lambda: pool.threads == 2 and pool.idle == 2)
    assert pool.close(TIMEOUT)
    assert pool.threads == 0


def test_an_idle_thread_leaves_after_idle_timeout() -> None:
    pool = ThreadPool(max_idle=4, idle_timeout=0.05)
    threads: List[threading.Thread] = []
    pool.submit(lambda: threads.append(threading.current_thread()), "job")
    assert _wait_for(lambda: bool(threads))
    threads[0].join(TIMEOUT)
    assert not threads[0].is_alive()
    assert pool.threads == 0 and pool.idle == 0
    pool.close(TIMEOUT)


def test_jobs_handed_over_while_idle_threads_time_out_all_run_once() -> None:
    # With a tiny idle timeout, a submit() often pops a worker whose wait has just run
    # out: the worker must notice it was handed a job and run it, not leave.
    pool = ThreadPool(max_idle=2, idle_timeout=0.0005)
    counts = [0] * 300
    for i in range(len(counts)):
        done = threading.Event()

        def job(i: int = i, done: threading.Event = done) -> None:
            counts[i] += 1
            done.set()

        pool.submit(job, f"job-{i}")
        assert done.wait(TIMEOUT), f"job {i} never ran"
    assert counts == [1] * len(counts)
    assert pool.close(TIMEOUT)
    assert pool.threads == 0


def test_closed_pool_refuses_jobs_and_close_from_a_pooled_thread_returns() -> None:
    pool = ThreadPool()
    returned = threading.Event()
    threads: List[threading.Thread] = []

    def job() -> None:
        threads.append(threading.current_thread())
        pool.close(TIMEOUT)  # must not wait for the thread it runs in
        returned.set()

    pool.submit(job, "closer")
    assert returned.wait(TIMEOUT)
    threads[0].join(TIMEOUT)
    assert not threads[0].is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(lambda: None, "late")


def test_pool_options_are_validated() -> None:
    with pytest.raises(ValueError):
        ThreadPool(max_idle=-1)
    with pytest.raises(ValueError):
        ThreadPool(idle_timeout=0)


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_consecutive_connections_reuse_threads_named_after_each(scheme: str, tls: Any
                                                                 ) -> None:
    server = Server(handler_timeout=None)

    @server.route("who")
    def who(ctx: Any, message: bytes) -> Any:
        thread = threading.current_thread()
        return {"ident": thread.ident, "name": thread.name, "id": ctx.connection_id}

    import json

    server.start("127.0.0.1:0", ssl_context=tls[0] if scheme == "wss" else None)
    try:
        seen = []
        for _ in range(3):
            with connect(url(server, scheme), ssl=tls[1] if scheme == "wss" else None) as ws:
                ws.send('{"Route":"who"}')
                seen.append(json.loads(ws.recv(timeout=TIMEOUT)))
            # The connection is finished (slot and thread freed) before the next one.
            assert _wait_for(lambda: server.active_connections == 0 and (
                scheme == "ws" or server._pool.idle == 1))
    finally:
        server.close(timeout=TIMEOUT)
    assert [s["name"] for s in seen] == [f"wsroute_sync-conn-{s['id']}" for s in seen]
    if scheme == "wss":
        # The accept loop hands each to a pooled thread: the one idle since the last.
        # (On ws:// Linux, follower threads take connections in turn: test_follow.py.)
        assert len({s["ident"] for s in seen}) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("wsroute_sync")]


def test_a_thread_that_cannot_start_refuses_only_that_client(monkeypatch: Any, tls: Any
                                                              ) -> None:
    # Over wss://, whose connections the accept loop hands to a pooled thread. (On ws://
    # Linux a follower thread serves the connection it accepted and needs no new thread
    # unless it was the last one waiting: test_follow.py covers that case.)
    handler = ListHandler()
    logger = logging.getLogger("test.pool.nostart")
    logger.addHandler(handler)
    logger.propagate = False
    server = make_server(logger=logger)
    server.start("127.0.0.1:0", ssl_context=tls[0])
    try:
        real_start = threading.Thread.start

        def failing_start(self: threading.Thread) -> None:
            if self.name.startswith("wsroute_sync-conn"):
                raise RuntimeError("can't start new thread")
            real_start(self)

        monkeypatch.setattr(threading.Thread, "start", failing_start)
        with pytest.raises(InvalidStatus) as refused:
            with connect(url(server, "wss"), ssl=tls[1], open_timeout=TIMEOUT):
                pass
        assert refused.value.response.status_code == 503
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert server.active_connections == 0
        with connect(url(server, "wss"), ssl=tls[1]) as ws:  # the slot was given back
            ws.send('{"Route":"echo","Params":1}')
            assert ws.recv(timeout=TIMEOUT) == "1"
    finally:
        server.close(timeout=TIMEOUT)
        logger.removeHandler(handler)
    assert any("cannot start a connection thread" in m for m in handler.messages(logging.ERROR))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux inheritance")
def test_accepted_sockets_start_with_the_listeners_options() -> None:
    """Nagle off (which the listener gave them, so that the connection thread sets
    nothing), and reads without a timeout: neither the handshake timeout nor keepalive's
    interval (the keepalive thread pings; connection threads are woken by data only)."""
    server = make_server(handshake_timeout=2.0, ping_interval=3.5)
    options: List[Any] = []

    @server.route("opts")
    def opts(ctx: Any, message: bytes) -> Any:
        sock = socket.socket(fileno=os.dup(ctx.connection.fileno()))
        try:
            options.append((
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)),
            ))
        finally:
            sock.close()
        return "ok"

    with running(server) as srv:
        with connect(url(srv)) as ws:
            ws.send('{"Route":"opts"}')
            assert ws.recv(timeout=TIMEOUT) == "ok"
    assert options == [(1, (0, 0))]


def _record_nodelay(server: Server) -> List[int]:
    """Route ``opts`` appends its connection's TCP_NODELAY to the list returned."""
    nodelay: List[int] = []

    @server.route("opts")
    def opts(ctx: Any, message: bytes) -> Any:
        sock = socket.socket(fileno=os.dup(ctx.connection.fileno()))
        try:
            nodelay.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        finally:
            sock.close()
        return "ok"

    return nodelay


def test_tls_sockets_have_nagle_off_from_the_handshake_on(tls: Any) -> None:
    """TLS sockets set TCP_NODELAY themselves (before the handshake: with Nagle on, the
    session tickets a TLS 1.3 server writes after it waited for the client's delayed ACK,
    40 ms of every wss handshake on loopback)."""
    server_ctx, client_ctx = tls
    server = make_server()
    nodelay = _record_nodelay(server)

    server.start("127.0.0.1:0", ssl_context=server_ctx)
    try:
        with connect(server.url, ssl=client_ctx) as ws:
            ws.send('{"Route":"opts"}')
            assert ws.recv(timeout=TIMEOUT) == "ok"
    finally:
        server.close()
    assert nodelay == [1]


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_sockets_handed_to_serve_socket_have_nagle_off(timeout: Any) -> None:
    """A socket from elsewhere (a WSGI server's) inherits nothing from our listener, so
    the upgrade turns Nagle off, whether the socket is blocking or has a timeout."""
    server = make_server()
    nodelay = _record_nodelay(server)

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        sock, remote = listener.accept()
        sock.settimeout(timeout)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        end = head.index(b"\r\n\r\n") + 4
        server.serve_socket(sock, remote, parse_request_head(head[:end], remote),
                            rest=head[end:])

    thread = threading.Thread(target=serve_one)
    thread.start()
    try:
        with connect(f"ws://127.0.0.1:{port}/") as ws:
            ws.send('{"Route":"opts"}')
            assert ws.recv(timeout=TIMEOUT) == "ok"
    finally:
        thread.join(TIMEOUT)
        listener.close()
    assert not thread.is_alive()
    assert nodelay == [1]


needs_sched_batch = pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH") or not hasattr(os, "sched_getscheduler"),
    reason="SCHED_BATCH is Linux's",
)


def _policy_in_pool(pool: ThreadPool) -> int:
    seen: List[int] = []
    done = threading.Event()
    pool.submit(lambda: (seen.append(os.sched_getscheduler(0)), done.set()), "policy")
    assert done.wait(TIMEOUT)
    return seen[0]


@needs_sched_batch
def test_batch_policy_applies_to_the_pools_threads_only() -> None:
    mine = os.sched_getscheduler(0)
    batch_pool = ThreadPool(thread_policy="batch")
    plain_pool = ThreadPool()
    try:
        assert _policy_in_pool(batch_pool) == os.SCHED_BATCH
        # A reused thread keeps it; it was set once, when the thread started.
        assert _wait_for(lambda: batch_pool.idle == 1)
        assert _policy_in_pool(batch_pool) == os.SCHED_BATCH
        assert batch_pool.threads == 1
        assert _policy_in_pool(plain_pool) == mine  # None: born with the caller's
    finally:
        assert batch_pool.close(TIMEOUT) and plain_pool.close(TIMEOUT)
    assert os.sched_getscheduler(0) == mine  # the submitting thread is left alone


def test_a_refused_or_missing_policy_leaves_the_thread_working(monkeypatch: Any) -> None:
    def refuse(*args: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse, raising=False)
    assert set_thread_policy("batch") is False
    pool = ThreadPool(thread_policy="batch")
    done = threading.Event()
    pool.submit(done.set, "refused")
    assert done.wait(TIMEOUT)  # the job ran all the same
    assert pool.close(TIMEOUT)
    monkeypatch.delattr(os, "sched_setscheduler")
    assert set_thread_policy("batch") is False
    assert set_thread_policy(None) is False


def test_unknown_thread_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="thread_policy"):
        ThreadPool(thread_policy="fifo")
    with pytest.raises(ValueError, match="thread_policy"):
        set_thread_policy("idle")
    with pytest.raises(ValueError, match="thread_policy"):
        Server(thread_policy="realtime")


def test_the_default_policy_is_auto_and_means_batch_in_one_process() -> None:
    server = Server()
    assert server.options.thread_policy == "auto"
    assert server._pool.thread_policy == "batch"
    assert Server(thread_policy="batch")._pool.thread_policy == "batch"
    assert Server(thread_policy=None)._pool.thread_policy is None


@needs_sched_batch
@pytest.mark.parametrize("policy", ["auto", "batch", None])
def test_connection_threads_follow_the_servers_thread_policy(policy: Any) -> None:
    server = Server(handler_timeout=None, thread_policy=policy)

    @server.route("policy")
    def which(ctx: Any, message: bytes) -> Any:
        return {"policy": os.sched_getscheduler(0)}

    import json

    mine = os.sched_getscheduler(0)
    with running(server) as srv:
        with connect(url(srv)) as ws:
            ws.send('{"Route":"policy"}')
            got = json.loads(ws.recv(timeout=TIMEOUT))["policy"]
    assert got == (mine if policy is None else os.SCHED_BATCH)
    assert os.sched_getscheduler(0) == mine


# cpu_affinity: the server's threads bound to CPUs.

needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity on this system"
)


def test_cpu_affinity_values_are_checked() -> None:
    assert Server().options.cpu_affinity is None
    assert Server(cpu_affinity="one").options.cpu_affinity == "one"
    assert Server(cpu_affinity=[0, 0]).options.cpu_affinity == frozenset({0})
    for bad in ("two", "", [], [-1], [True], [1.0], b"one"):
        with pytest.raises(ValueError, match="cpu_affinity"):
            Server(cpu_affinity=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cpu_affinity"):
        Server(cpu_affinity=3)  # type: ignore[arg-type]


@needs_affinity
def test_cpu_affinity_naming_no_usable_cpu_is_refused() -> None:
    unusable = max(os.sched_getaffinity(0)) + 4096
    with pytest.raises(ValueError, match="no CPU this process may use"):
        Server(cpu_affinity={unusable})


def _affinity_server(**options: Any) -> Server:
    server = Server(handler_timeout=None, **options)

    @server.route("cpus")
    def cpus(ctx: Any, message: bytes) -> Any:
        return {"cpus": sorted(os.sched_getaffinity(0))}

    return server


def _cpus_of_a_connection(server: Server) -> List[int]:
    import json

    with connect(url(server)) as ws:
        ws.send('{"Route":"cpus"}')
        answer: List[int] = json.loads(ws.recv(timeout=TIMEOUT))["cpus"]
        return answer


@needs_affinity
def test_connection_and_accept_threads_run_on_the_cpus_given() -> None:
    mine = os.sched_getaffinity(0)
    cpu = max(mine)
    with running(_affinity_server(cpu_affinity={cpu})) as srv:
        assert _cpus_of_a_connection(srv) == [cpu]
        # A pooled thread, reused, keeps it.
        assert _cpus_of_a_connection(srv) == [cpu]
        accept = srv._accept_thread
        assert accept is not None and accept.native_id is not None
        assert os.sched_getaffinity(accept.native_id) == {cpu}
    assert os.sched_getaffinity(0) == mine  # the thread that started it is left alone


@needs_affinity
def test_one_cpu_binds_to_a_single_usable_cpu_and_none_binds_nothing() -> None:
    mine = os.sched_getaffinity(0)
    with running(_affinity_server(cpu_affinity="one")) as srv:
        cpus = _cpus_of_a_connection(srv)
    assert len(cpus) == 1 and cpus[0] in mine
    with running(_affinity_server()) as srv:
        assert set(_cpus_of_a_connection(srv)) == mine


@needs_affinity
def test_serve_binds_the_calling_thread_while_it_serves_then_gives_it_back() -> None:
    mine = os.sched_getaffinity(0)
    cpu = min(mine)
    server = _affinity_server(cpu_affinity={cpu})
    after: List[Any] = []

    def serve() -> None:
        try:
            server.serve("127.0.0.1:0")
        finally:
            after.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=serve, name="serve-caller")
    thread.start()
    try:
        assert _wait_for(lambda: server.address is not None)
        assert thread.native_id is not None
        assert os.sched_getaffinity(thread.native_id) == {cpu}
        assert _cpus_of_a_connection(server) == [cpu]
    finally:
        server.close(TIMEOUT)
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert after == [mine]
