#!/usr/bin/env python3
"""Soak: hundreds of well-behaved clients and a crowd of misbehaving ones, for minutes.

Usage::

    python benchmarks/soak.py                       # 500 clients for 600 s
    python benchmarks/soak.py --duration 30         # what CI runs (tests/test_soak.py)
    python benchmarks/soak.py --clients 200 --misbehaving 0.25 --rate 2 --json out.json

A wsroute_sync server (this working tree) runs in a subprocess. ``--clients``
well-behaved clients each hold one connection for the whole run and send a request
about ``--rate`` times a second (``echo`` with a random payload, or ``add``), checking
every reply byte for byte. Alongside them ``--misbehaving`` x clients workers (10 % by
default) misbehave in a loop: send garbage instead of HTTP, stall in the request head,
vanish in the middle of a frame (RST), stop reading while the server pushes, send
oversized messages, break the framing, or open a connection and idle without answering
pings. The server's resident set size is sampled every ``--sample-every`` seconds once
all clients are connected; the report compares the first and the last minute (the
first and the last 20 % of the samples for runs under three minutes).

The server runs with glibc's per-thread malloc cache (tcache) switched off
(``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``, for the server process only): each
thread keeps up to 7 freed chunks of each of 64 sizes up to 1 KiB, about 240 KiB, and
with a thread per connection the caches of 500 threads fill over minutes, adding
~120 MiB of RSS that looks like a leak but is bounded (measured: the same run is flat
without it). Without the cache, RSS shows what the server itself holds, which is what a
soak is for. ``--glibc-tcache`` keeps glibc's default, to see the cost.

Exit status: 0 when every well-behaved reply was correct, every well-behaved connection
lived through the run, the server logged no ERROR and had no connection left once the
clients were gone; 1 otherwise; 2 when the soak cannot run at all. Memory growth is
reported, never judged here (tests/test_soak.py judges the CI run).

Clients are threads with small stacks: 500 of them sending once a second cost a few
percent of one core. Traffic goes to 127.0.0.1 only; every wait is bounded; the server
subprocess dies with this script (PR_SET_PDEATHSIG) and is stopped on every way out.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import random
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"

# The server's limits and timeouts: small, so that misbehaving clients cycle quickly.
MAX_MESSAGE_SIZE = 64 << 10
HANDSHAKE_TIMEOUT = 3.0
PING_INTERVAL = 5.0
PING_TIMEOUT = 5.0
WRITE_TIMEOUT = 2.0
CLOSE_TIMEOUT = 2.0
#: How long a well-behaved client waits for one reply before calling it a failure.
REPLY_TIMEOUT = 15.0
READY_TIMEOUT = 30.0
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# The server side (run as ``soak.py --serve``).


def serve(max_connections: int) -> None:
    """Run the soak's server until SIGTERM/SIGINT or until stdin closes."""
    sys.path.insert(0, str(ROOT))
    import logging

    from wsroute_sync import ConnectionClosed, Server

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(
        max_connections=max_connections, max_message_size=MAX_MESSAGE_SIZE,
        handshake_timeout=HANDSHAKE_TIMEOUT, ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT, write_timeout=WRITE_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT, handler_timeout=None,
    )

    @server.route("echo")
    def echo(ctx: Any, message: bytes) -> bytes:
        return message

    @server.route("add")
    def add(ctx: Any, message: bytes) -> Dict[str, int]:
        return {"sum": sum(ctx.params)}

    blob = b"p" * (16 << 10)

    @server.route("push")
    def push(ctx: Any, message: bytes) -> None:
        # For clients that stop reading: pushes until write_timeout drops them.
        try:
            for _ in range(int(ctx.params)):
                ctx.send(blob)
        except ConnectionClosed:
            pass

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def watch_stdin() -> None:
        sys.stdin.buffer.read()  # EOF: the soak is gone
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    server.start(f"{HOST}:0")
    print(f"READY port={server.address[1]}", flush=True)
    stop.wait()
    server.close(timeout=10)


# A minimal WebSocket client over a blocking socket (stdlib only, checks what it reads).


class ProtocolError(Exception):
    pass


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little")


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
          masked: bool = True, length: Optional[int] = None) -> bytes:
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class WSClient:
    """One connection: the opening handshake, masked frames out, checked frames in."""

    def __init__(self, port: int, timeout: float, *, rcvbuf: Optional[int] = None,
                 handshake: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:  # before connect, so the window starts small
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect((HOST, port))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = bytearray()
            self.port = port
            if handshake:
                self._handshake()
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET / HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = self.read_head()
        status = head.split(b"\r\n", 1)[0]
        if not status.startswith(b"HTTP/1.1 101 "):
            raise ProtocolError(f"handshake answered {status!r}")
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest())
        if b"\r\nsec-websocket-accept: " + accept.lower() not in head.lower():
            raise ProtocolError("wrong Sec-WebSocket-Accept")

    def close_now(self, reset: bool = False) -> None:
        if reset:  # SO_LINGER 0: close() sends RST, as a crashed or unplugged client
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("server closed the connection")
        self.buffer += chunk

    def read_head(self) -> bytes:
        """An HTTP response head (the status line and headers)."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
            if len(self.buffer) > 65536:
                raise ProtocolError("response head too large")
        end = self.buffer.index(b"\r\n\r\n") + 4
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        return head

    def send(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(frame(opcode, payload))

    def recv_frame(self) -> Tuple[int, bytes]:
        """The next frame; server frames must be final, unmasked, RSV clear."""
        while len(self.buffer) < 2:
            self._fill()
        b0, b1 = self.buffer[0], self.buffer[1]
        if b0 & 0x70 or b1 & 0x80 or not b0 & 0x80:
            raise ProtocolError(f"bad server frame header {bytes(self.buffer[:2])!r}")
        n = b1 & 0x7F
        pos = 2
        if n >= 126:
            pos = 4 if n == 126 else 10
            while len(self.buffer) < pos:
                self._fill()
            n = int.from_bytes(self.buffer[2:pos], "big")
        while len(self.buffer) < pos + n:
            self._fill()
        payload = bytes(self.buffer[pos:pos + n])
        del self.buffer[:pos + n]
        return b0 & 0x0F, payload

    def recv_data(self) -> Tuple[int, bytes]:
        """The next text/binary message, answering pings; Close raises EOFError."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode in (1, 2):
                return opcode, payload
            if opcode == 9:
                self.send(10, payload)
            elif opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                raise EOFError(f"server sent Close {code}")
            elif opcode != 10:
                raise ProtocolError(f"unexpected opcode {opcode}")

    def expect_close(self) -> int:
        """Read (and drop) frames until the server's Close; return its code."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

    def close(self) -> None:
        """The closing handshake, bounded by the socket timeout."""
        try:
            self.send(8, struct.pack("!H", 1000))
            self.expect_close()
        except (OSError, EOFError, ProtocolError):
            pass
        finally:
            self.sock.close()


# Well-behaved clients.


@dataclasses.dataclass
class WellBehaved:
    replies: int = 0
    wrong: int = 0
    failure: Optional[str] = None
    examples: List[str] = dataclasses.field(default_factory=list)


ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 é✓🎉\"\\\n"


def well_behaved(index: int, port: int, rate: float, connected: threading.Barrier,
                 stop: threading.Event, result: WellBehaved) -> None:
    rng = random.Random(index)
    client: Optional[WSClient] = None
    try:
        client = WSClient(port, REPLY_TIMEOUT)
    except Exception as exc:
        result.failure = f"connect: {exc!r}"
    try:
        connected.wait(READY_TIMEOUT)
    except threading.BrokenBarrierError:
        pass
    if client is None:
        return
    period = 1.0 / rate
    next_send = time.monotonic() + rng.random() * period
    seq = 0
    try:
        while not stop.wait(max(0.0, next_send - time.monotonic())):
            next_send += period
            seq += 1
            binary = rng.random() < 0.2
            if rng.random() < 0.25:
                numbers = [rng.randint(-10**6, 10**6) for _ in range(rng.randint(0, 20))]
                request: Dict[str, Any] = {"Route": "add", "Params": numbers}
                expected: Any = {"sum": sum(numbers)}
            else:
                text = "".join(rng.choices(ALPHABET, k=rng.randint(0, 600)))
                request = {"Route": "echo", "Params": {"c": index, "n": seq, "text": text}}
                expected = request["Params"]
            data = json.dumps(request, ensure_ascii=rng.random() < 0.5).encode()
            client.send(2 if binary else 1, data)
            opcode, payload = client.recv_data()
            result.replies += 1
            try:
                ok = opcode == (2 if binary else 1) and json.loads(payload) == expected
            except ValueError:
                ok = False
            if not ok:
                result.wrong += 1
                if len(result.examples) < 3:
                    result.examples.append(f"{request!r} -> {opcode} {payload[:200]!r}")
    except Exception as exc:
        result.failure = f"after {result.replies} replies: {exc!r}"
    finally:
        client.close()


# Misbehaving clients: each behaviour returns the outcome it saw, for the report.


def garbage(port: int, rng: random.Random, stop: threading.Event) -> str:
    client = WSClient(port, 10.0, handshake=False)
    try:
        junk = rng.choice([b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x00\xff",
                           b"hello?\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"])
        client.sock.sendall(junk + os.urandom(rng.randint(0, 200)))
        return client.read_head().split(b" ", 2)[1].decode()
    finally:
        client.close_now()


def slow_head(port: int, rng: random.Random, stop: threading.Event) -> str:
    client = WSClient(port, 10.0, handshake=False)
    try:
        client.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgr")  # ... and no more
        return client.read_head().split(b" ", 2)[1].decode()  # 408 after handshake_timeout
    finally:
        client.close_now()


def vanish_mid_frame(port: int, rng: random.Random, stop: threading.Event) -> str:
    client = WSClient(port, 10.0)
    payload = os.urandom(rng.randint(200, 20000))
    client.sock.sendall(frame(2, payload)[:rng.randint(1, len(payload))])
    client.close_now(reset=True)
    return "reset"


def stop_reading(port: int, rng: random.Random, stop: threading.Event) -> str:
    client = WSClient(port, 10.0, rcvbuf=4096)
    try:
        client.send(1, b'{"Route":"push","Params":4096}')  # 64 MiB it will never read
        # The server should give up after write_timeout; hold the socket past that.
        stop.wait(WRITE_TIMEOUT + rng.random() * 2)
        return "held"
    finally:
        client.close_now(reset=True)


def oversized(port: int, rng: random.Random, stop: threading.Event) -> str:
    client = WSClient(port, 10.0)
    try:
        client.send(rng.choice([1, 2]), b"[" + b"1," * (MAX_MESSAGE_SIZE // 2) + b"1]")
        return f"close {client.expect_close()}"
    finally:
        client.close_now()


def broken_frame(port: int, rng: random.Random, stop: threading.Event) -> str:
    client = WSClient(port, 10.0)
    try:
        client.sock.sendall(rng.choice([
            frame(1, b"unmasked", masked=False), frame(1, b"x", rsv=4), frame(3, b""),
            frame(9, b"x" * 126), frame(1, b"\xc3\x28"), frame(0, b"orphan"),
            frame(8, b"\x03\xe7"), frame(2, b"", length=(1 << 63) - 1),
        ]))
        return f"close {client.expect_close()}"
    finally:
        client.close_now()


def idle(port: int, rng: random.Random, stop: threading.Event) -> str:
    client = WSClient(port, 10.0)
    try:
        # Pings go unanswered: the server should close with 1011 after ping_interval +
        # ping_timeout. Short reads, so that the end of the soak is not held up.
        client.sock.settimeout(0.5)
        deadline = time.monotonic() + PING_INTERVAL + PING_TIMEOUT + 5.0
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                return f"close {client.expect_close()}"
            except socket.timeout:
                continue  # a partial frame stays in the buffer
        return "stopped" if stop.is_set() else "never closed"
    finally:
        client.close_now()


BEHAVIOURS: List[Callable[[int, random.Random, threading.Event], str]] = [
    garbage, slow_head, vanish_mid_frame, stop_reading, oversized, broken_frame, idle,
]


def misbehaving(index: int, port: int, stop: threading.Event,
                outcomes: Dict[str, Dict[str, int]], lock: threading.Lock) -> None:
    rng = random.Random(1_000_000 + index)
    while not stop.is_set():
        behaviour = rng.choice(BEHAVIOURS)
        try:
            outcome = behaviour(port, rng, stop)
        except (OSError, EOFError, ProtocolError) as exc:
            outcome = type(exc).__name__
        with lock:
            counts = outcomes.setdefault(behaviour.__name__, {})
            counts[outcome] = counts.get(outcome, 0) + 1
        stop.wait(rng.uniform(0.05, 0.5))


# Measuring the server.


def rss_bytes(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def health(port: int) -> Optional[Dict[str, Any]]:
    try:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: soak\r\n\r\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]
    except (OSError, ValueError, IndexError):
        return None


def windows(samples: List[Tuple[float, int]]) -> Tuple[str, List[int], List[int]]:
    """The first and last minute of samples, or the first and last 20 % of them."""
    if not samples:
        return "none", [], []
    span = samples[-1][0] - samples[0][0]
    if span >= 180:
        start, end = samples[0][0], samples[-1][0]
        first = [r for t, r in samples if t - start < 60]
        last = [r for t, r in samples if end - t < 60]
        return "first vs last minute", first, last
    k = max(1, round(len(samples) * 0.2))
    return f"first vs last 20% of samples ({k} each)", [r for _, r in samples[:k]], [
        r for _, r in samples[-k:]]


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_server(max_connections: int, log: Any, tcache: bool
                 ) -> Tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    env = dict(os.environ)
    if not tcache:
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join(tunables + ["glibc.malloc.tcache_count=0"])
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve",
         "--max-connections", str(max_connections)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 256)
        if not chunk:
            break
        line += chunk
    if not line.startswith(b"READY port="):
        stop_server(proc)
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, int(line.split(b"=", 1)[1])


def stop_server(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


# The run.


def run(args: argparse.Namespace) -> int:
    n_bad = round(args.clients * args.misbehaving)
    threading.stack_size(256 << 10)
    log = tempfile.TemporaryFile()
    try:
        proc, port = start_server(args.clients + 2 * n_bad + 100, log, args.glibc_tcache)
    except (OSError, RuntimeError) as exc:
        print(f"soak: cannot start the server: {exc}", file=sys.stderr)
        return 2
    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    say(f"soak: server pid {proc.pid} on port {port}; {args.clients} well-behaved "
        f"clients at {args.rate}/s each, {n_bad} misbehaving, {args.duration:g} s")
    stop = threading.Event()
    connected = threading.Barrier(args.clients + 1)
    results = [WellBehaved() for _ in range(args.clients)]
    outcomes: Dict[str, Dict[str, int]] = {}
    lock = threading.Lock()
    threads = [threading.Thread(target=well_behaved, name=f"good-{i}",
                                args=(i, port, args.rate, connected, stop, results[i]))
               for i in range(args.clients)]
    bad_threads = [threading.Thread(target=misbehaving, name=f"bad-{i}",
                                    args=(i, port, stop, outcomes, lock))
                   for i in range(n_bad)]
    samples: List[Tuple[float, int]] = []
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
        try:
            connected.wait(READY_TIMEOUT)
        except threading.BrokenBarrierError:
            pass
        say(f"soak: {sum(r.failure is None for r in results)}/{args.clients} connected in "
            f"{time.monotonic() - started:.1f} s")
        for t in bad_threads:
            t.start()
        end = time.monotonic() + args.duration
        while True:
            rss = rss_bytes(proc.pid)
            if rss is not None:
                samples.append((time.monotonic(), rss))
            if proc.poll() is not None or stop.wait(max(0.0, min(args.sample_every,
                                                                 end - time.monotonic()))):
                break
            if time.monotonic() >= end:
                rss = rss_bytes(proc.pid)
                if rss is not None:
                    samples.append((time.monotonic(), rss))
                break
            if not args.quiet and len(samples) % max(1, round(30 / args.sample_every)) == 0:
                say(f"soak: {time.monotonic() - started:5.0f} s  rss {mib(samples[-1][1])}  "
                    f"replies {sum(r.replies for r in results)}")
    except KeyboardInterrupt:
        say("soak: interrupted")
    finally:
        stop.set()
        for t in threads + bad_threads:
            t.join(REPLY_TIMEOUT + PING_INTERVAL + PING_TIMEOUT + 10)
    # With every client gone, the server must give every slot back.
    active_after: Optional[int] = None
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT + WRITE_TIMEOUT + CLOSE_TIMEOUT + 10
    while proc.poll() is None:
        status = health(port)
        active_after = None if status is None else status.get("active_connections")
        # The health request itself holds one slot while it is answered.
        if active_after is not None and active_after <= 1 or time.monotonic() > deadline:
            break
        stop.wait(0.5)
    crashed = proc.poll() is not None
    stop_server(proc)
    log.seek(0)
    server_log = log.read().decode("utf-8", "replace")
    log.close()
    errors = [line for line in server_log.splitlines() if " ERROR " in line
              or line.startswith("Traceback")]

    replies = sum(r.replies for r in results)
    wrong = sum(r.wrong for r in results)
    failed = [(i, r.failure) for i, r in enumerate(results) if r.failure]
    label, first, last = windows(samples)
    first_rss = statistics.mean(first) if first else 0.0
    last_rss = statistics.mean(last) if last else 0.0
    summary = {
        "duration": args.duration, "clients": args.clients, "misbehaving_workers": n_bad,
        "replies_checked": replies, "wrong_replies": wrong,
        "failed_connections": len(failed), "server_errors": len(errors),
        "server_crashed": crashed, "active_after": active_after,
        "glibc_tcache": args.glibc_tcache, "rss_window": label,
        "rss_first": first_rss, "rss_last": last_rss,
        "rss_max": max((r for _, r in samples), default=0), "rss_samples": len(samples),
        "misbehaviour": outcomes,
        "rss_series": [[round(t - samples[0][0], 1), r] for t, r in samples],
    }
    print(f"soak: {replies} replies checked, {wrong} wrong; {len(failed)} of "
          f"{args.clients} well-behaved connections failed")
    print(f"soak: server RSS {label}: {mib(first_rss)} -> {mib(last_rss)} "
          f"({(last_rss - first_rss) / first_rss * 100 if first_rss else 0:+.1f} %), "
          f"max {mib(summary['rss_max'])}, {len(samples)} samples, glibc tcache "
          f"{'on' if args.glibc_tcache else 'off (see --glibc-tcache)'}")
    print("soak: misbehaviour: " + "; ".join(
        f"{name} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})"
        for name, c in sorted(outcomes.items())))
    print(f"soak: server active connections after the run: {active_after}; "
          f"ERROR lines in its log: {len(errors)}")
    for i, failure in failed[:5]:
        print(f"soak: client {i} failed: {failure}")
    for r in results:
        for example in r.examples:
            print(f"soak: wrong reply: {example}")
    for line in errors[:10]:
        print(f"soak: server: {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    ok = (not wrong and not failed and not errors and not crashed and replies > 0
          and active_after is not None and active_after <= 1)
    print("soak: OK" if ok else "soak: FAILED")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of traffic once every client is connected (600)")
    parser.add_argument("--clients", type=int, default=500,
                        help="well-behaved connections held for the whole run (500)")
    parser.add_argument("--misbehaving", type=float, default=0.1,
                        help="misbehaving workers, as a fraction of --clients (0.1)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="requests per second per well-behaved client (1)")
    parser.add_argument("--sample-every", type=float, default=2.0,
                        help="seconds between RSS samples of the server (2)")
    parser.add_argument("--glibc-tcache", action="store_true",
                        help="keep glibc's per-thread malloc cache in the server (see above)")
    parser.add_argument("--json", help="also write the summary to this file")
    parser.add_argument("--quiet", action="store_true", help="only the final report")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-connections", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.max_connections)
        return 0
    if args.duration <= 0 or args.clients < 1 or not 0 <= args.misbehaving <= 10 \
            or args.rate <= 0 or args.sample_every <= 0:
        parser.error("--duration, --clients, --rate, --sample-every must be positive; "
                     "--misbehaving a fraction from 0 to 10")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
