"""Three Redis-backed instances: one broadcast, and one send_to, reach clients on each.

    python examples/cluster.py                                # a throwaway redis-server
    python examples/cluster.py --redis redis://127.0.0.1:6379/0

Each instance is a ``Server(backplane=RedisBackplane(url))`` with its own clients. A
``broadcast()`` on instance 1 goes to its own clients directly and through Redis to the
other instances, which deliver it to theirs; ``send_to(connection_id, ...)`` goes straight
to the instance that holds that connection (its id starts with that instance's id).

In production the instances are separate processes or machines, on their own ports behind
nginx (docs/deployment.md); here they share one process to keep the script short, but
they still reach each other only through Redis. Without ``--redis`` the script starts a
``redis-server`` from PATH on a free port and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List

from wsroute_sync import Client, RedisBackplane, Server


def make_instance(redis_url: str) -> Server:
    """One instance: what each process of a real deployment would build."""
    server = Server(backplane=RedisBackplane(redis_url, channel_prefix="cluster-example"))

    @server.route("whoami")
    def whoami(ctx: Any, message: bytes) -> Dict[str, str]:
        return {"connection_id": ctx.connection_id}

    return server


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    """A redis-server on a free loopback port, in a temporary directory."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("cluster.py: no redis-server on PATH; install it (apt-get install "
                 "redis-server) or pass --redis URL")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "redis.conf")
        with open(config, "w") as f:
            f.write(f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {tmp}\n'
                    f"logfile {tmp}/redis.log\n")
        process = subprocess.Popen([binary, config], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:  # bounded polling: an external process coming up
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        s.sendall(b"PING\r\n")
                        if s.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    sys.exit(f"cluster.py: redis-server did not start (see {tmp}/redis.log)")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


def demo(redis_url: str) -> None:
    instances = [make_instance(redis_url) for _ in range(3)]
    with contextlib.ExitStack() as stack:
        for server in instances:
            stack.enter_context(server.start("127.0.0.1:0"))
        for server in instances:
            backplane = server.options.backplane
            assert isinstance(backplane, RedisBackplane)
            if not backplane.wait_connected(10):
                sys.exit(f"cluster.py: cannot reach Redis at {redis_url}")
        print(f"{len(instances)} instances subscribed to Redis")
        clients: List[Client] = [stack.enter_context(Client.connect(s.url)) for s in instances]
        ids = [c.call_json("whoami")["connection_id"] for c in clients]

        delivered = instances[0].broadcast({"news": "hello from instance 1"})
        print(f"instance 1 broadcast: {delivered} local client, the others through Redis")
        for n, client in enumerate(clients, 1):
            print(f"client on instance {n} got: {client.receive(timeout=10)}")

        instances[0].send_to(ids[2], {"private": "for the client on instance 3"})
        print(f"client on instance 3 got: {clients[2].receive(timeout=10)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", metavar="URL", help="use this Redis instead of starting one")
    args = parser.parse_args()
    if args.redis:
        demo(args.redis)
    else:
        with throwaway_redis() as url:
            demo(url)


if __name__ == "__main__":
    main()
