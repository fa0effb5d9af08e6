"""Run the Autobahn suite against the server under test, chunk by chunk.

For every chunk of ``cases.CHUNKS``: start a fresh server subprocess, run the
kosoku ``runner`` subprocess against it under two timeouts, stop the server
with SIGTERM, and turn the runner's JSON lines into one verdict per case.
Chunks run on a small thread pool (two at a time by default), longest first.

Why each piece exists:

* kosoku has no timeout of its own on writes or on the closing handshake: a
  server that stops reading or ignores a Close blocks the runner forever. The
  runner reports ``start``/``result`` per case through a pipe; a case that
  makes no progress for ``_CASE_TIMEOUT`` gets the runner killed and is named
  as hung, and ``chunk_timeout()`` caps the chunk as a whole (a server that
  is merely very slow). Either way the chunk fails and CI does not hang.
* A fresh server per chunk: a crash or wedged thread in one chunk cannot turn
  the rest of the suite red, and the compression option differs per chunk.

Configuration (environment variables):

``WSROUTE_CONFORMANCE_SERVER``
    Command prefix of the server under test, shell-quoted. The harness appends
    ``--host 127.0.0.1 --port 0 --max-message-size N [--compression deflate]``.
    Default: ``<python> -m wsroute_sync echo``.
``WSROUTE_CONFORMANCE_JOBS``
    Chunks run concurrently (default 2).
``WSROUTE_CONFORMANCE_REPORTS``
    Directory for kosoku's Autobahn-format HTML/JSON reports, one
    sub-directory per chunk (default: a pytest temporary directory).
``WSROUTE_TEST_TIMEOUT_SCALE``
    Multiplies every timeout, for slow machines (default 1), as in the rest
    of the test suite.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .cases import (
    CHUNKS,
    EXPECTED_CASES_PER_GROUP,
    MAX_MESSAGE_SIZE,
    Chunk,
    case_sort_key,
    group_of,
    is_pass,
    select,
)

__all__ = [
    "TIMEOUT_SCALE",
    "CaseOutcome",
    "ChunkOutcome",
    "HarnessError",
    "RunningServer",
    "SuiteConfig",
    "SuiteReport",
    "assign_chunks",
    "chunk_timeout",
    "list_case_ids",
    "run_chunk",
    "run_runner",
    "run_suite",
    "running_server",
    "worst_case_seconds",
]

# The test suite's one time scale for slow machines (see tests/conftest.py).
TIMEOUT_SCALE = float(os.environ.get("WSROUTE_TEST_TIMEOUT_SCALE", "1"))

_SERVER_START_TIMEOUT = 15.0
_SERVER_STOP_TIMEOUT = 15.0
_LIST_TIMEOUT = 60.0
_RUNNER_EXIT_TIMEOUT = 60.0
# The longest single case (12.2.15, 1000 x 128 KiB compressed round trips)
# takes about 15 s against plain wsproto and 4x that on a busy machine; a case
# that reports nothing for this long is taken to be hung.
_CASE_TIMEOUT = 180.0
# A chunk's budget is a backstop against a server that is merely very slow:
# the case timeout (so a hang is reported as a hang, not as a slow chunk)
# plus this many times the chunk's estimate, itself the slowest run seen.
_CHUNK_TIMEOUT_FACTOR = 2.0

_LISTENING = re.compile(r"listening on ws://(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d+)/")

# The runner is a module of this package; run it with the package's parent on
# sys.path so it works whether pytest imported us as `conformance.harness`
# (no tests/__init__.py) or `tests.conformance.harness`.
_PACKAGE = __package__ or "conformance"
_IMPORT_ROOT = Path(__file__).resolve().parents[len(_PACKAGE.split("."))]
_REPO_ROOT = Path(__file__).resolve().parents[2]


class HarnessError(RuntimeError):
    """The harness itself could not do its job (not a conformance failure)."""


@dataclass(frozen=True)
class SuiteConfig:
    server_command: tuple[str, ...]
    jobs: int = 2
    report_dir: Path | None = None

    @classmethod
    def from_env(cls, default_report_dir: Path | None = None) -> SuiteConfig:
        command = os.environ.get("WSROUTE_CONFORMANCE_SERVER")
        reports = os.environ.get("WSROUTE_CONFORMANCE_REPORTS")
        return cls(
            server_command=(
                tuple(shlex.split(command))
                if command
                else (sys.executable, "-m", "wsroute_sync", "echo")
            ),
            jobs=max(1, int(os.environ.get("WSROUTE_CONFORMANCE_JOBS", "2"))),
            report_dir=Path(reports) if reports else default_report_dir,
        )


@dataclass(frozen=True)
class CaseOutcome:
    case_id: str
    passed: bool
    behavior: str  # kosoku's verdicts, or "NO RESULT" when the harness had to give up
    behavior_close: str
    detail: str
    # For the patched UTF-8 cases: the text payload kosoku really sent (hex).
    wire_sent: str | None = None


@dataclass
class ChunkOutcome:
    chunk: Chunk
    cases: list[CaseOutcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0


# --------------------------------------------------------------------------
# Server under test


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[str]
    stdout_tail: collections.deque[str]
    stderr_file: IO[bytes]

    def stderr_tail(self, lines: int = 20) -> str:
        self.stderr_file.seek(0)
        text = self.stderr_file.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


def _drain(stream: IO[str], tail: collections.deque[str], ready: threading.Event,
           found: list[str]) -> None:
    # Keep reading after the banner: a server that logs to stdout would
    # otherwise block once the pipe buffer fills.
    for line in stream:
        tail.append(line.rstrip("\n"))
        if not found:
            match = _LISTENING.search(line)
            if match:
                found.append(match["port"])
                ready.set()
    ready.set()  # EOF: the server exited (or closed stdout) before listening


@contextlib.contextmanager
def running_server(command: Sequence[str], *, compression: bool,
                   errors: list[str]) -> Iterator[RunningServer]:
    """Start the server, yield once it prints its banner, stop it on exit.

    Problems on shutdown (no exit within the timeout after SIGTERM) are
    appended to *errors*: they fail the run but must not hide case results.
    """
    argv = [*command, "--host", "127.0.0.1", "--port", "0",
            "--max-message-size", str(MAX_MESSAGE_SIZE)]
    if compression:
        argv += ["--compression", "deflate"]
    with tempfile.TemporaryFile() as stderr_file:
        try:
            process = subprocess.Popen(
                argv, cwd=_REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=stderr_file, text=True, encoding="utf-8", errors="replace",
            )
        except OSError as exc:
            raise HarnessError(f"cannot start server {shlex.join(argv)}: {exc}") from exc
        assert process.stdout is not None
        tail: collections.deque[str] = collections.deque(maxlen=50)
        ready, found = threading.Event(), list[str]()
        drainer = threading.Thread(target=_drain, args=(process.stdout, tail, ready, found),
                                   name="conformance-server-stdout")
        drainer.start()
        try:
            ready.wait(_SERVER_START_TIMEOUT * TIMEOUT_SCALE)
            server = RunningServer(f"ws://127.0.0.1:{found[0]}/" if found else "",
                                   process, tail, stderr_file)
            if not found:
                # Stdout at EOF means the server is exiting: wait for its code.
                drainer.join(1.0 * TIMEOUT_SCALE)
                try:
                    code = None if drainer.is_alive() else process.wait(5.0 * TIMEOUT_SCALE)
                except subprocess.TimeoutExpired:
                    code = None
                when = (f"exited with code {code}" if code is not None else
                        f"is stdout flushed? nothing after "
                        f"{_SERVER_START_TIMEOUT * TIMEOUT_SCALE:.0f}s")
                raise HarnessError(
                    f"server {shlex.join(argv)} did not print 'listening on ws://HOST:PORT/' "
                    f"({when})\nstdout:\n" + "\n".join(tail)
                    + "\nstderr:\n" + server.stderr_tail()
                )
            yield server
        finally:
            _stop(process, argv, errors if found else [], stderr_file)
            # EOF follows the exit; the bound only matters if the server left
            # a child process holding its stdout open.
            drainer.join(_SERVER_STOP_TIMEOUT * TIMEOUT_SCALE)
            process.stdout.close()


def _stop(process: subprocess.Popen[str], argv: Sequence[str], errors: list[str],
          stderr_file: IO[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_SERVER_STOP_TIMEOUT * TIMEOUT_SCALE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            errors.append(
                f"server did not exit within {_SERVER_STOP_TIMEOUT * TIMEOUT_SCALE:.0f}s "
                f"of SIGTERM (killed): {shlex.join(argv)}"
            )
    else:
        stderr_file.seek(0)
        errors.append(
            f"server exited by itself with code {process.returncode} during the chunk; "
            "stderr tail:\n" + "\n".join(
                stderr_file.read().decode("utf-8", "replace").splitlines()[-20:])
        )


# --------------------------------------------------------------------------
# The kosoku runner


def _runner_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_IMPORT_ROOT), env.get("PYTHONPATH")]))
    return env


def run_runner(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m <package>.runner ARGS``; raises ``subprocess.TimeoutExpired``."""
    return subprocess.run(
        [sys.executable, "-m", f"{_PACKAGE}.runner", *args],
        env=_runner_env(), cwd=_REPO_ROOT, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def list_case_ids() -> list[str]:
    """Every case id in kosoku's index (517 for kosoku 0.1.0)."""
    done = run_runner(["list"], _LIST_TIMEOUT * TIMEOUT_SCALE)
    if done.returncode != 0:
        raise HarnessError(f"kosoku runner 'list' failed:\n{done.stderr}")
    ids: list[str] = json.loads(done.stdout)
    return ids


def chunk_timeout(chunk: Chunk) -> float:
    """Backstop for a whole chunk; hangs are caught sooner by `_CASE_TIMEOUT`."""
    return (_CASE_TIMEOUT + _CHUNK_TIMEOUT_FACTOR * chunk.estimate) * TIMEOUT_SCALE


def worst_case_seconds(jobs: int) -> float:
    """Upper bound on `run_suite`, for pytest-timeout: every chunk times out."""
    overhead = (_SERVER_START_TIMEOUT + _SERVER_STOP_TIMEOUT + _RUNNER_EXIT_TIMEOUT) * TIMEOUT_SCALE
    per_chunk = [chunk_timeout(c) + overhead for c in CHUNKS]
    return sum(per_chunk) / max(1, jobs) + max(per_chunk) + _LIST_TIMEOUT * TIMEOUT_SCALE


def _follow(fd: int, case_timeout: float, chunk_deadline: float
            ) -> tuple[list[dict[str, Any]], str | None]:
    """Collect the runner's JSON lines from *fd* until EOF or a missed deadline.

    Returns the records and ``None`` on EOF, ``"case"`` if no line arrived
    within *case_timeout*, or ``"chunk"`` if *chunk_deadline* passed.
    """
    records: list[dict[str, Any]] = []
    pending = b""
    case_deadline = time.monotonic() + case_timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            deadline = min(case_deadline, chunk_deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return records, "case" if case_deadline <= chunk_deadline else "chunk"
            data = os.read(fd, 65536)
            if not data:
                return records, None
            *lines, pending = (pending + data).split(b"\n")
            records.extend(json.loads(line) for line in lines if line)
            if lines:
                case_deadline = time.monotonic() + case_timeout


def _judge(record: dict[str, Any]) -> CaseOutcome:
    behavior, close = record["behavior"], record["behaviorClose"]
    passed = is_pass(behavior, close)
    detail = (f"{record['result']} / {record['resultClose']} "
              f"(remote close code {record['remoteCloseCode']})")
    wire = record.get("wire")
    if wire is not None and wire.get("sent") != wire["intended"]:
        # The UTF-8 workaround did not reach the wire: the case proves nothing.
        passed = False
        detail = (f"UTF-8 vector workaround not on the wire: sent {wire.get('sent')}, "
                  f"intended {wire['intended']} {wire.get('error', '')}; " + detail)
    return CaseOutcome(record["id"], passed, behavior, close, detail,
                       None if wire is None else wire.get("sent"))


def _drive(url: str, chunk: Chunk, report_dir: Path | None, errors: list[str]
           ) -> tuple[list[dict[str, Any]], str | None]:
    """Run the runner for *chunk*; return its records and why it was killed, if it was."""
    args = ["run", "--url", url]
    if report_dir is not None:
        slug = re.sub(r"[^a-z0-9.]+", "-", chunk.name.lower()).strip("-")
        args += ["--report-dir", str(report_dir / slug)]
    # Results come through a pipe of their own: kosoku may write to stdout,
    # and reading the pipe lets us notice a stalled case as soon as it stalls.
    read_fd, write_fd = os.pipe()
    try:
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                [sys.executable, "-m", f"{_PACKAGE}.runner", *args,
                 "--results-fd", str(write_fd), *chunk.patterns],
                env=_runner_env(), cwd=_REPO_ROOT, stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            )
            os.close(write_fd)
            write_fd = -1
            try:
                records, killed = _follow(read_fd, _CASE_TIMEOUT * TIMEOUT_SCALE,
                                          time.monotonic() + chunk_timeout(chunk))
                if killed is None:
                    # EOF: the runner is writing its HTML report and exiting.
                    process.wait(_RUNNER_EXIT_TIMEOUT * TIMEOUT_SCALE)
            except subprocess.TimeoutExpired:
                killed = "exit"
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait()
            output.seek(0)
            tail = output.read()[-3000:].decode("utf-8", "replace")
        if killed == "exit":
            errors.append(f"kosoku runner did not exit after its last case{_tail(tail)}")
        elif killed is None and process.returncode != 0:
            errors.append(f"kosoku runner exited with {process.returncode}{_tail(tail)}")
        return records, killed
    finally:
        os.close(read_fd)
        if write_fd != -1:
            os.close(write_fd)


def run_chunk(chunk: Chunk, ids: Sequence[str], config: SuiteConfig) -> ChunkOutcome:
    """Run *ids* (the chunk's cases) against a fresh server."""
    outcome = ChunkOutcome(chunk)
    started = time.monotonic()
    records: list[dict[str, Any]] = []
    killed: str | None = None
    try:
        with running_server(config.server_command, compression=chunk.compression,
                            errors=outcome.errors) as server:
            records, killed = _drive(server.url, chunk, config.report_dir, outcome.errors)
    except HarnessError as exc:
        outcome.errors.append(str(exc))

    judged = {r["id"]: _judge(r) for r in records if r.get("event") == "result"}
    started_ids = [r["id"] for r in records if r.get("event") == "start"]
    stuck = started_ids[-1] if started_ids and started_ids[-1] not in judged else None
    if killed == "case":
        why = (f"no progress for {_CASE_TIMEOUT * TIMEOUT_SCALE:.0f}s: the case hung (kosoku has "
               "no timeout of its own on writes or the closing handshake, so a server that "
               "stops reading or never completes the close blocks it forever) or is far "
               "slower than expected")
        stop = f"case {stuck or '(before the first case)'} stalled; runner killed"
    elif killed == "chunk":
        why = (f"still running when the chunk hit its {chunk_timeout(chunk):.0f}s budget "
               "(slow machine? raise WSROUTE_TEST_TIMEOUT_SCALE)")
        stop = f"chunk budget of {chunk_timeout(chunk):.0f}s exceeded; runner killed"
    else:
        why = "no result reported"
        stop = outcome.errors[0].splitlines()[0] if outcome.errors else why
    if killed in ("case", "chunk"):
        # First, so it heads the list: later errors (e.g. a server that then
        # ignores SIGTERM) are consequences.
        outcome.errors.insert(0, stop)
    for cid in ids:
        if cid in judged:
            outcome.cases.append(judged[cid])
        elif cid == stuck:
            outcome.cases.append(CaseOutcome(cid, False, "NO RESULT", "NO RESULT", why))
        else:
            outcome.cases.append(CaseOutcome(cid, False, "NOT RUN", "NOT RUN", f"not run: {stop}"))
    outcome.elapsed = time.monotonic() - started
    return outcome


def _tail(output: str) -> str:
    return f"; output tail:\n{output[-3000:]}" if output.strip() else ""


# --------------------------------------------------------------------------
# The whole suite


@dataclass
class SuiteReport:
    config: SuiteConfig
    chunks: list[ChunkOutcome]
    elapsed: float

    @property
    def cases(self) -> list[CaseOutcome]:
        return sorted((c for ch in self.chunks for c in ch.cases),
                      key=lambda c: case_sort_key(c.case_id))

    @property
    def failures(self) -> list[CaseOutcome]:
        return [c for c in self.cases if not c.passed]

    @property
    def errors(self) -> list[str]:
        return [f"[{ch.chunk.name}] {e}" for ch in self.chunks for e in ch.errors]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.errors

    def summary_lines(self) -> list[str]:
        cases = self.cases
        by_group: dict[str, list[CaseOutcome]] = collections.defaultdict(list)
        for case in cases:
            by_group[group_of(case.case_id)].append(case)
        verdicts = collections.Counter(c.behavior for c in cases)
        groups = " | ".join(
            f"{g}: {sum(c.passed for c in by_group[g])}/{len(by_group[g])}"
            + ("" if all(c.passed for c in by_group[g]) else " FAIL")
            for g in sorted(by_group, key=int)
        )
        headline = (
            f"Autobahn conformance: {len(cases) - len(self.failures)}/{len(cases)} cases passed "
            f"in {self.elapsed:.0f}s ({self.config.jobs} jobs) against "
            f"{shlex.join(self.config.server_command)}"
        )
        lines = [
            headline,
            f"  passed/total by group: {groups}",
            "  verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())),
        ]
        if self.failures:
            shown = self.failures[:20]
            more = len(self.failures) - len(shown)
            lines.append("  failed: " + ", ".join(
                f"{c.case_id} ({c.behavior}/{c.behavior_close})" for c in shown)
                + (f", ... {more} more" if more else ""))
        slowest = sorted(self.chunks, key=lambda ch: ch.elapsed, reverse=True)[:4]
        lines.append("  slowest chunks: " + ", ".join(
            f"{ch.chunk.name} {ch.elapsed:.0f}s" for ch in slowest))
        if self.errors:
            lines.append(f"  harness errors: {len(self.errors)} (see the test failure)")
        if self.config.report_dir is not None:
            lines.append(f"  kosoku HTML/JSON reports: {self.config.report_dir}")
        return lines

    def failure_message(self) -> str:
        parts = self.summary_lines()
        for case in self.failures:
            parts.append(f"FAILED {case.case_id}: behavior={case.behavior} "
                         f"close={case.behavior_close}: {case.detail}")
        parts.extend(f"ERROR {e}" for e in self.errors)
        return "\n".join(parts)


def assign_chunks(ids: Sequence[str]) -> list[tuple[Chunk, list[str]]]:
    """Each chunk's cases; every case in exactly one chunk, counts as expected."""
    assigned = [(chunk, select(ids, chunk.patterns)) for chunk in CHUNKS]
    seen = collections.Counter(cid for _, chosen in assigned for cid in chosen)
    problems = [f"{cid} is in {n} chunks" for cid, n in seen.items() if n > 1]
    problems += [f"{cid} is in no chunk" for cid in ids if cid not in seen]
    per_group = collections.Counter(group_of(cid) for cid in ids)
    if dict(per_group) != EXPECTED_CASES_PER_GROUP:
        problems.append(f"kosoku's cases per group {dict(per_group)} != "
                        f"expected {EXPECTED_CASES_PER_GROUP}")
    if problems:
        raise HarnessError("case selection is wrong: " + "; ".join(problems))
    return assigned


def run_suite(config: SuiteConfig) -> SuiteReport:
    started = time.monotonic()
    assigned = assign_chunks(list_case_ids())
    # Longest first, so the short chunks fill in around the deflate ones.
    order = sorted(assigned, key=lambda item: item[0].estimate, reverse=True)
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, config.jobs), thread_name_prefix="conformance-chunk"
    ) as pool:
        futures = [pool.submit(run_chunk, chunk, ids, config) for chunk, ids in order]
        outcomes = [f.result() for f in futures]
    outcomes.sort(key=lambda o: CHUNKS.index(o.chunk))
    return SuiteReport(config, outcomes, time.monotonic() - started)
