"""wsroute_sync with two worker processes sharing the port (serve(addr, workers=2)).

Unpinned, the two workers and the load generator share both cores: each worker has
its own GIL, so this row shows what a second process buys on a 2-core machine where
the load generator needs part of a core too. Pinned, both workers sit on the server's
core. bench.py sums CPU and memory over the parent and its workers.
"""

from __future__ import annotations

import os
import sys
import threading
from importlib import import_module
from pathlib import Path

from _common import affinity, free_port, parse_args, prepare_process

sys.path.insert(0, os.environ.get("WSROUTE_SYNC_TREE") or str(Path(__file__).resolve().parents[2]))

#: Exit status that tells bench.py "cannot run here", as opposed to a crash.
EXIT_SKIP = 3


def main() -> None:
    args = parse_args(__doc__ or "", cpu_affinity=True)
    try:
        from wsroute_sync import Server
    except ImportError as exc:
        print(f"SKIP wsroute_sync cannot be imported: {exc}", flush=True)
        sys.exit(EXIT_SKIP)
    prepare_process()
    server = Server(max_connections=20000, **affinity(args.cpu_affinity))

    @server.route("echo")
    def echo(ctx: object, message: bytes) -> bytes:
        return message

    port = args.port or free_port()
    # serve() blocks in the supervisor, so readiness is observed from outside, as
    # wsroute-sync.py does; the probe thread lives in the parent only (not forked).
    probe = import_module("wsroute-sync").announce_when_listening
    threading.Thread(target=probe, args=(port,), daemon=True).start()
    server.serve(f"127.0.0.1:{port}", workers=2)


if __name__ == "__main__":
    main()
