"""Worker processes: one server per core, sharing one port through ``SO_REUSEPORT``.

    server = Server(...)              # routes and options first: the workers copy them
    server.serve(":8080", workers=4)  # or: wsroute-sync serve app:server --workers 4

A thread-per-connection server uses one core at a time (the GIL), so, as gunicorn does,
the process that built the server forks N workers. Each binds its own listening socket to
the same port with ``SO_REUSEPORT`` and runs the usual accept loop and connection threads;
the kernel spreads new connections across the workers' sockets. The parent serves no
client, it supervises:

- it reserves the port first (bound, not listening), so that port 0 picks one port for
  every worker and the port stays ours while a worker restarts;
- a worker that dies is replaced after a back-off that doubles, from 0.1 s up to 10 s,
  while workers keep dying young, and every exit is logged;
- ``server.close()`` in the parent, or SIGTERM/SIGINT to it, sends SIGTERM to every
  worker, which closes its clients with 1001 as ``server.close()`` does; the parent reaps
  them and kills those that outlive the timeout;
- a worker whose parent has died closes itself (it watches a pipe only the parent writes).

**Limits are per worker.** ``max_connections`` bounds each worker's connections, so N
workers take up to N × ``max_connections`` clients (gunicorn's ``worker_connections``
works the same way). A global limit would need shared state consulted on every accept.

**Workers share no memory.** ``broadcast()`` and ``send_to()`` in a worker reach that
worker's clients; give the server a backplane (``RedisBackplane``) to reach every
worker's. The parent holds no client: call them from handlers or from threads that the
workers start.

**Platforms.** Workers need ``os.fork`` and ``socket.SO_REUSEPORT``: Linux (3.9+), the
BSDs and macOS have both; Windows has neither, and ``serve(workers=N)`` raises
``RuntimeError`` there. Only Linux spreads connections evenly across the sockets; on other
systems one worker may get most of them (a warning is logged). Unix-socket addresses
cannot be shared this way and raise ``ValueError``.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from .listen import parse_address, reserve_port

__all__ = ["Supervisor", "WorkerServer", "serve_workers", "check_workers", "reuse_port_supported",
           "EXIT_NOT_SERVING"]


class WorkerServer(Protocol):
    """What the workers need of the server they run (the server implements it)."""

    options: Any
    address: Any

    @property
    def logger(self) -> Any: ...

    @property
    def url(self) -> str: ...

    @property
    def closing(self) -> bool: ...

    def start(self, addr: str = ..., *, ssl_context: Optional[ssl.SSLContext] = ...,
              reuse_port: bool = ...) -> Any: ...

    def close(self, timeout: Optional[float] = ...) -> None: ...

    def attach_supervisor(self, supervisor: Any, *, ssl_context: Optional[ssl.SSLContext]
                          ) -> None: ...

    def enter_worker_process(self, index: int = ...) -> None: ...


_MIN_BACKOFF = 0.1
_MAX_BACKOFF = 10.0
#: A worker that dies sooner than this after its start is "dying young": the pause
#: before its replacement doubles, so a worker that cannot run does not spin the CPU.
_YOUNG = 5.0
#: A worker's exit status when it could not start listening: a restart would fail the
#: same way, so the supervisor stops every worker and raises instead.
EXIT_NOT_SERVING = 3
_READY = struct.Struct("=I")  # a worker's pid, written once it listens
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def reuse_port_supported() -> bool:
    """True where worker processes can share a port (``os.fork`` and ``SO_REUSEPORT``)."""
    return hasattr(os, "fork") and hasattr(socket, "SO_REUSEPORT")


def check_workers(workers: Any) -> int:
    """Validate a ``workers`` count: an int >= 1."""
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int, not {type(workers).__name__}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:  # pragma: no cover - an unnamed signal
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class _Worker:
    __slots__ = ("slot", "pid", "pidfd", "started")

    def __init__(self, slot: int, pid: int, pidfd: Optional[int]) -> None:
        self.slot, self.pid, self.pidfd = slot, pid, pidfd
        self.started = time.monotonic()


class Supervisor:
    """Forks and supervises the worker processes of one server; see the module docstring.

    ``server.serve(addr, workers=N)`` makes one and runs it; most code never needs it.
    """

    def __init__(self, server: WorkerServer, addr: str, workers: int, *,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.server = server
        self.workers = check_workers(workers)
        if not reuse_port_supported():
            raise RuntimeError(
                "workers need os.fork() and SO_REUSEPORT, which this platform "
                f"({sys.platform}) lacks; run one process per port behind a load balancer"
            )
        family, address = parse_address(addr)
        if family == socket.AF_UNIX:
            raise ValueError("workers share a TCP port; a unix: address cannot be shared")
        self._host, self._port = address
        self._ssl_context = ssl_context
        self._logger = server.logger
        self._lock = threading.Lock()
        self._stopping = False
        self._stop_timeout: Optional[float] = None
        self._signal: Optional[int] = None
        self._done = threading.Event()
        self._run_thread: Optional[threading.Thread] = None
        self._workers: Dict[int, _Worker] = {}
        self._restarts: List[Tuple[float, int]] = []  # (when, slot)
        self._backoff: Dict[int, float] = {}
        self._listening: Dict[int, bool] = {}
        self._reservation: Optional[socket.socket] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._ready_r = self._ready_w = self._death_r = self._death_w = -1
        self._worker_addr = ""

    # The parent.

    def reserve(self) -> None:
        """Bind (without listening) the port the workers will share; sets ``server.address``.

        Raises ``OSError`` when the address cannot be bound, before any fork.
        """
        sock, self._worker_addr = reserve_port(self._host, self._port)
        self._reservation = sock
        self.server.address = sock.getsockname()[:2]

    def release(self) -> None:
        """Give back the port :meth:`reserve` bound, when the workers will not start."""
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    def run(self, ready: Optional[Callable[[str], None]] = None) -> None:
        """Fork the workers and supervise them until :meth:`stop` or a signal.

        ``ready(url)`` is called once every first worker listens. Raises
        ``RuntimeError`` if a worker could not listen (the others are stopped first).
        """
        if self._reservation is None:
            self.reserve()
        self._run_thread = threading.current_thread()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self._death_r, self._death_w = os.pipe()
        previous = self._install_signal_handlers()
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        selector.register(self._ready_r, selectors.EVENT_READ, "ready")
        try:
            if not sys.platform.startswith("linux"):
                self._logger.warning("workers: on %s the kernel may not spread connections "
                                     "evenly across SO_REUSEPORT sockets", sys.platform)
            for slot in range(self.workers):
                if self._stopping:
                    break
                self._spawn(slot, selector)
            self._loop(selector, ready)
        finally:
            try:
                self._shutdown(selector)
            finally:
                self._restore_signal_handlers(previous)
                selector.close()
                for sock in (self._wake_r, self._wake_w, self._reservation):
                    if sock is not None:
                        sock.close()
                for fd in (self._ready_r, self._ready_w, self._death_r, self._death_w):
                    os.close(fd)
                self._done.set()

    def stop(self, timeout: Optional[float] = 10.0) -> None:
        """Stop every worker gracefully and wait for them; safe from any thread."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._stop_timeout = timeout
        self._wake()
        if threading.current_thread() is not self._run_thread and self._run_thread is not None:
            self._done.wait(None if timeout is None else timeout + 5.0)

    @property
    def pids(self) -> List[int]:
        """The pids of the running workers."""
        return sorted(self._workers)

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is not None:
            try:
                wake.send(b"x")
            except OSError:  # closed, or full: the loop is awake anyway
                pass

    def _install_signal_handlers(self) -> Dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            self._logger.debug("workers: not in the main thread, signals are not forwarded")
            return {}

        def on_signal(signum: int, frame: Any) -> None:
            # Only note it (no lock: the main thread may hold it): the loop, woken by the
            # byte, does the work outside the handler.
            self._signal = signum
            self._stopping = True
            self._wake()

        previous: Dict[int, Any] = {}
        for signum in _SHUTDOWN_SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
        # A signal may be delivered to any thread of this process; Python runs the
        # handler in the main thread only once it runs bytecode. The wake-up fd makes the
        # kernel wake the loop's select wherever the signal landed.
        assert self._wake_w is not None
        previous[0] = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: Dict[int, Any]) -> None:
        for signum, handler in previous.items():
            if signum == 0:
                signal.set_wakeup_fd(handler)
            else:
                signal.signal(signum, handler)

    def _spawn(self, slot: int, selector: selectors.BaseSelector) -> None:
        # Blocked across the fork, so that a signal cannot reach the child before it has
        # replaced the parent's handlers with its own.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SHUTDOWN_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child; measured by its behaviour
                code = 1
                try:
                    code = self._child(slot)
                except BaseException:
                    self._logger.error("worker %d failed", slot, exc_info=True)
                finally:
                    for stream in (sys.stdout, sys.stderr):
                        try:
                            stream.flush()
                        except Exception:
                            pass
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        pidfd: Optional[int] = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:  # pragma: no cover - kernels before 5.3
                pidfd = None
        worker = _Worker(slot, pid, pidfd)
        self._workers[pid] = worker
        self._listening[pid] = False
        if pidfd is not None:
            selector.register(pidfd, selectors.EVENT_READ, pid)
        self._logger.info("worker %d started (pid %d)", slot, pid)

    def _loop(self, selector: selectors.BaseSelector,
              ready: Optional[Callable[[str], None]]) -> None:
        polling = not hasattr(os, "pidfd_open")
        announced = False
        while not self._stopping:
            now = time.monotonic()
            timeouts = [when - now for when, _ in self._restarts]
            if polling:
                timeouts.append(0.5)  # no pidfd to wait on: look for exits twice a second
            timeout = max(0.0, min(timeouts)) if timeouts else None
            for key, _ in selector.select(timeout):
                if key.data == "wake":
                    try:
                        self._wake_r.recv(64)  # type: ignore[union-attr]
                    except OSError:
                        pass
                elif key.data == "ready":
                    self._read_ready()
                else:
                    self._reap(key.data, selector, blocking=True)
            if polling:
                for pid in list(self._workers):
                    self._reap(pid, selector, blocking=False)
            now = time.monotonic()
            for entry in [r for r in self._restarts if r[0] <= now]:
                self._restarts.remove(entry)
                if not self._stopping:
                    self._spawn(entry[1], selector)
            if not announced and self._workers and all(self._listening.values()) and len(
                self._workers
            ) == self.workers:
                announced = True
                self._logger.info("server supervising %d workers on %s (pid %d)",
                                  self.workers, self.server.url, os.getpid())
                if ready is not None:
                    ready(self.server.url)
        if self._signal is not None:
            self._logger.info("workers: %s received, stopping the workers",
                              signal.Signals(self._signal).name)

    def _read_ready(self) -> None:
        try:
            data = os.read(self._ready_r, 4096)
        except BlockingIOError:
            return
        for (pid,) in _READY.iter_unpack(data[: len(data) - len(data) % _READY.size]):
            if pid in self._workers:
                self._listening[pid] = True
                self._logger.debug("worker %d (pid %d) listening", self._workers[pid].slot,
                                   pid)

    def _reap(self, pid: int, selector: selectors.BaseSelector, *, blocking: bool) -> bool:
        """Collect a worker that exited; schedule its replacement unless stopping."""
        try:
            done, status = os.waitpid(pid, 0 if blocking else os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored?): count it gone
            done, status = pid, 0
        if done == 0:
            return False
        worker = self._workers.pop(pid)
        self._listening.pop(pid, None)
        if worker.pidfd is not None:
            selector.unregister(worker.pidfd)
            os.close(worker.pidfd)
        code = os.waitstatus_to_exitcode(status)
        if self._stopping:
            self._logger.info("worker %d (pid %d) %s", worker.slot, pid, _exit_text(code))
            return True
        if code == EXIT_NOT_SERVING:
            raise RuntimeError(
                f"worker {worker.slot} could not listen on {self._worker_addr}; see its log"
            )
        lived = time.monotonic() - worker.started
        delay = self._backoff.get(worker.slot, 0.0)
        delay = min(max(delay * 2, _MIN_BACKOFF), _MAX_BACKOFF) if lived < _YOUNG else _MIN_BACKOFF
        self._backoff[worker.slot] = delay
        self._logger.warning("worker %d (pid %d) %s after %.1fs; restarting it in %.1fs",
                             worker.slot, pid, _exit_text(code), lived, delay)
        self._restarts.append((time.monotonic() + delay, worker.slot))
        return True

    def _shutdown(self, selector: selectors.BaseSelector) -> None:
        """SIGTERM to every worker, wait for them, SIGKILL what is left; reap them all."""
        with self._lock:
            self._stopping = True
        self._restarts.clear()
        if not self._workers:
            return
        timeout = self._stop_timeout if self._stop_timeout is not None else 10.0
        for pid in list(self._workers):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # The workers' own close() waits up to close_timeout for their clients.
        deadline = time.monotonic() + timeout + 1.0
        while self._workers and time.monotonic() < deadline:
            wait = min(deadline - time.monotonic(), 0.05)
            for key, _ in selector.select(max(0.0, wait)):
                if isinstance(key.data, int):
                    self._reap(key.data, selector, blocking=True)
            for pid in list(self._workers):
                if self._workers[pid].pidfd is None:
                    self._reap(pid, selector, blocking=False)
        for pid in list(self._workers):
            self._logger.warning("worker %d (pid %d) did not stop within %.1fs; killing it",
                                 self._workers[pid].slot, pid, timeout + 1.0)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap(pid, selector, blocking=True)
        self._logger.info("workers stopped")

    # The child.

    def _child(self, slot: int) -> int:  # pragma: no cover - runs in the child
        """A worker's life: listen on the shared port, serve until SIGTERM, exit.

        SIGTERM and SIGINT stay blocked, as they were across the fork, in every thread
        of the worker (threads inherit the mask), and the main thread takes them with
        ``sigwait``: a signal cannot land in a connection thread while the main thread
        sleeps on, unaware.
        """
        server = self.server
        signal.set_wakeup_fd(-1)  # the parent's, copied by fork
        # The parent's supervision state is not ours: close its descriptors.
        for sock in (self._wake_r, self._wake_w, self._reservation):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        for other in self._workers.values():
            if other.pidfd is not None:
                os.close(other.pidfd)
        os.close(self._ready_r)
        os.close(self._death_w)
        # Connection ids must differ between workers; thread_policy="auto" means no
        # SCHED_BATCH in workers (benchmarks/README.md); cpu_affinity="one" gives
        # worker ``slot`` a CPU of its own.
        server.enter_worker_process(slot)
        try:
            server.start(self._worker_addr, ssl_context=self._ssl_context, reuse_port=True)
        except Exception as exc:
            self._logger.error("worker cannot listen on %s: %s", self._worker_addr, exc)
            return EXIT_NOT_SERVING
        try:
            os.write(self._ready_w, _READY.pack(os.getpid()))
        except OSError:
            pass
        os.close(self._ready_w)
        death_r = self._death_r

        def watch_parent() -> None:
            # Only the parent holds the write end: EOF means it is gone.
            try:
                while os.read(death_r, 1):
                    pass
            except OSError:
                pass
            if not server.closing:
                self._logger.warning("worker pid %d: the supervisor is gone; closing",
                                     os.getpid())
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch_parent, name="wsroute_sync-parent-watch",
                         daemon=True).start()
        signal.sigwait(_SHUTDOWN_SIGNALS)
        server.close()
        return 0


def serve_workers(server: WorkerServer, addr: str, workers: int, *,
                  ssl_context: Optional[ssl.SSLContext] = None,
                  ready: Optional[Callable[[str], None]] = None) -> None:
    """``server.serve(addr, workers=N)``: fork N workers and supervise them until closed.

    ``ready(url)`` runs in the parent once every worker listens (the CLI prints the URL).
    """
    supervisor = Supervisor(server, addr, workers, ssl_context=ssl_context)
    if server.closing:
        raise RuntimeError("the server is closed; make a new one")
    supervisor.reserve()
    try:
        server.attach_supervisor(supervisor, ssl_context=ssl_context)
    except RuntimeError:
        supervisor.release()
        raise
    try:
        supervisor.run(ready)
    finally:
        server.close()
