#!/usr/bin/env python3
"""Side-by-side benchmark: wsroute_sync against Python peers and gorilla (Go), in one run.

Usage::

    python benchmarks/bench.py                      # everything, ~12 minutes
    python benchmarks/bench.py --quick              # smoke run, ~2 minutes
    python benchmarks/bench.py --servers wsroute_sync,raw-tcp --scenarios c50,churn \\
        --placements pinned --duration 10 --rounds 3

Every server runs as its own subprocess, one at a time, alternating within
each scenario, against the same compiled load generator (``loadgen/main.go``,
built into ``.build/`` on first use). The server's CPU time is read from
``/proc/<pid>/stat`` at the exact moments the load generator opens and closes
its measurement window, so "CPU per round trip" charges only measured traffic.

Exit status: 0 when every run completed without an error; 1 when any run saw
a wrong reply, a failed connection, a crashed server or a time-out; 2 when
the benchmark itself can't run (no Go toolchain, bad arguments). Slowness is
never an error.

Traffic goes to 127.0.0.1 only; every loop is bounded in count and time; every
server subprocess is killed on the way out, errors and Ctrl-C included.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import queue
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from typing_extensions import Self

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD_DIR = HERE / ".build"
LOADGEN_SRC = HERE / "loadgen" / "main.go"
LOADGEN_BIN = BUILD_DIR / "loadgen"
GORILLA_SRC = HERE / "servers" / "gorilla" / "main.go"
GORILLA_BIN = BUILD_DIR / "gorilla-server"
RESULTS_DIR = HERE / "results"

#: Where Debian's golang-*-dev packages put Go sources; the load generator is
#: built against it in GOPATH mode, so no module proxy is involved.
DEBIAN_GOPATH = "/usr/share/gocode"

#: Exit status a server script uses for "can't run here" (import failed).
EXIT_SKIP = 3

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# --------------------------------------------------------------------------- catalogue


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    key: str  # file stem in servers/, also the --servers name
    label: str  # how tables name it
    proto: str  # loadgen -proto
    note: str
    #: Run unless --servers names others; references outside the peer list are not.
    default: bool = True
    #: Has the fanout_start/fanout_stop routes the fan-out scenarios need.
    fanout: bool = False
    #: A Go server: (source, binary) built like the load generator, run instead of
    #: servers/<key>.py.
    go_build: tuple[Path, Path] | None = None
    #: A copy of the package at another git revision (``--baseline``): run
    #: servers/wsroute-sync.py against it instead of this working tree.
    tree: Path | None = None
    #: Run servers/<script>.py (default: <key>.py) with these extra arguments.
    script: str | None = None
    args: tuple[str, ...] = ()


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("wsroute-sync", "wsroute_sync", "ws", "ours", fanout=True),
    ServerSpec(
        "wsroute-sync-workers2", "wsroute_sync workers=2", "ws",
        "ours, two worker processes on SO_REUSEPORT (pinned: both on the server's core)",
    ),
    ServerSpec(
        "wsroute-sync-onecpu", "wsroute_sync cpu_affinity=one", "ws",
        "ours, its threads bound to one CPU (the cpu_affinity option; off by default)",
        fanout=True, script="wsroute-sync", args=("--cpu-affinity", "one"),
    ),
    ServerSpec(
        "wsroute-sync-workers2-onecpu", "wsroute_sync workers=2 cpu_affinity=one", "ws",
        "ours, two worker processes, each bound to a CPU of its own",
        script="wsroute-sync-workers2", args=("--cpu-affinity", "one"),
    ),
    ServerSpec(
        "websockets-sync", "websockets.sync", "ws", "python-websockets, threaded API",
        fanout=True,
    ),
    ServerSpec(
        "simple-websocket", "simple-websocket", "ws", "plain accept loop + simple_websocket.Server"
    ),
    ServerSpec(
        "websocket-server", "websocket-server", "ws", "PyPI websocket-server (socketserver)"
    ),
    ServerSpec(
        "wsroute-sync-gunicorn", "wsroute_sync in gunicorn", "ws",
        "ours: server.wsgi_app() in front of Flask, gunicorn -k gthread, 1 worker",
        default=False,
    ),
    ServerSpec(
        "flask-sock-gunicorn", "Flask-Sock in gunicorn", "ws",
        "Flask-Sock (simple-websocket) under the same gunicorn command",
        default=False,
    ),
    ServerSpec(
        "gorilla", "gorilla (Go)", "ws",
        "gorilla/websocket from Debian, the hub pattern of its chat example",
        fanout=True, go_build=(GORILLA_SRC, GORILLA_BIN),
    ),
    ServerSpec("raw-tcp", "raw-tcp", "tcp", "newline-delimited JSON, no WebSocket"),
    ServerSpec(
        "minimal-ws", "minimal-ws", "ws",
        "reference: raw-tcp's loop with just enough WebSocket for the load generator",
        default=False,
    ),
    ServerSpec(
        "raw-tcp-batch", "raw-tcp-batch", "tcp",
        "reference: raw-tcp with its connection threads under SCHED_BATCH, as ours are",
        default=False,
    ),
)
OURS = "wsroute-sync"


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    mode: str  # loadgen -mode: closed, churn, hold or fanout
    conns: int
    payload: int
    quick_conns: int  # smaller size for --quick, where it matters
    #: loadgen -source-addrs: connections spread over 127.0.0.1 .. 127.0.0.N
    source_addrs: int = 1
    #: Load generator processes sharing the connections (each has the fd limit).
    loadgen_processes: int = 1


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("c1", "1 connection, 64 B payload", "closed", 1, 64, 1),
    Scenario("c50", "50 connections, 64 B payload", "closed", 50, 64, 50),
    Scenario("c500", "500 connections, 64 B payload", "closed", 500, 64, 500),
    Scenario("c10-64k", "10 connections, 64 KiB payload", "closed", 10, 64 * 1024, 10),
    Scenario("churn", "connection churn, 8 parallel loops", "churn", 8, 64, 8),
    Scenario(
        "idle", "idle memory, 2,000 connections after one request each", "hold", 2000, 64, 200
    ),
    Scenario("c10k", "10,000 concurrent connections, each answered once", "hold", 10000, 64, 1000),
    Scenario(
        "fanout2k", "fan-out: a 64 B broadcast every 20 ms to 2,000 clients", "fanout",
        2000, 64, 200, source_addrs=4,
    ),
    Scenario(
        "fanout10k", "fan-out: a 64 B broadcast every 20 ms to 10,000 clients", "fanout",
        10000, 64, 1000, source_addrs=4,
    ),
    Scenario(
        "scale", "scale: 19,000 connections held by one server process, each answered once",
        "hold", 19000, 64, 2000, source_addrs=4, loadgen_processes=2,
    ),
)

#: The fan-out scenarios' broadcast period, asked of the server by the load generator.
FANOUT_INTERVAL_MS = 20

#: placement -> (server's taskset CPU list, load generator's), None = unpinned.
PLACEMENTS: dict[str, tuple[str | None, str | None]] = {
    "unpinned": (None, None),
    "pinned": ("0", "1"),
}


# --------------------------------------------------------------------------- /proc


@dataclasses.dataclass
class ProcSample:
    """One reading of a server process's counters."""

    t: float
    cpu_s: float  # utime + stime of all threads, exited ones included
    rss_kib: int
    hwm_kib: int
    threads: int
    fds: int
    machine_cpu_s: float  # busy CPU time of the whole machine, for the background share


def machine_busy_s() -> float:
    """Busy CPU seconds of all cores since boot (everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is already in
    # user. irq and softirq are left out: loopback packet processing lands
    # there and belongs to the benchmark's own traffic, not to other users.
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields[:8]
    return (user + nice + system + steal) / CLK_TCK


def background_cpu(interval_s: float = 0.5) -> float:
    """Cores' worth of CPU the machine is using right now (with no server of ours running)."""
    b0, t0 = machine_busy_s(), time.monotonic()
    time.sleep(interval_s)
    return (machine_busy_s() - b0) / (time.monotonic() - t0)


def wait_for_quiet(max_wait_s: float, threshold: float) -> tuple[float, float]:
    """Wait (bounded) until other processes use less than ``threshold`` cores.

    This machine is shared; a run measured while someone's test suite owns a
    core says little. Returns (background load seen last, seconds waited).
    """
    t0 = time.monotonic()
    load = background_cpu()
    while load > threshold and time.monotonic() - t0 < max_wait_s:
        time.sleep(1.0)
        load = background_cpu()
    return load, time.monotonic() - t0


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants: a server with worker processes is all of them."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                todo.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def sample_proc(pid: int) -> ProcSample | None:
    """Read CPU, memory, thread and fd counts of ``pid`` and its descendants (worker
    processes); None if ``pid`` is gone."""
    t = time.monotonic()
    cpu_ticks = 0
    values: dict[str, int] = {"VmRSS": 0, "VmHWM": 0, "Threads": 0}
    fds = 0
    for index, member in enumerate(_process_tree(pid)):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
            status = Path(f"/proc/{member}/status").read_text()
            fds += len(os.listdir(f"/proc/{member}/fd"))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            if index == 0:
                return None
            continue  # a worker that just exited
        # comm (field 2) may contain spaces; fields after the last ')' are fixed.
        fields = stat.rsplit(")", 1)[1].split()
        cpu_ticks += int(fields[11]) + int(fields[12])
        for line in status.splitlines():
            name, _, rest = line.partition(":")
            if name in values:
                values[name] += int(rest.split()[0])
    return ProcSample(
        t=t,
        cpu_s=cpu_ticks / CLK_TCK,
        rss_kib=values["VmRSS"],
        hwm_kib=values["VmHWM"],
        threads=values["Threads"],
        fds=fds,
        machine_cpu_s=machine_busy_s(),
    )


def listen_drops() -> int | None:
    """System-wide TcpExt ListenDrops: SYNs dropped because an accept queue was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenDrops", 0))
    return None


def system_tasks() -> int:
    """Threads on the whole machine now (the loadavg file's total), against pid_max."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])


def read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def raise_fd_limit() -> tuple[int, int]:
    """Lift our soft fd limit to the hard one; children (servers, loadgen) inherit it.

    The hard limit can't be raised without CAP_SYS_RESOURCE, so it is what
    caps the 10,000-connection scenario; the capacity check below uses it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --------------------------------------------------------------------------- build


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",  # GOPATH mode: gorilla/websocket comes from Debian's tree
        GOPATH=DEBIAN_GOPATH,
        GOCACHE=str(BUILD_DIR / "gocache"),  # keep the build cache out of $HOME
        GOFLAGS="",
        CGO_ENABLED="0",  # pure-Go net package: no C compiler needed
    )
    return env


def ensure_loadgen() -> Path:
    """Build the load generator if it is missing or its source changed."""
    return ensure_go_binary(LOADGEN_SRC, LOADGEN_BIN)


def ensure_go_binary(src: Path, binary: Path) -> Path:
    """Build one Go program (the load generator, the gorilla server) if it is missing
    or its source changed.

    Staleness is judged by a hash of the source, not mtimes, which a git
    checkout resets.
    """
    go = shutil.which("go")
    gorilla = Path(DEBIAN_GOPATH, "src/github.com/gorilla/websocket")
    if go is None or not gorilla.is_dir():
        raise SystemExit(
            "bench: the load generator needs Go and gorilla/websocket from Debian:\n"
            "  apt-get update && apt-get install -y golang-go golang-github-gorilla-websocket-dev\n"
            "(or run benchmarks/install.sh)"
        )
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    stamp = binary.with_name(binary.name + ".sha256")
    if binary.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    print(f"bench: building {binary.relative_to(REPO)} ...", flush=True)
    subprocess.run(
        [go, "build", "-o", str(binary), str(src)],
        check=True,
        env=go_env(),
        cwd=HERE,
        timeout=300,
    )
    stamp.write_text(digest + "\n")
    return binary


# --------------------------------------------------------------------------- processes


class ServerSkipped(Exception):
    """The server script said it can't run here (e.g. the import failed)."""


class RunError(Exception):
    """A run that must count as an error: crash, time-out, broken protocol."""


def _pump_lines(stream: IO[str], sink: queue.Queue[str | None]) -> None:
    """Move a child's stdout into a queue so reads can have deadlines."""
    for line in stream:
        sink.put(line.rstrip("\n"))
    sink.put(None)


def _taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus is not None else []


class ServerProcess:
    """One server subprocess; a context manager that always kills it."""

    READY_TIMEOUT_S = 30.0
    STOP_TIMEOUT_S = 10.0

    def __init__(self, spec: ServerSpec, cpus: str | None, log_dir: Path) -> None:
        self.spec = spec
        self.log_path = log_dir / f"{spec.key}-{time.monotonic_ns()}.log"
        # Closed in stop(): the log outlives this method, not a with block.
        self._log = open(self.log_path, "w")  # noqa: SIM115
        if spec.go_build is not None:
            program = [str(spec.go_build[1])]
        else:
            script = spec.script or (OURS if spec.tree is not None else spec.key)
            program = [sys.executable, "-u", str(HERE / "servers" / f"{script}.py"), *spec.args]
        env = None
        if spec.tree is not None:
            env = dict(os.environ, WSROUTE_SYNC_TREE=str(spec.tree))
        cmd = _taskset(cpus) + program + ["--port", "0"]
        # start_new_session: the whole group can be killed on the way out,
        # and Ctrl-C at the terminal reaches only bench.py, which then cleans up.
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )
        self.pid = self.proc.pid  # taskset execs the server, so this is the server
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(
            target=_pump_lines, args=(self.proc.stdout, self._lines), daemon=True
        ).start()
        self.port = 0
        self.shutdown_s: float | None = None
        self.killed = False
        self._stopped = False

    def wait_ready(self) -> int:
        deadline = time.monotonic() + self.READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                code = self.proc.wait(timeout=5)
                if code == EXIT_SKIP:
                    raise ServerSkipped(self.log_tail() or f"exit status {code}")
                raise RunError(f"server exited with status {code} before ready: {self.log_tail()}")
            if line.startswith("SKIP"):
                raise ServerSkipped(line[len("SKIP") :].strip())
            if line.startswith("READY port="):
                self.port = int(line.split("=", 1)[1])
                return self.port
        raise RunError(f"server not ready after {self.READY_TIMEOUT_S:.0f}s: {self.log_tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole group if it lingers. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            t0 = time.monotonic()
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=self.STOP_TIMEOUT_S)
                self.shutdown_s = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                # Only while the process is unreaped is its pid (= group id)
                # guaranteed to still be ours, so the group kill happens here.
                self.killed = True
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=self.STOP_TIMEOUT_S)
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclasses.dataclass
class LoadgenOutcome:
    result: dict[str, Any]
    window: tuple[ProcSample | None, ProcSample | None]
    baseline: ProcSample | None
    held: ProcSample | None
    stderr_tail: str
    held_end: ProcSample | None = None  # after --hold-seconds more of holding


def run_loadgen(
    loadgen: Path,
    server: ServerProcess,
    args: list[str],
    cpus: str | None,
    timeout_s: float,
    log_dir: Path,
    baseline: ProcSample | None = None,
    settle_s: float = 1.0,
) -> LoadgenOutcome:
    """Run the load generator once, sampling the server at its EVENT lines."""
    return run_loadgens(loadgen, server, [args], cpus, timeout_s, log_dir, baseline, settle_s)


def run_loadgens(
    loadgen: Path,
    server: ServerProcess,
    arg_lists: list[list[str]],
    cpus: str | None,
    timeout_s: float,
    log_dir: Path,
    baseline: ProcSample | None = None,
    settle_s: float = 1.0,
    hold_s: float = 0.0,
) -> LoadgenOutcome:
    """Run one load generator process per argument list, at once, sampling the server
    at their EVENT lines: the window opens with the first process's and closes with the
    last one's; the held connections are measured once every process holds its own.

    More than one process is for more connections than one process's fd limit allows
    (the ``scale`` scenario); their results are merged (:func:`merge_results`).
    """
    n = len(arg_lists)
    lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
    procs: list[subprocess.Popen[str]] = []
    err_paths: list[Path] = []
    start = end = held = held_end = None
    results: dict[int, dict[str, Any]] = {}
    opened: set[int] = set()
    closed: set[int] = set()
    holding: set[int] = set()
    finished = 0
    deadline = time.monotonic() + timeout_s
    try:
        for i, args in enumerate(arg_lists):
            cmd = _taskset(cpus) + [str(loadgen), "-addr", f"127.0.0.1:{server.port}"] + args
            err_paths.append(log_dir / f"loadgen-{time.monotonic_ns()}-{i}.log")
            with open(err_paths[-1], "w") as err:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    start_new_session=True,
                )
            procs.append(proc)
            assert proc.stdout is not None
            threading.Thread(
                target=_pump_tagged, args=(i, proc.stdout, lines), daemon=True
            ).start()
        while finished < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunError(f"load generator still running after {timeout_s:.0f}s")
            try:
                i, line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                finished += 1
            elif line == "EVENT window_start":
                if not opened:
                    start = sample_proc(server.pid)
                opened.add(i)
            elif line == "EVENT window_end":
                closed.add(i)
                if len(closed) == n:
                    end = sample_proc(server.pid)
            elif line.startswith("EVENT holding"):
                holding.add(i)
                if len(holding) == n:
                    # Let freed handshake buffers and thread start-up settle,
                    # then read what the open connections cost at rest.
                    time.sleep(settle_s)
                    held = sample_proc(server.pid)
                    if hold_s > 0:
                        # Keep holding through keepalive rounds (wsroute_sync pings
                        # every 20 s): what holding costs, and whether all survive.
                        time.sleep(hold_s)
                        held_end = sample_proc(server.pid)
                    for proc in procs:
                        assert proc.stdin is not None
                        proc.stdin.write("release\n")
                        proc.stdin.flush()
            elif line.startswith("RESULT "):
                results[i] = json.loads(line[len("RESULT ") :])
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (RunError, subprocess.TimeoutExpired) as exc:
        tails = "; ".join(_tail(p) for p in err_paths)
        raise RunError(f"{exc}; loadgen stderr: {tails}") from exc
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    tails = "\n".join(_tail(p) for p in err_paths)
    for i, proc in enumerate(procs):
        if proc.returncode != 0 or i not in results:
            raise RunError(f"load generator exited with {proc.returncode}: {tails}")
    result = results[0] if n == 1 else merge_results([results[i] for i in range(n)])
    return LoadgenOutcome(result, (start, end), baseline, held, tails, held_end)


def _pump_tagged(tag: int, stream: IO[str], sink: queue.Queue[tuple[int, str | None]]) -> None:
    for line in stream:
        sink.put((tag, line.rstrip("\n")))
    sink.put((tag, None))


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from load generator processes that ran at once.

    Counts, errors, CPU and held connections add up; times are the longest process's;
    percentiles are the worst process's (each process's are exact, their mix is not
    kept), so merged latencies err on the slow side.
    """
    out = dict(parts[0])
    for key in ("count", "loadgen_cpu_s", "error_total", "close_clean", "close_unclean",
                "close_slow", "held", "conns"):  # fmt: skip
        out[key] = sum(p.get(key, 0) for p in parts)
    for key in ("window_s", "connect_s", "answer_s", "p50_ms", "p90_ms", "p99_ms", "max_ms"):
        out[key] = max(p.get(key, 0) for p in parts)
    errors: dict[str, int] = {}
    for p in parts:
        for kind, count in p["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    out["errors"] = errors
    window = out["window_s"] or 1e-9
    out["rate"] = out["count"] / window
    out["loadgen_cpu_share"] = out["loadgen_cpu_s"] / window
    if out.get("connect_s"):
        out["connect_rate"] = out["held"] / out["connect_s"]
    out["processes"] = len(parts)
    return out


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- one run


@dataclasses.dataclass
class Settings:
    duration: float
    warmup: float
    quick: bool
    io_timeout: float
    dial_concurrency: int
    request_concurrency: int
    settle: float
    fd_hard_limit: int
    hold: float = 0.0


def scenario_conns(scenario: Scenario, settings: Settings) -> int:
    return scenario.quick_conns if settings.quick else scenario.conns


def loadgen_args(scenario: Scenario, spec: ServerSpec, settings: Settings, conns: int) -> list[str]:
    # Processes sharing a scenario share its handshakes in flight too (servers bound
    # the sockets waiting for a request head: wsroute_sync's max_pending_handshakes
    # is 64, like this default).
    dial_concurrency = max(1, settings.dial_concurrency // scenario.loadgen_processes)
    args = [
        "-proto", spec.proto,
        "-mode", scenario.mode,
        "-conns", str(conns),
        "-payload", str(scenario.payload),
        "-warmup", f"{settings.warmup}s",
        "-duration", f"{settings.duration}s",
        "-io-timeout", f"{settings.io_timeout}s",
        "-dial-concurrency", str(dial_concurrency),
        "-request-concurrency", str(settings.request_concurrency),
        "-source-addrs", str(scenario.source_addrs),
    ]  # fmt: skip
    if scenario.mode == "hold":
        args += ["-hold-max", f"{120 + settings.hold:.0f}s"]
    if scenario.mode == "fanout":
        args += ["-fanout-interval", f"{FANOUT_INTERVAL_MS}ms", "-fanout-size", str(scenario.payload)]
    return args


def run_one(
    loadgen: Path,
    spec: ServerSpec,
    scenario: Scenario,
    placement: str,
    settings: Settings,
    log_dir: Path,
    conns: int | None = None,
) -> dict[str, Any]:
    """Start a server, drive one scenario against it, stop it; return the metrics."""
    server_cpus, loadgen_cpus = PLACEMENTS[placement]
    conns = conns if conns is not None else scenario_conns(scenario, settings)
    drops0 = listen_drops()
    record: dict[str, Any] = {
        "server": spec.key,
        "label": spec.label,
        "scenario": scenario.key,
        "placement": placement,
        "conns": conns,
        "payload": scenario.payload,
    }
    with ServerProcess(spec, server_cpus, log_dir) as server:
        server.wait_ready()
        baseline: ProcSample | None = None
        if scenario.mode == "hold":
            # Warm the server (lazy imports, first-connection allocations) so
            # the baseline it is measured against is a server that has worked.
            warm = ["-proto", spec.proto, "-mode", "churn", "-conns", "2", "-duration", "0.3s"]
            run_loadgen(loadgen, server, [*warm, "-warmup", "0s"], loadgen_cpus, 60, log_dir)
            time.sleep(settings.settle / 2)
            baseline = sample_proc(server.pid)
        if scenario.mode in ("hold", "fanout"):
            timeout = 120 + conns * 0.05 + settings.warmup + settings.duration + settings.hold
        else:
            timeout = settings.warmup + settings.duration + 90
        # The connections, split over the load generator processes.
        procs = scenario.loadgen_processes
        shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
        outcome = run_loadgens(
            loadgen,
            server,
            [loadgen_args(scenario, spec, settings, share) for share in shares],
            loadgen_cpus,
            timeout,
            log_dir,
            baseline=baseline,
            settle_s=settings.settle,
            hold_s=settings.hold if scenario.mode == "hold" else 0.0,
        )
        final = sample_proc(server.pid)
        crashed = not server.alive()
        server.stop()
        record["server_log_tail"] = server.log_tail(8)
        record["shutdown_s"] = server.shutdown_s
        record["server_needed_sigkill"] = server.killed
    drops1 = listen_drops()
    record.update(summarise(outcome, scenario, final))
    record["listen_drops"] = (
        (drops1 - drops0) if drops0 is not None and drops1 is not None else None
    )
    if crashed:
        record["errors"] = dict(record["errors"], server_crashed=1)
        record["error_total"] += 1
    return record


def summarise(
    outcome: LoadgenOutcome, scenario: Scenario, final: ProcSample | None
) -> dict[str, Any]:
    r = outcome.result
    start, end = outcome.window
    out: dict[str, Any] = {
        "count": r["count"],
        "window_s": r["window_s"],
        "rate": r["rate"],
        "p50_ms": r["p50_ms"],
        "p90_ms": r["p90_ms"],
        "p99_ms": r["p99_ms"],
        "max_ms": r["max_ms"],
        "loadgen_cpu_share": r["loadgen_cpu_share"],
        "loadgen_cpu_s": r["loadgen_cpu_s"],
        "errors": r["errors"],
        "error_total": r["error_total"],
        "close_clean": r["close_clean"],
        "close_unclean": r["close_unclean"],
        "close_slow": r["close_slow"],
        "loadgen_stderr_tail": outcome.stderr_tail if r["error_total"] else "",
    }
    if start and end:
        cpu = end.cpu_s - start.cpu_s
        out["server_cpu_s"] = cpu
        out["server_cpu_share"] = cpu / max(1e-9, end.t - start.t)
        out["server_cpu_us_per_op"] = cpu / r["count"] * 1e6 if r["count"] else None
        out["server_rss_mib"] = end.rss_kib / 1024
        out["server_threads"] = end.threads
        # Whatever else ran during the window (other users, bench.py itself),
        # in cores: the number that says whether this row can be trusted.
        other = (end.machine_cpu_s - start.machine_cpu_s) - cpu - r["loadgen_cpu_s"]
        out["other_cpu_share"] = max(0.0, other) / max(1e-9, end.t - start.t)
    if final:
        out["server_peak_rss_mib"] = final.hwm_kib / 1024
    if scenario.mode == "fanout":
        out.update(
            held=r.get("held", 0),
            ticks=r.get("ticks", 0),
            tick_rate=r.get("tick_rate"),
            expected=r.get("expected", 0),
            sent_delivered=r.get("sent_delivered", 0),
            missed=r.get("missed", 0),
            # Of the messages the server sent in the window (ticks x clients), the
            # share that reached their client before the run ended.
            delivered_pct=(
                100 * r.get("sent_delivered", 0) / r["expected"] if r.get("expected") else None
            ),
        )
    if scenario.mode == "hold":
        held_n = r.get("held", 0)
        out.update(
            connect_rate=r.get("connect_rate"),
            connect_s=r.get("connect_s"),
            answer_s=r.get("answer_s"),
            held=held_n,
        )
        base, held = outcome.baseline, outcome.held
        if base and held and held_n:
            out["rss_baseline_mib"] = base.rss_kib / 1024
            out["rss_held_mib"] = held.rss_kib / 1024
            out["rss_kib_per_conn"] = (held.rss_kib - base.rss_kib) / held_n
            out["fds_per_conn"] = (held.fds - base.fds) / held_n
            out["threads_per_conn"] = (held.threads - base.threads) / held_n
            out["server_fds_held"] = held.fds
            out["server_threads_held"] = held.threads
            out["server_rss_mib"] = held.rss_kib / 1024
        end = outcome.held_end
        if base and held and end and held_n:
            # Server CPU while it only holds them (keepalive, timers), and how many it
            # still held at the end (each held connection is one socket).
            out["hold_s"] = end.t - held.t
            out["hold_cpu_pct"] = 100 * (end.cpu_s - held.cpu_s) / (end.t - held.t)
            out["held_at_end"] = end.fds - base.fds
    return out


# --------------------------------------------------------------------------- capacity


@dataclasses.dataclass
class Capacity:
    fds_per_conn: float
    threads_per_conn: float
    base_fds: int
    base_threads: int


def capacity_skip_reason(cap: Capacity, conns: int, fd_hard: int) -> str | None:
    """Why ``conns`` connections cannot fit this machine's limits, or None.

    Such a run would fail on EMFILE or on thread creation, which says nothing
    about the server's design and would fail the whole benchmark every time;
    the measured per-connection cost is reported instead.
    """
    need_fds = cap.base_fds + cap.fds_per_conn * conns * 1.02 + 32
    if need_fds > fd_hard:
        return (
            f"needs ~{need_fds:,.0f} fds ({cap.fds_per_conn:.1f} per connection), "
            f"above the hard RLIMIT_NOFILE {fd_hard:,}, which an unprivileged process cannot raise"
        )
    pid_max = read_int("/proc/sys/kernel/pid_max") or 1 << 22
    threads_max = read_int("/proc/sys/kernel/threads-max") or 1 << 22
    task_limit = min(pid_max, threads_max)
    need_tasks = system_tasks() + cap.base_threads + cap.threads_per_conn * conns * 1.02
    if need_tasks > task_limit * 0.95:
        return (
            f"needs ~{need_tasks:,.0f} tasks machine-wide ({cap.threads_per_conn:.1f} threads per "
            f"connection), too close to kernel.pid_max/threads-max {task_limit:,}"
        )
    return None


def probe_capacity(
    loadgen: Path, spec: ServerSpec, placement: str, settings: Settings, log_dir: Path
) -> Capacity:
    """Measure fds and threads per connection with 200 held connections."""
    idle = next(s for s in SCENARIOS if s.key == "idle")
    rec = run_one(loadgen, spec, idle, placement, settings, log_dir, conns=200)
    if rec["error_total"] or "fds_per_conn" not in rec:
        raise RunError(f"capacity probe failed: {rec['errors']}")
    return Capacity(
        rec["fds_per_conn"],
        rec["threads_per_conn"],
        rec["server_fds_held"] - round(rec["fds_per_conn"] * 200),
        rec["server_threads_held"] - round(rec["threads_per_conn"] * 200),
    )


# --------------------------------------------------------------------------- tables


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


Column = tuple[str, str, str]  # header, record key, format

CLOSED_COLUMNS: list[Column] = [
    ("rt/s", "rate", ",.0f"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("srv CPU µs/rt", "server_cpu_us_per_op", ",.0f"),
    ("srv CPU %", "server_cpu_pct", ".0f"),
    ("srv RSS MiB", "server_rss_mib", ".1f"),
    ("loadgen CPU %", "loadgen_cpu_pct", ".0f"),
    ("other CPU %", "other_cpu_pct", ".0f"),
]
CHURN_COLUMNS: list[Column] = [
    ("conn/s", "rate", ",.0f"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("srv CPU µs/conn", "server_cpu_us_per_op", ",.0f"),
    ("srv CPU %", "server_cpu_pct", ".0f"),
    ("srv RSS MiB", "server_rss_mib", ".1f"),
    ("loadgen CPU %", "loadgen_cpu_pct", ".0f"),
    ("other CPU %", "other_cpu_pct", ".0f"),
]
HOLD_COLUMNS: list[Column] = [
    ("held", "held", ",.0f"),
    ("connect/s", "connect_rate", ",.0f"),
    ("answer p50 ms", "p50_ms", ".2f"),
    ("answer p99 ms", "p99_ms", ".2f"),
    ("RSS KiB/conn", "rss_kib_per_conn", ".1f"),
    ("srv RSS MiB", "server_rss_mib", ".1f"),
    ("fds/conn", "fds_per_conn", ".1f"),
    ("thr/conn", "threads_per_conn", ".1f"),
    ("srv CPU µs/conn", "server_cpu_us_per_op", ",.0f"),
    ("holding CPU %", "hold_cpu_pct", ".1f"),  # with --hold-seconds
    ("held at end", "held_at_end", ",.0f"),
    ("loadgen CPU %", "loadgen_cpu_pct", ".0f"),
    ("other CPU %", "other_cpu_pct", ".0f"),
]

FANOUT_COLUMNS: list[Column] = [
    ("clients", "held", ",.0f"),
    ("delivered/s", "rate", ",.0f"),
    ("ticks/s", "tick_rate", ".1f"),
    ("delivered %", "delivered_pct", ".1f"),
    ("p50 ms", "p50_ms", ".2f"),
    ("p99 ms", "p99_ms", ".2f"),
    ("max ms", "max_ms", ".1f"),
    ("srv CPU µs/msg", "server_cpu_us_per_op", ",.1f"),
    ("srv CPU %", "server_cpu_pct", ".0f"),
    ("srv RSS MiB", "server_rss_mib", ".1f"),
    ("loadgen CPU %", "loadgen_cpu_pct", ".0f"),
    ("other CPU %", "other_cpu_pct", ".0f"),
]

#: Background CPU (percent of one core) above which a row is flagged noisy.
NOISY_OTHER_CPU_PCT = 15.0

#: Load generator CPU (percent of one core) above which it may be the limit:
#: pinned, it has exactly one core.
SATURATED_LOADGEN_CPU_PCT = 85.0

#: metric, whether higher is better, label: the ratios printed under each table.
RATIO_METRICS: dict[str, list[tuple[str, bool, str]]] = {
    "closed": [
        ("rate", True, "rate"),
        ("p99_ms", False, "p99"),
        ("server_cpu_us_per_op", False, "CPU/rt"),
    ],
    "churn": [("rate", True, "rate"), ("server_cpu_us_per_op", False, "CPU/conn")],
    "hold": [
        ("rss_kib_per_conn", False, "memory/conn"),
        ("hold_cpu_pct", False, "CPU% holding"),
        ("p99_ms", False, "answer p99"),
        ("connect_rate", True, "connect rate"),
    ],
    "fanout": [
        ("rate", True, "delivered/s"),
        ("p50_ms", False, "p50"),
        ("p99_ms", False, "p99"),
        ("server_cpu_us_per_op", False, "CPU/msg"),
    ],
}


#: Per-run metrics whose median across rounds the tables show.
MEDIAN_KEYS = (
    "rate", "p50_ms", "p99_ms", "server_cpu_us_per_op", "server_rss_mib",
    "rss_kib_per_conn", "fds_per_conn", "threads_per_conn", "connect_rate", "held",
    "max_ms", "tick_rate", "delivered_pct", "hold_cpu_pct", "held_at_end",
)  # fmt: skip


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each metric across rounds; error counts add up."""
    out: dict[str, Any] = {"rounds": len(records)}
    for key in MEDIAN_KEYS:
        out[key] = _median([r.get(key) for r in records])
    out["server_cpu_pct"] = _median(
        [
            100 * r["server_cpu_share"] if r.get("server_cpu_share") is not None else None
            for r in records
        ]
    )
    out["loadgen_cpu_pct"] = _median([100 * r["loadgen_cpu_share"] for r in records])
    out["loadgen_cpu_pct_max"] = max(100 * r["loadgen_cpu_share"] for r in records)
    out["other_cpu_pct"] = _median(
        [
            100 * r["other_cpu_share"] if r.get("other_cpu_share") is not None else None
            for r in records
        ]
    )
    out["error_total"] = sum(r["error_total"] for r in records)
    out["close_unclean"] = sum(r["close_unclean"] for r in records)
    out["close_slow"] = sum(r["close_slow"] for r in records)
    out["listen_drops"] = sum(r["listen_drops"] or 0 for r in records)
    out["missed"] = sum(r.get("missed") or 0 for r in records)
    return out


def render_table(
    scenario: Scenario,
    placement: str,
    rows: dict[str, dict[str, Any]],
    skipped: dict[str, str],
) -> str:
    columns = {
        "closed": CLOSED_COLUMNS, "churn": CHURN_COLUMNS, "hold": HOLD_COLUMNS,
        "fanout": FANOUT_COLUMNS,
    }[scenario.mode]
    header = ["server"] + [c[0] for c in columns] + ["errors", "notes"]
    body: list[list[str]] = []
    for spec in SERVERS:
        if spec.key in rows:
            agg = rows[spec.key]
            notes = []
            if agg["close_unclean"]:
                notes.append(f"{agg['close_unclean']:,} closes without Close frame")
            if agg["close_slow"]:
                notes.append(f"{agg['close_slow']:,} slow TCP closes")
            if agg["loadgen_cpu_pct_max"] > SATURATED_LOADGEN_CPU_PCT:
                notes.append(
                    f"LOADGEN NEAR SATURATION ({agg['loadgen_cpu_pct_max']:.0f}% of a core)"
                )
            if (agg.get("other_cpu_pct") or 0) > NOISY_OTHER_CPU_PCT:
                notes.append(f"NOISY: other processes used {agg['other_cpu_pct']:.0f}% of a core")
            if agg["listen_drops"]:
                notes.append(f"{agg['listen_drops']:,} SYNs dropped (accept queue full)")
            if agg["missed"]:
                notes.append(f"{agg['missed']:,} broadcasts missed (sequence gaps)")
            body.append(
                [spec.label]
                + [_fmt(agg.get(key), fmt) for _, key, fmt in columns]
                + [f"{agg['error_total']:,}", "; ".join(notes)]
            )
        elif spec.key in skipped:
            body.append(
                [spec.label] + ["-"] * len(columns) + ["-", "skipped: " + skipped[spec.key]]
            )
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header) - 1)]
    lines = [f"\n### {scenario.title} [{scenario.key}, {placement}]"]
    for row in [header] + body:
        cells = (
            [row[0].ljust(widths[0])]
            + [row[i].rjust(widths[i]) for i in range(1, len(widths))]
            + [row[-1]]
        )
        lines.append("  ".join(cells).rstrip())
    lines.append(render_ratios(scenario, rows, skipped))
    return "\n".join(lines)


def render_ratios(
    scenario: Scenario, rows: dict[str, dict[str, Any]], skipped: dict[str, str]
) -> str:
    if OURS not in rows:
        why = skipped.get(OURS, "not selected")
        return f"  wsroute_sync ratios: n/a ({why})"
    ours = rows[OURS]
    parts = []
    for spec in SERVERS:
        if spec.key == OURS or spec.key not in rows:
            continue
        peer = rows[spec.key]
        bits = []
        for key, higher_better, label in RATIO_METRICS[scenario.mode]:
            a, b = ours.get(key), peer.get(key)
            if a is not None and b:
                better = (a / b >= 1) == higher_better
                bits.append(f"{label} {a / b:.2f}x{'' if better else ' (worse)'}")
        parts.append(f"  vs {spec.label}: " + ", ".join(bits))
    return "  wsroute_sync / peer:\n" + "\n".join(parts)


#: Rounds needed before the paired ratios are printed: fewer say nothing about spread.
PAIRED_MIN_ROUNDS = 3


def render_paired(records: list[dict[str, Any]], scenario: Scenario, placement: str) -> str:
    """ours / each peer on the main metric, round by round.

    Servers of one round run back to back, so the machine's slow drifts (other load,
    frequency, the VM's neighbours) touch both sides of a round's ratio alike; the
    medians' ratio above ignores that pairing. The geometric mean of the rounds'
    ratios comes with a 90 % interval (bootstrap over rounds, fixed seed): a ratio
    whose interval holds 1.0 is not a measured difference.
    """
    key, higher_better, label = RATIO_METRICS[scenario.mode][0]
    by_round: dict[int, dict[str, float]] = {}
    for r in records:
        value = r.get(key)
        if (r["scenario"], r["placement"]) == (scenario.key, placement) and value:
            by_round.setdefault(r["round"], {})[r["server"]] = value
    parts = []
    for spec in SERVERS:
        if spec.key == OURS:
            continue
        logs = [
            math.log(both[OURS] / both[spec.key])
            for both in by_round.values()
            if OURS in both and spec.key in both
        ]
        if len(logs) < PAIRED_MIN_ROUNDS:
            continue
        rng = random.Random(0)
        means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(2000))
        low, high = math.exp(means[100]), math.exp(means[1899])
        ahead = sum((x > 0) == higher_better for x in logs if x)
        parts.append(
            f"  vs {spec.label}: {math.exp(statistics.fmean(logs)):.2f}x "
            f"(90% interval {low:.2f}-{high:.2f}), ours better in {ahead} of {len(logs)} rounds"
        )
    if not parts:
        return ""
    return f"  {label}, paired by round:\n" + "\n".join(parts)


# --------------------------------------------------------------------------- main


def parse_list(value: str, known: Sequence[str], what: str) -> list[str]:
    # Accept wsroute_sync as well as wsroute-sync: the package name vs the file stem.
    items = [v.strip().replace("_", "-") for v in value.split(",") if v.strip()]
    normal = {k.replace("_", "-"): k for k in known}
    unknown = [i for i in items if i not in normal]
    if unknown:
        raise SystemExit(f"bench: unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return [normal[i] for i in items]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--hold-seconds",
        type=float,
        default=0.0,
        help="hold scenarios: keep the connections this long after measuring memory, "
        "and report the server's CPU meanwhile and how many it still holds "
        "(default 0; 50 covers two of wsroute_sync's keepalive rounds)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measurement window per run, seconds (default 5; 1 with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="traffic before each window, seconds (default 1; 0.3 with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: short windows, 200/1,000 held connections instead of 2,000/10,000",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat each (scenario, placement) this often, rotating the server order; "
        "tables show medians",
    )
    p.add_argument(
        "--servers",
        default=",".join(s.key for s in SERVERS if s.default),
        help="comma list of " + ", ".join(s.key for s in SERVERS)
        + " (only when named: " + ", ".join(s.key for s in SERVERS if not s.default) + ")",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(s.key for s in SCENARIOS),
        help="comma list of " + ", ".join(s.key for s in SCENARIOS),
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="REV",
        help="also run ours at git revision REV (a commit, tag or branch), as a peer named "
        "wsroute-sync@REV: an A/B of two versions in the same run; may be repeated",
    )
    p.add_argument("--placements", default="unpinned,pinned", help="comma list of unpinned, pinned")
    p.add_argument(
        "--io-timeout",
        type=float,
        default=30.0,
        help="loadgen deadline for one handshake or round trip, seconds",
    )
    p.add_argument(
        "--dial-concurrency",
        type=int,
        default=64,
        help="handshakes in flight while opening held connections",
    )
    p.add_argument(
        "--request-concurrency",
        type=int,
        default=64,
        help="held connections' requests in flight at once (0 = all at once)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each run, wait up to this long for other processes to go quiet (0 = don't)",
    )
    p.add_argument(
        "--quiet-budget",
        type=float,
        default=600.0,
        help="total seconds the whole session may spend waiting for quiet",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.3,
        help="'quiet' means other processes use less than this many cores",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON results file (default results/bench-<timestamp>.json)",
    )
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 1.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.3 if args.quick else 1.0
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1 or args.io_timeout <= 0:
        p.error("--duration and --io-timeout must be > 0, --warmup >= 0, --rounds >= 1")
    args.servers = parse_list(args.servers, [s.key for s in SERVERS], "server")
    args.servers += [f"{OURS}@{rev}" for rev in args.baseline]
    args.scenarios = parse_list(args.scenarios, [s.key for s in SCENARIOS], "scenario")
    args.placements = parse_list(args.placements, list(PLACEMENTS), "placement")
    return args


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("websockets", "simple-websocket", "websocket-server", "wsproto"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    # The gorilla server and the load generator's client: Debian's package.
    dpkg = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "golang-github-gorilla-websocket-dev"],
        check=False, capture_output=True, text=True, timeout=30,
    )
    out["gorilla/websocket (Debian)"] = dpkg.stdout.strip() or "unknown"
    return out


def machine_info(fd_limits: tuple[int, int]) -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    go_version = subprocess.run(
        ["go", "version"], check=False, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "go": go_version,
        "packages": package_versions(),
        "git": git.stdout.strip(),
        "fd_limits": list(fd_limits),
        "pid_max": read_int("/proc/sys/kernel/pid_max"),
        "somaxconn": read_int("/proc/sys/net/core/somaxconn"),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def plan(args: argparse.Namespace) -> Iterator[tuple[str, Scenario, int, list[ServerSpec]]]:
    """Placement, scenario, round, and the server order for that round.

    Servers alternate within a scenario; each round rotates the order so no
    server always runs right after, say, the churn that filled TIME_WAIT.
    """
    specs = [s for s in SERVERS if s.key in args.servers]
    for placement in args.placements:
        for scenario in (s for s in SCENARIOS if s.key in args.scenarios):
            for rnd in range(args.rounds):
                k = rnd % len(specs)
                yield placement, scenario, rnd, specs[k:] + specs[:k]


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM/SIGHUP take the same path as Ctrl-C, so the finally blocks
    # stop the server subprocess (which lives in its own session).
    raise KeyboardInterrupt


class Session:
    """State of one bench.py invocation: what ran, what was skipped, what failed."""

    def __init__(
        self, args: argparse.Namespace, settings: Settings, loadgen: Path, log_dir: Path
    ) -> None:
        self.args = args
        self.settings = settings
        self.loadgen = loadgen
        self.log_dir = log_dir
        self.records: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}  # server -> reason, for the whole run
        self.scenario_skips: dict[tuple[str, str, str], str] = {}  # (server, scenario, placement)
        self.failures: list[str] = []
        self.capacity: dict[tuple[str, str], Capacity] = {}  # (server, placement)
        self.quiet_budget_left: float = args.quiet_budget

    def run(self, spec: ServerSpec, scenario: Scenario, placement: str, rnd: int) -> None:
        """One server in one scenario: checks, quiet wait, the run, a progress line."""
        if spec.key in self.skipped:
            return
        rounds = f"round {rnd + 1}/{self.args.rounds}"
        tag = f"{scenario.key:8} {placement:8} {rounds}  {spec.label:17}"
        conns = scenario_conns(scenario, self.settings)
        try:
            reason: str | None = None
            if scenario.mode == "fanout" and not spec.fanout:
                reason = "no fan-out mode"
            elif scenario.mode in ("hold", "fanout") and conns > 2000:
                reason = self._capacity_skip(spec, placement, conns)
            if reason:
                self.scenario_skips[(spec.key, scenario.key, placement)] = reason
                print(f"{tag} skipped: {reason}", flush=True)
                return
            # The per-run wait is capped by what is left of the session's
            # budget, so a machine that never goes quiet costs bounded time.
            max_wait = min(self.args.quiet_wait, self.quiet_budget_left)
            background, waited = wait_for_quiet(max_wait, self.args.quiet_threshold)
            self.quiet_budget_left = max(0.0, self.quiet_budget_left - waited)
            if background > self.args.quiet_threshold:
                print(
                    f"{tag} note: machine still busy ({background:.2f} cores), waited {waited:.0f}s"
                )
            t0 = time.monotonic()
            rec = run_one(self.loadgen, spec, scenario, placement, self.settings, self.log_dir)
        except ServerSkipped as exc:
            self.skipped[spec.key] = str(exc).splitlines()[-1] if str(exc) else "cannot start"
            print(f"{tag} SKIPPED for the whole run: {self.skipped[spec.key]}", flush=True)
            return
        except RunError as exc:
            self.failures.append(f"{tag.strip()}: {exc}")
            print(f"{tag} ERROR: {exc}", flush=True)
            return
        rec.update(round=rnd, background_cores_before=background, quiet_wait_s=waited)
        self.records.append(rec)
        if scenario.key == "idle":
            # The per-connection cost measured here answers c10k's capacity check.
            self.capacity.setdefault((spec.key, placement), capacity_from(rec))
        if rec["error_total"]:
            self.failures.append(f"{tag.strip()}: {rec['errors']} {rec['loadgen_stderr_tail']}")
        print(f"{tag} {describe(rec, scenario)}  ({time.monotonic() - t0:.1f}s)", flush=True)

    def _capacity_skip(self, spec: ServerSpec, placement: str, conns: int) -> str | None:
        key = (spec.key, placement)
        if key not in self.capacity:
            self.capacity[key] = probe_capacity(
                self.loadgen, spec, placement, self.settings, self.log_dir
            )
        return capacity_skip_reason(self.capacity[key], conns, self.settings.fd_hard_limit)


def capacity_from(rec: dict[str, Any]) -> Capacity:
    """Per-connection fds and threads, and the server's own, from a hold run."""
    held = rec.get("held", 0)
    fds, threads = rec.get("fds_per_conn", 0.0), rec.get("threads_per_conn", 0.0)
    return Capacity(
        fds_per_conn=fds,
        threads_per_conn=threads,
        base_fds=rec.get("server_fds_held", 0) - round(fds * held),
        base_threads=rec.get("server_threads_held", 0) - round(threads * held),
    )


def describe(rec: dict[str, Any], scenario: Scenario) -> str:
    """The one-line progress report for a finished run."""
    if scenario.mode == "hold":
        text = (
            f"held {rec.get('held', 0):,}, {_fmt(rec.get('rss_kib_per_conn'), '.1f')} KiB/conn, "
            f"connect {_fmt(rec.get('connect_rate'), ',.0f')}/s"
        )
    elif scenario.mode == "fanout":
        text = (
            f"{rec.get('held', 0):,} clients, {rec['rate']:,.0f} delivered/s "
            f"({_fmt(rec.get('delivered_pct'), '.1f')}% of {_fmt(rec.get('tick_rate'), '.1f')} "
            f"ticks/s), p50 {rec['p50_ms']:.1f} ms, p99 {rec['p99_ms']:.1f} ms"
        )
    else:
        text = f"{rec['rate']:,.0f}/s, p99 {rec['p99_ms']:.2f} ms"
    text += f", loadgen CPU {100 * rec['loadgen_cpu_share']:.0f}%"
    if rec.get("other_cpu_share") is not None:
        text += f", other CPU {100 * rec['other_cpu_share']:.0f}%"
    if rec["error_total"]:
        text += f", {rec['error_total']} ERRORS {rec['errors']}"
    return text


def add_baselines(revisions: Sequence[str], into: Path) -> None:
    """Extract the package at each revision into ``into`` and add it as a peer.

    ``git archive`` of committed files only: the copy cannot pick up this working
    tree's uncommitted edits, and the repository's worktree list is left alone.
    """
    global SERVERS
    for rev in revisions:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "--verify", rev + "^{commit}"],
            check=False, capture_output=True, text=True, timeout=30,
        )
        if commit.returncode != 0:
            raise SystemExit(f"bench: --baseline {rev}: not a commit: {commit.stderr.strip()}")
        tree = into / commit.stdout.strip()
        tree.mkdir()
        archive = subprocess.Popen(
            ["git", "-C", str(REPO), "archive", rev, "wsroute_sync"], stdout=subprocess.PIPE
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True,
                       timeout=60)
        if archive.wait(timeout=60) != 0:
            raise SystemExit(f"bench: --baseline {rev}: git archive failed")
        SERVERS += (
            ServerSpec(
                f"{OURS}@{rev}", f"wsroute_sync @ {commit.stdout.strip()}", "ws",
                f"ours at {rev}, for an A/B in the same run", default=False, fanout=True,
                tree=tree,
            ),
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    wall0 = time.monotonic()
    fd_limits = raise_fd_limit()
    if "pinned" in args.placements and (
        shutil.which("taskset") is None or (os.cpu_count() or 1) < 2
    ):
        raise SystemExit("bench: the pinned placement needs taskset (util-linux) and 2 CPUs")
    loadgen = ensure_loadgen()
    baseline_dir = Path(tempfile.mkdtemp(prefix="wsroute-baseline-"))
    add_baselines(args.baseline, baseline_dir)
    for spec in SERVERS:
        if spec.key in args.servers and spec.go_build is not None:
            ensure_go_binary(*spec.go_build)
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        quick=args.quick,
        io_timeout=args.io_timeout,
        dial_concurrency=args.dial_concurrency,
        request_concurrency=args.request_concurrency,
        settle=1.0,
        fd_hard_limit=fd_limits[1],
        hold=args.hold_seconds,
    )
    meta = machine_info(fd_limits)
    meta["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    busy = float(meta["loadavg_start"][0]) > 1.0
    print(
        f"bench: {meta['cpus']} CPUs ({meta['cpu_model']}), Python {meta['python']}, {meta['go']}\n"
        f"bench: packages {meta['packages']}\n"
        f"bench: load average at start {' '.join(meta['loadavg_start'])}"
        + ("  (busy machine: numbers will be noisy)" if busy else ""),
        flush=True,
    )
    if args.quick:
        print("bench: --quick: smoke run, numbers are not comparable with full runs", flush=True)

    log_dir = Path(tempfile.mkdtemp(prefix="wsroute-bench-"))
    session = Session(args, settings, loadgen, log_dir)
    try:
        for placement, scenario, rnd, order in plan(args):
            for spec in order:
                session.run(spec, scenario, placement, rnd)
            if rnd == args.rounds - 1:
                print(table_for(scenario, placement, session), flush=True)
    except KeyboardInterrupt:
        session.failures.append("interrupted")
        print("\nbench: interrupted; servers stopped", flush=True)
    finally:
        meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        meta["wall_s"] = time.monotonic() - wall0
        out = write_results(args, meta, session)
        shutil.rmtree(log_dir, ignore_errors=True)
        shutil.rmtree(baseline_dir, ignore_errors=True)
    print(f"\nbench: wall time {meta['wall_s']:.0f}s; results in {out}")
    for key, why in session.skipped.items():
        print(f"bench: skipped {key}: {why}")
    if session.failures:
        print(f"bench: {len(session.failures)} run(s) with errors:")
        for failure in session.failures:
            print("  - " + failure.replace("\n", "\n    "))
        return 1
    return 0


def rows_for(
    records: list[dict[str, Any]], scenario: Scenario, placement: str
) -> dict[str, dict[str, Any]]:
    """Each server's runs of one (scenario, placement), aggregated over rounds."""
    rows: dict[str, dict[str, Any]] = {}
    for spec in SERVERS:
        key = (spec.key, scenario.key, placement)
        mine = [r for r in records if (r["server"], r["scenario"], r["placement"]) == key]
        if mine:
            rows[spec.key] = aggregate(mine)
    return rows


def table_for(scenario: Scenario, placement: str, session: Session) -> str:
    skips = dict(session.skipped)
    for (server, scen, place), why in session.scenario_skips.items():
        if (scen, place) == (scenario.key, placement):
            skips[server] = why
    rows = rows_for(session.records, scenario, placement)
    table = render_table(scenario, placement, rows, skips)
    paired = render_paired(session.records, scenario, placement)
    return f"{table}\n{paired}" if paired else table


def write_results(args: argparse.Namespace, meta: dict[str, Any], session: Session) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    default = RESULTS_DIR / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    out: Path = args.output or default
    summary: dict[str, Any] = {}
    for placement in args.placements:
        for scenario in SCENARIOS:
            rows = rows_for(session.records, scenario, placement)
            if rows:
                summary.setdefault(placement, {})[scenario.key] = rows
    doc = {
        "meta": meta,
        "skipped_servers": session.skipped,
        "skipped_runs": [
            {"server": s, "scenario": c, "placement": p, "reason": why}
            for (s, c, p), why in session.scenario_skips.items()
        ],
        "failures": session.failures,
        "summary": summary,
        "runs": session.records,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
