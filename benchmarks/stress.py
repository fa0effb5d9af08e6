#!/usr/bin/env python3
"""The contention stress test, long and repeated: what to run before a release.

CI runs ``tests/test_contention.py::test_contention_stress`` for 25 s per scheme (ws
and wss, about a minute). Interleavings that go wrong once in a thousand need longer
runs than that; this script runs the same test for ``--seconds`` per scheme, ``--runs``
times in a row, and stops at the first failure (the seed it prints reproduces the
random choices of the failed run's clients)::

    python benchmarks/stress.py                      # 10 runs of 300 s per scheme
    python benchmarks/stress.py --runs 20 --seconds 10

Exit status: 0 when every run passed, else the failed run's pytest status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs in a row (default 10)")
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="stress time per scheme and run (default 300)")
    args = parser.parse_args(argv)
    env = dict(os.environ, WSROUTE_STRESS_SECONDS=str(args.seconds))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-W", "ignore::DeprecationWarning",
               "tests/test_contention.py::test_contention_stress"]
    for run in range(1, args.runs + 1):
        started = time.monotonic()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"run {run}/{args.runs}: exit {result.returncode} in "
              f"{time.monotonic() - started:.0f} s: {last}", flush=True)
        if result.returncode != 0:
            print(result.stdout[-20000:], result.stderr[-5000:], sep="\n", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
