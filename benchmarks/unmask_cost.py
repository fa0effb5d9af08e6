#!/usr/bin/env python3
"""Receive cost of masked frames through MessageStream.receive, sans I/O, in ns a message.

Three cases that exercise frames.unmask: 64-byte binary frames one per read (receive()'s
whole-frame check), the same frames 100 per read (the frame walk), and a 200 KB frame
(the payload steps, translate tables). Prints the minimum and median of a few rounds::

    python benchmarks/unmask_cost.py [--rounds 7]

``ROOT=/some/checkout`` measures another tree of the package (e.g. a ``git archive``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import List, Tuple

ROOT = os.environ.get("ROOT", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from wsroute_sync.http import Headers, HTTPRequest  # noqa: E402

try:
    from wsroute_sync.handshake import accept_upgrade
    from wsroute_sync.stream import MessageStream
except ImportError:  # a tree from before protocol.py was split (#16)
    from wsroute_sync.protocol import MessageStream, accept_upgrade  # type: ignore

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def frame(payload: bytes, opcode: int = 0x82) -> bytes:
    """A client's final, masked frame (RFC 6455 5.2, 5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def stream() -> MessageStream:
    request = HTTPRequest("GET", "/", Headers([
        ("host", "example.com"), ("upgrade", "websocket"), ("connection", "Upgrade"),
        ("sec-websocket-key", KEY), ("sec-websocket-version", "13")]), "1.1")
    _, ws, _, _ = accept_upgrade(request)
    return MessageStream(ws, max_message_size=1 << 20)


SMALL = frame(os.urandom(64))
BATCH = SMALL * 100
BIG = frame(os.urandom(200_000))


def ns_per_message(data: bytes, reads: int, per_read: int) -> float:
    """Nanoseconds a message over ``reads`` calls of receive(data), each of which must
    yield ``per_read`` whole messages (checked once, outside the timed loop)."""
    messages = stream().receive(data)
    assert len(messages) == per_read and all(len(m) == len(messages[0]) for m in messages)
    receive = stream().receive
    start = time.perf_counter_ns()
    for _ in range(reads):
        receive(data)
    return (time.perf_counter_ns() - start) / (reads * per_read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cases: List[Tuple[str, bytes, int, int]] = [
        ("64 B, 1 frame a read", SMALL, 100_000, 1),
        ("64 B, 100 frames a read", BATCH, 1000, 100),
        ("200 KB frame", BIG, 200, 1),
    ]
    for name, data, reads, per_read in cases:
        times = [ns_per_message(data, reads, per_read) for _ in range(args.rounds)]
        print(f"{name:24s} min {min(times):9.0f} ns/msg  median {statistics.median(times):9.0f}")


if __name__ == "__main__":
    main()
