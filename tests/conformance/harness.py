"""Run the Autobahn suite against the server under test, chunk by chunk.

For every chunk of ``cases.CHUNKS``: start a fresh server subprocess, run the
kosoku ``runner`` subprocess against it under a timeout, stop the server with
SIGTERM, and turn the runner's JSON lines into one verdict per case. Chunks
run on a small thread pool (two at a time by default), longest first.

Why each piece exists:

* kosoku has no closing-handshake timeout: a server that ignores a Close
  blocks the runner forever. ``subprocess.run(timeout=...)`` kills it; the
  runner's per-case ``start`` lines tell us which case hung.
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
``WSROUTE_SYNC_TIMEOUT_SCALE``
    Multiplies every timeout, for slow machines (default 1).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import os
import re
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
    "CaseOutcome",
    "ChunkOutcome",
    "HarnessError",
    "SuiteConfig",
    "SuiteReport",
    "TIMEOUT_SCALE",
    "assign_chunks",
    "chunk_timeout",
    "list_case_ids",
    "run_chunk",
    "run_runner",
    "run_suite",
    "running_server",
    "worst_case_seconds",
]

# One time unit for slow machines, as everywhere in the test suite.
TIMEOUT_SCALE = float(os.environ.get("WSROUTE_SYNC_TIMEOUT_SCALE", "1"))

_SERVER_START_TIMEOUT = 15.0
_SERVER_STOP_TIMEOUT = 15.0
_LIST_TIMEOUT = 60.0
# A chunk may take this many times its reference duration, but never less
# than the floor: two chunks share two cores with whatever else is running.
_CHUNK_TIMEOUT_FACTOR = 4.0
_CHUNK_TIMEOUT_FLOOR = 60.0

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
            jobs=int(os.environ.get("WSROUTE_CONFORMANCE_JOBS", "2")),
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
        process = subprocess.Popen(
            argv, cwd=_REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=stderr_file, text=True, encoding="utf-8", errors="replace",
        )
        assert process.stdout is not None
        tail: collections.deque[str] = collections.deque(maxlen=50)
        ready, found = threading.Event(), []
        drainer = threading.Thread(target=_drain, args=(process.stdout, tail, ready, found),
                                   name="conformance-server-stdout")
        drainer.start()
        try:
            ready.wait(_SERVER_START_TIMEOUT * TIMEOUT_SCALE)
            server = RunningServer(f"ws://127.0.0.1:{found[0]}/" if found else "",
                                   process, tail, stderr_file)
            if not found:
                raise HarnessError(
                    f"server {shlex.join(argv)} did not print 'listening on ws://HOST:PORT/' "
                    f"within {_SERVER_START_TIMEOUT * TIMEOUT_SCALE:.0f}s (exit code "
                    f"{process.poll()}; is stdout flushed?)\nstdout:\n" + "\n".join(tail)
                    + "\nstderr:\n" + server.stderr_tail()
                )
            yield server
        finally:
            _stop(process, argv, errors if found else [], stderr_file)
            # EOF follows the exit; the bound only matters if the server left
            # a child process holding its stdout open.
            drainer.join(_SERVER_STOP_TIMEOUT * TIMEOUT_SCALE)


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
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
    )


def list_case_ids() -> list[str]:
    """Every case id in kosoku's index (517 for kosoku 0.1.0)."""
    done = run_runner(["list"], _LIST_TIMEOUT * TIMEOUT_SCALE)
    if done.returncode != 0:
        raise HarnessError(f"kosoku runner 'list' failed:\n{done.stderr}")
    ids: list[str] = json.loads(done.stdout)
    return ids


def chunk_timeout(chunk: Chunk) -> float:
    return max(_CHUNK_TIMEOUT_FLOOR, _CHUNK_TIMEOUT_FACTOR * chunk.estimate) * TIMEOUT_SCALE


def worst_case_seconds(jobs: int) -> float:
    """Upper bound on `run_suite`, for pytest-timeout: every chunk times out."""
    per_chunk = [chunk_timeout(c) + (_SERVER_START_TIMEOUT + _SERVER_STOP_TIMEOUT) * TIMEOUT_SCALE
                 for c in CHUNKS]
    return sum(per_chunk) / max(1, jobs) + max(per_chunk) + _LIST_TIMEOUT * TIMEOUT_SCALE


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the last line may be cut short if we killed the runner mid-write
    return records


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


def run_chunk(chunk: Chunk, ids: Sequence[str], config: SuiteConfig) -> ChunkOutcome:
    """Run *ids* (the chunk's cases) against a fresh server."""
    outcome = ChunkOutcome(chunk)
    started = time.monotonic()
    timeout = chunk_timeout(chunk)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        results = Path(tmp) / "results.jsonl"
        try:
            with running_server(config.server_command, compression=chunk.compression,
                                errors=outcome.errors) as server:
                args = ["run", "--url", server.url, "--results", str(results)]
                if config.report_dir is not None:
                    slug = re.sub(r"[^a-z0-9.]+", "-", chunk.name.lower()).strip("-")
                    args += ["--report-dir", str(config.report_dir / slug)]
                try:
                    done = run_runner([*args, *chunk.patterns], timeout)
                    if done.returncode != 0:
                        outcome.errors.append(
                            f"kosoku runner exited with {done.returncode}; output tail:\n"
                            + (done.stdout + done.stderr)[-3000:])
                except subprocess.TimeoutExpired as exc:
                    outcome.errors.append(
                        f"chunk timed out after {timeout:.0f}s; runner killed; output tail:\n"
                        + (_text(exc.stdout) + _text(exc.stderr))[-3000:])
        except HarnessError as exc:
            outcome.errors.append(str(exc))
        records = _read_records(results)

    judged = {r["id"]: _judge(r) for r in records if r.get("event") == "result"}
    started_ids = [r["id"] for r in records if r.get("event") == "start"]
    hung = started_ids[-1] if started_ids and started_ids[-1] not in judged else None
    for cid in ids:
        if cid in judged:
            outcome.cases.append(judged[cid])
        elif cid == hung:
            outcome.cases.append(CaseOutcome(
                cid, False, "NO RESULT", "NO RESULT",
                f"hung: no verdict before the chunk's {timeout:.0f}s timeout (kosoku has no "
                "close-handshake timeout; the server probably never completed the close)"))
        else:
            why = outcome.errors[0].splitlines()[0] if outcome.errors else "no result reported"
            outcome.cases.append(CaseOutcome(cid, False, "NO RESULT", "NO RESULT",
                                             f"not run: {why}"))
    outcome.elapsed = time.monotonic() - started
    return outcome


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


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
        lines = [
            f"Autobahn conformance: {len(cases) - len(self.failures)}/{len(cases)} cases passed "
            f"in {self.elapsed:.0f}s ({self.config.jobs} jobs) against "
            f"{shlex.join(self.config.server_command)}",
            f"  passed/total by group: {groups}",
            "  verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())),
        ]
        if self.failures:
            shown = self.failures[:20]
            lines.append("  failed: " + ", ".join(
                f"{c.case_id} ({c.behavior}/{c.behavior_close})" for c in shown)
                + (f", ... {len(self.failures) - len(shown)} more" if len(self.failures) > 20 else ""))
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
