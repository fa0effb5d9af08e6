"""Scale-out with the real parts: worker processes, a Redis backplane, nginx in front.

The integration tests start a real ``redis-server`` and ``nginx`` (Debian packages of the
same names; tests/run.sh installs them) on free loopback ports, with configurations
written into a temporary directory, and stop them afterwards. They are skipped, with the
reason, only where a binary is not installed. Worker processes run in a subprocess (the
CLI, or a script), never forked from the test process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from conftest import TIMEOUT, ListHandler, make_server, running
from wsroute_sync import (
    Backplane,
    BackplaneMessage,
    Client,
    ConnectionClosed,
    HandshakeRejected,
    RedisBackplane,
    Server,
)
from wsroute_sync.backplane import Deliver

ROOT = Path(__file__).resolve().parent.parent


# Helpers: external processes.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def poll_until(predicate: Callable[[], bool], timeout: float = TIMEOUT,
               what: str = "condition") -> None:
    """Bounded polling, for external processes only (no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def binary(name: str, *extra_paths: str) -> str:
    found = shutil.which(name) or next((p for p in extra_paths if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian package {name!r}; tests/run.sh "
                    "installs it where apt-get is available)")
    return found


class RedisProcess:
    """A redis-server on a free loopback port; stop() kills it, start() brings it back."""

    def __init__(self, tmp: Path) -> None:
        self.binary = binary("redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.config = tmp / "redis.conf"
        self.config.write_text(
            f'port {self.port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {tmp}\n'
            f"logfile {tmp}/redis.log\nprotected-mode no\n"
        )
        self.process: Optional["subprocess.Popen[bytes]"] = None

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        poll_until(self._pong, what="redis-server to answer PING")

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(TIMEOUT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    redis = RedisProcess(tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.kill()


@contextlib.contextmanager
def nginx_in_front(tmp: Path, upstreams: List[Tuple[str, int]]) -> Iterator[str]:
    """nginx on a free port, round-robin over ``upstreams``; yields its ws:// URL."""
    nginx = binary("nginx", "/usr/sbin/nginx")
    port = free_port()
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / name).mkdir(exist_ok=True)
    servers = "\n".join(f"        server {host}:{p};" for host, p in upstreams)
    config = tmp / "nginx.conf"
    config.write_text(textwrap.dedent(f"""\
        {"user root;" if os.geteuid() == 0 else ""}
        daemon off;
        worker_processes 1;
        pid {tmp}/nginx.pid;
        error_log {tmp}/error.log info;
        events {{ worker_connections 64; }}
        http {{
            access_log {tmp}/access.log;
            client_body_temp_path {tmp}/client_body;
            proxy_temp_path {tmp}/proxy;
            fastcgi_temp_path {tmp}/fastcgi;
            uwsgi_temp_path {tmp}/uwsgi;
            scgi_temp_path {tmp}/scgi;
            upstream instances {{
        {servers}
            }}
            server {{
                listen 127.0.0.1:{port};
                location / {{
                    proxy_pass http://instances;
                    proxy_http_version 1.1;
                    proxy_set_header Upgrade $http_upgrade;
                    proxy_set_header Connection "upgrade";
                    proxy_set_header Host $http_host;
                }}
            }}
        }}
        """))
    process = subprocess.Popen([nginx, "-p", str(tmp), "-c", str(config),
                                "-e", str(tmp / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def listening() -> bool:
        if process.poll() is not None:
            assert process.stderr is not None
            raise AssertionError(f"nginx exited: {process.stderr.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        poll_until(listening, what="nginx to listen")
        yield f"ws://127.0.0.1:{port}/"
    finally:
        process.terminate()  # nginx's fast shutdown
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait(TIMEOUT)
        assert process.stderr is not None
        process.stderr.close()


# Helpers: instances.


def make_instance(redis_url: str, prefix: str, **options: Any) -> Server:
    backplane = RedisBackplane(redis_url, channel_prefix=prefix, connect_timeout=1.0,
                               max_backoff=0.5)
    server = make_server(backplane=backplane, **options)

    @server.route("whoami")
    def whoami(ctx: Any, message: bytes) -> Dict[str, Any]:
        return {"id": ctx.connection_id}

    @server.route("join")
    def join(ctx: Any, message: bytes) -> Dict[str, Any]:
        ctx.connection.join(ctx.params)
        return {"rooms": sorted(ctx.connection.rooms)}

    return server


def backplane_of(server: Server) -> RedisBackplane:
    backplane = server.options.backplane
    assert isinstance(backplane, RedisBackplane)
    return backplane


@contextlib.contextmanager
def cluster(redis_url: str, n: int = 3) -> Iterator[List[Server]]:
    """``n`` instances on their own ports, sharing a fresh channel prefix."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running(make_instance(redis_url, prefix)))
                   for _ in range(n)]
        for server in servers:
            assert backplane_of(server).wait_connected(TIMEOUT), "backplane not subscribed"
        yield servers


def instance_of(connection_id: str) -> str:
    return connection_id.rpartition("-")[0]


def receive_json(client: Client) -> Any:
    return json.loads(client.receive(timeout=TIMEOUT))


# Without external processes: the message format and the server's hooks.


class MemoryHub:
    """An in-process bus, to test the server's side of the Backplane interface."""

    def __init__(self) -> None:
        self.members: List["MemoryBackplane"] = []
        self.published: List[BackplaneMessage] = []


class MemoryBackplane(Backplane):
    def __init__(self, hub: MemoryHub) -> None:
        super().__init__()
        self.hub = hub

    def start(self, instance_id: str, deliver: Deliver) -> None:
        self.instance_id, self._deliver = instance_id, deliver
        self.hub.members.append(self)

    def publish(self, message: BackplaneMessage) -> bool:
        self.hub.published.append(message)
        for member in list(self.hub.members):  # every member, ourselves too: _dispatch filters
            member._dispatch(BackplaneMessage.decode(message.encode()))
        return True

    def close(self) -> None:
        if self in self.hub.members:
            self.hub.members.remove(self)


def test_message_round_trip() -> None:
    for message in (
        BackplaneMessage("broadcast", "text é\n{}", origin="a1"),
        BackplaneMessage("room", b"\x00\xffbinary\n", target="blue", origin="a1"),
        BackplaneMessage("send_to", "x", target="b2-7", origin="a1", destination="b2"),
    ):
        assert BackplaneMessage.decode(message.encode()) == message
    with pytest.raises(ValueError):
        BackplaneMessage.decode(b"no header")
    with pytest.raises(ValueError):
        BackplaneMessage.decode(b'{"v":1,"k":"nope"}\nx')
    with pytest.raises(ValueError):
        BackplaneMessage("room", "x")  # a room message needs its room


def test_backplane_option_is_validated() -> None:
    with pytest.raises(TypeError, match="Backplane"):
        Server(backplane="redis://localhost")  # type: ignore[arg-type]
    backplane = MemoryBackplane(MemoryHub())
    Server(backplane=backplane)
    with pytest.raises(ValueError, match="another Server"):
        Server(backplane=backplane)
    with pytest.raises(ValueError, match="url"):
        RedisBackplane("http://localhost:6379")


def test_broadcast_send_to_and_rooms_through_a_backplane() -> None:
    hub = MemoryHub()
    one = make_server(backplane=MemoryBackplane(hub))
    two = make_server(backplane=MemoryBackplane(hub))

    @one.route("join")
    def join(ctx: Any, message: bytes) -> str:
        ctx.connection.join(ctx.params)
        return "joined"

    with running(one), running(two):
        with Client.connect(one.url) as a, Client.connect(two.url) as b:
            assert a.call("join", "blue") == b"joined"
            a_id = one.connections[0].id
            b_id = two.connections[0].id
            assert instance_of(a_id) != instance_of(b_id)

            assert one.broadcast({"n": 1}) == 1  # local count; the other instance too
            assert receive_json(a) == {"n": 1} and receive_json(b) == {"n": 1}
            assert two.broadcast("blue only", room="blue") == 0
            assert a.receive(timeout=TIMEOUT) == "blue only"
            assert two.send_to(a_id, b"to a") is True
            assert a.receive(timeout=TIMEOUT) == b"to a"
            assert one.send_to(a_id, "local") is True
            assert a.receive(timeout=TIMEOUT) == "local"
            # A predicate is a local function: that broadcast stays on its instance.
            published = len(hub.published)
            assert two.broadcast("mine", predicate=lambda c: True) == 1
            assert len(hub.published) == published
            assert b.receive(timeout=TIMEOUT) == "mine"
            # Nothing arrived twice, nothing for b from the room or the send_to: the next
            # message on each is the next broadcast.
            one.broadcast("last")
            assert a.receive(timeout=TIMEOUT) == "last"
            assert b.receive(timeout=TIMEOUT) == "last"
            assert one.send_to(f"{instance_of(a_id)}-999", "nobody") is False
    assert hub.members == []  # close() closed the backplanes


def test_without_backplane_send_to_and_rooms_are_local() -> None:
    server = make_server()

    @server.route("join")
    def join(ctx: Any, message: bytes) -> str:
        ctx.connection.join(ctx.params)
        return "joined"

    with running(server), Client.connect(server.url) as a, Client.connect(server.url) as b:
        assert a.call("join", "red") == b"joined"
        (a_conn,) = [c for c in server.connections if "red" in c.rooms]
        assert server.broadcast("red news", room="red") == 1
        assert a.receive(timeout=TIMEOUT) == "red news"
        assert server.send_to(a_conn.id, {"k": 1}) is True
        assert receive_json(a) == {"k": 1}
        assert server.send_to("elsewhere-1", "x") is False
        a_conn.leave("red")
        assert server.broadcast("again", room="red") == 0
        assert server.broadcast("all") == 2
        assert a.receive(timeout=TIMEOUT) == "all" and b.receive(timeout=TIMEOUT) == "all"


def test_workers_argument_is_validated() -> None:
    server = make_server()
    with pytest.raises(ValueError, match="workers"):
        server.serve("127.0.0.1:0", workers=0)
    with pytest.raises(TypeError, match="workers"):
        server.serve("127.0.0.1:0", workers="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unix"):
        server.serve("unix:/tmp/wsroute-never.sock", workers=2)
    with pytest.raises(OSError):
        with socket.socket() as taken:  # no SO_REUSEPORT on it: the port cannot be shared
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server.serve(f"127.0.0.1:{taken.getsockname()[1]}", workers=2)


# With Redis and nginx.


def test_broadcast_from_one_instance_reaches_clients_of_all_three_behind_nginx(
    redis_server: RedisProcess, tmp_path: Path
) -> None:
    with cluster(redis_server.url) as servers:
        upstreams = [s.address for s in servers]
        with nginx_in_front(tmp_path, upstreams) as url, contextlib.ExitStack() as stack:
            clients: Dict[str, Client] = {}  # one per instance, by instance id
            for _ in range(12):  # round robin spreads them; bounded in case it does not
                client = stack.enter_context(Client.connect(url, timeout=TIMEOUT))
                instance = instance_of(client.call_json("whoami")["id"])
                clients.setdefault(instance, client)
                if len(clients) == 3:
                    break
            assert len(clients) == 3, "nginx did not spread the clients over 3 instances"
            assert servers[0].broadcast({"news": "A"}) >= 1
            for client in clients.values():
                assert receive_json(client) == {"news": "A"}
            # Then one from another instance: had anyone received A twice (instance 0
            # taking its own publication back), that copy would come before C.
            servers[1].broadcast({"news": "C"})
            for client in clients.values():
                assert receive_json(client) == {"news": "C"}


def test_send_to_and_rooms_cross_instances(redis_server: RedisProcess) -> None:
    with cluster(redis_server.url) as servers, contextlib.ExitStack() as stack:
        clients = [stack.enter_context(Client.connect(s.url)) for s in servers]
        ids = [c.call_json("whoami")["id"] for c in clients]
        assert clients[0].call_json("join", "blue") == {"rooms": ["blue"]}
        assert clients[1].call_json("join", "blue") == {"rooms": ["blue"]}

        assert servers[0].send_to(ids[2], {"for": "client 2"}) is True
        assert receive_json(clients[2]) == {"for": "client 2"}
        assert servers[2].broadcast({"room": "blue"}, room="blue") == 0
        assert receive_json(clients[0]) == {"room": "blue"}
        assert receive_json(clients[1]) == {"room": "blue"}
        servers[2].broadcast("end")
        for client in clients:  # client 2 got neither the room message nor a copy
            assert client.receive(timeout=TIMEOUT) == "end"


def test_redis_lost_and_back(redis_server: RedisProcess) -> None:
    logs = ListHandler()
    logger = logging.getLogger("wsroute_sync.backplane")
    logger.addHandler(logs)
    try:
        with cluster(redis_server.url, n=2) as servers, contextlib.ExitStack() as stack:
            local_a, local_b, remote = [
                stack.enter_context(Client.connect(url))
                for url in (servers[0].url, servers[0].url, servers[1].url)
            ]
            redis_server.kill()
            poll_until(lambda: not any(backplane_of(s).connected for s in servers),
                       what="both backplanes to notice")
            # Local delivery goes on without Redis.
            assert servers[0].broadcast("during the gap") == 2
            assert local_a.receive(timeout=TIMEOUT) == "during the gap"
            assert local_b.receive(timeout=TIMEOUT) == "during the gap"

            redis_server.start()
            for server in servers:
                assert backplane_of(server).wait_connected(TIMEOUT), "no reconnection"
            servers[0].broadcast("after")
            # The gap's message is not replayed to the other instance, nor repeated here.
            for client in (local_a, local_b, remote):
                assert client.receive(timeout=TIMEOUT) == "after"
            servers[1].broadcast("from the other side")
            for client in (local_a, local_b, remote):
                assert client.receive(timeout=TIMEOUT) == "from the other side"
    finally:
        logger.removeHandler(logs)
    warnings = logs.messages(logging.WARNING)
    assert any("lost Redis" in m and "local delivery continues" in m for m in warnings)
    assert any("reconnected to Redis" in m and "1 message(s) could not be published" in m
               for m in warnings), warnings


def test_redis_unreachable_at_start_is_degraded_mode(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path)  # configured, not started yet
    logs = ListHandler()
    logger = logging.getLogger("wsroute_sync.backplane")
    logger.addHandler(logs)
    try:
        server = make_instance(redis.url, "test-degraded")
        with running(server), Client.connect(server.url) as client:
            assert not backplane_of(server).wait_connected(0.2)
            assert server.broadcast("local only") == 1
            assert client.receive(timeout=TIMEOUT) == "local only"
            redis.start()
            try:
                assert backplane_of(server).wait_connected(TIMEOUT)
            finally:
                redis.kill()
    finally:
        logger.removeHandler(logs)
    assert any("cannot reach Redis" in m for m in logs.messages(logging.ERROR))


def test_cluster_example(redis_server: RedisProcess) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cluster.py"), "--redis", redis_server.url],
        capture_output=True, text=True, timeout=TIMEOUT * 4,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "3 instances subscribed to Redis",
        "instance 1 broadcast: 1 local client, the others through Redis",
        'client on instance 1 got: {"news":"hello from instance 1"}',
        'client on instance 2 got: {"news":"hello from instance 1"}',
        'client on instance 3 got: {"news":"hello from instance 1"}',
        'client on instance 3 got: {"private":"for the client on instance 3"}',
    ]


# Worker processes.

APP = '''\
import os, sys, threading
from wsroute_sync import Server

server = Server(handler_timeout=None, max_connections=int(os.environ.get("MAXCONN", "1000")),
                thread_policy=os.environ.get("THREAD_POLICY", "auto"),
                cpu_affinity=os.environ.get("CPU_AFFINITY") or None)

@server.route("pid")
def pid(ctx, message):
    policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"pid": os.getpid(), "policy": policy, "cpus": cpus}
'''

SCRIPT = '''\
import logging, sys, threading
from app import server

logging.basicConfig(level=logging.INFO, format="%(message)s")

def close_on_stdin():
    sys.stdin.readline()
    server.close()

threading.Thread(target=close_on_stdin, daemon=True).start()
server.serve("127.0.0.1:0", workers=2)
print("serve returned", flush=True)
'''


@contextlib.contextmanager
def supervisor(tmp: Path, argv: List[str], env: Optional[Dict[str, str]] = None
               ) -> Iterator[Tuple["subprocess.Popen[str]", str]]:
    """A supervising process; yields it and its URL; always ends it and its workers."""
    (tmp / "app.py").write_text(APP)
    (tmp / "script.py").write_text(SCRIPT)
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=tmp, text=True, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(tmp), **(env or {})},
    )
    assert process.stdout is not None and process.stderr is not None
    workers: List[int] = []
    try:
        # The CLI prints "listening on URL"; the script logs "... supervising 2 workers on
        # URL (pid N)" once both workers listen.
        stream = process.stdout if argv[0] == "-m" else process.stderr
        match = wait_for_line(stream.fileno(), r"(?:listening on|workers on) (ws://\S+)")
        assert match, f"no URL from the supervisor (exit status {process.poll()})"
        yield process, match.group(1)
    finally:
        workers = children_of(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(TIMEOUT * 3)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait(TIMEOUT)
        for pid in workers:  # orphans would notice the supervisor is gone; make sure
            with contextlib.suppress(ProcessLookupError):
                poll_until(lambda: not alive(pid), what=f"worker {pid} to exit")
        for stream_ in (process.stdin, process.stdout, process.stderr):
            if stream_ is not None:
                stream_.close()


def wait_for_line(fd: int, pattern: str, timeout: float = TIMEOUT * 2
                  ) -> Optional["re.Match[str]"]:
    """Read raw output from ``fd`` until a line matches ``pattern``, for ``timeout`` at most."""
    deadline = time.monotonic() + timeout
    seen = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        seen += chunk
        match = re.search(pattern, seen.decode("utf-8", "replace"))
        if match:
            return match


def children_of(pid: int) -> List[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    """True while any thread of ``pid`` runs (zombies, dead but not reaped, are gone).

    Every thread counts: a killed process's main thread turns zombie before the others
    have exited, and until they have, its sockets (a worker's listener) are still open.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            return True
    return False


def pid_of_new_connection(url: str) -> int:
    with Client.connect(url, timeout=TIMEOUT) as client:
        return int(client.call_json("pid")["pid"])


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT here")
def test_two_workers_serve_and_a_killed_one_is_replaced(tmp_path: Path) -> None:
    argv = ["-m", "wsroute_sync", "serve", "app:server", "--port", "0", "--workers", "2"]
    with supervisor(tmp_path, argv) as (process, url):
        pids = set()
        for _ in range(40):  # connections are hashed over the two sockets
            pids.add(pid_of_new_connection(url))
            if len(pids) == 2:
                break
        assert len(pids) == 2 and process.pid not in pids
        assert sorted(children_of(process.pid)) == sorted(pids)
        if hasattr(os, "SCHED_BATCH"):
            # thread_policy="auto" leaves worker processes' connection threads alone.
            with Client.connect(url, timeout=TIMEOUT) as client:
                assert client.call_json("pid")["policy"] == os.SCHED_OTHER

        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        poll_until(lambda: not alive(victim), what="the killed worker to die")
        seen: Set[int] = set()
        deadline = time.monotonic() + TIMEOUT
        while not (seen - pids) and time.monotonic() < deadline:
            seen.add(pid_of_new_connection(url))  # the port keeps answering throughout
        replacement = seen - pids
        assert len(replacement) == 1, "the killed worker was not replaced"
        assert victim not in seen
        workers = set(children_of(process.pid))
        assert victim not in workers and replacement <= workers

        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT * 3) == 0
        assert not any(alive(pid) for pid in workers)
        assert process.stderr is not None
        log = process.stderr.read()
    assert "was killed by SIGKILL" in log and "restarting it in" in log


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT here")
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs thread affinity and two usable CPUs")
def test_one_cpu_affinity_gives_each_worker_a_cpu_of_its_own(tmp_path: Path) -> None:
    env = {"CPU_AFFINITY": "one"}
    with supervisor(tmp_path, ["script.py"], env=env) as (process, url):
        cpus: Dict[int, List[int]] = {}
        for _ in range(40):  # connections are hashed over the two sockets
            with Client.connect(url, timeout=TIMEOUT) as client:
                answer = client.call_json("pid")
            cpus[int(answer["pid"])] = answer["cpus"]
            if len(cpus) == 2:
                break
        assert len(cpus) == 2
        first, second = cpus.values()
        assert len(first) == 1 and len(second) == 1 and first != second
        assert {first[0], second[0]} <= os.sched_getaffinity(0)
        assert process.stdin is not None
        process.stdin.write("close\n")
        process.stdin.flush()
        assert process.wait(TIMEOUT * 3) == 0


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT here")
def test_max_connections_is_per_worker_and_close_stops_every_worker(tmp_path: Path) -> None:
    env = {"MAXCONN": "1", "THREAD_POLICY": "batch"}
    with supervisor(tmp_path, ["script.py"], env=env) as (process, url):
        held: Dict[int, Client] = {}
        try:
            for _ in range(40):
                try:
                    client = Client.connect(url, timeout=TIMEOUT)
                except HandshakeRejected as exc:
                    assert exc.status == 503  # this worker is full
                    continue
                answer = client.call_json("pid")
                held[int(answer["pid"])] = client
                if hasattr(os, "SCHED_BATCH"):  # asked for explicitly, workers use it too
                    assert answer["policy"] == os.SCHED_BATCH
                if len(held) == 2:
                    break
            # One connection in each worker: max_connections=1 applies to each.
            assert len(held) == 2
            with pytest.raises(HandshakeRejected) as refused:
                Client.connect(url, timeout=TIMEOUT)
            assert refused.value.status == 503

            assert process.stdin is not None
            process.stdin.write("close\n")  # the script calls server.close()
            process.stdin.flush()
            for client in held.values():  # every worker closed its client with 1001
                with pytest.raises(ConnectionClosed) as closed:
                    client.receive(timeout=TIMEOUT * 2)
                assert closed.value.code == 1001
            assert process.wait(TIMEOUT * 3) == 0
            assert process.stdout is not None
            assert process.stdout.read() == "serve returned\n"
            assert not any(alive(pid) for pid in held)
        finally:
            for client in held.values():
                client.close()
