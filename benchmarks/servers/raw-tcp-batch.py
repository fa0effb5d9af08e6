"""raw-tcp with its connection threads under SCHED_BATCH, as wsroute_sync's are.

A reference, not a peer (bench.py runs it only when named): raw-tcp is the ceiling the
targets name, and this shows that ceiling under wsroute_sync's default thread policy, so
that a reader can tell what the policy buys either server. Linux only.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

from _common import serve_threads

_spec = importlib.util.spec_from_file_location("raw_tcp", Path(__file__).with_name("raw-tcp.py"))
assert _spec is not None and _spec.loader is not None
raw_tcp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(raw_tcp)


def handle(sock: socket.socket) -> None:
    # Each connection thread sets it for itself; the accept loop keeps the normal policy.
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    raw_tcp.handle(sock)


def main() -> None:
    serve_threads(__doc__ or "", handle)


if __name__ == "__main__":
    main()
