"""Connection threads that outlive their connection, to serve the next one.

Each connection is still served by a thread of its own from its handshake to its close;
what this module changes is where that thread comes from. Starting a thread in CPython
(``threading.Thread`` set-up, ``pthread_create``, and ``start()`` waiting until the new
thread has run) is the largest single cost of a short connection, larger than its
handshake. So a thread whose connection has ended waits, for a while, to be handed the
next one: a lock released by the accept loop, which wakes exactly that thread.

The pool keeps at most ``max_idle`` such threads, the most recently used first (their
stacks and caches are the warmest), and each leaves after ``idle_timeout`` seconds
without work, so a burst of connections does not leave a crowd of threads behind.
Threads are non-daemon and registered under the pool's lock before they start, so
:meth:`ThreadPool.close` can join every one of them.

On Linux the pool's threads can run under the ``SCHED_BATCH`` scheduling policy
(``thread_policy="batch"``; the server's default outside worker processes). With
hundreds of busy connections nearly every thread is waiting for the GIL, and each of
those waits wakes up every switch interval (5 ms) to check on it. Under the normal
policy such a wake-up may preempt whichever thread runs on that core, and when that is
the thread holding the GIL, every thread waits for it to be scheduled again: throughput
falls by a third and stays there. Batch threads never preempt on wake-up; they are
otherwise scheduled like any other thread of nice 0, and need no privilege. Threads a
batch thread starts inherit the policy (``os.sched_setscheduler(0, os.SCHED_OTHER,
os.sched_param(0))`` puts one back).

The threads can also be bound to a set of CPUs (``cpu_affinity``; off by default).
Python runs one thread at a time, so a threaded server gains nothing from a second core
for its Python work, and it pays for one: when the threads are spread over several
cores, each hand-over of the GIL (one per system call that blocks: a read, a write)
wakes a thread on another core, a cross-core wake-up that costs more than the message
it serves. On the 2-core benchmark machine, 50 busy connections made ~25k round trips/s
spread out and ~50k bound to one CPU (benchmarks/README.md).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, FrozenSet, Iterable, List, Optional, Set, Union

__all__ = [
    "ThreadPool",
    "THREAD_POLICIES",
    "CpuAffinity",
    "check_cpu_affinity",
    "check_thread_policy",
    "resolve_cpu_affinity",
    "run_on_cpus",
    "set_thread_cpus",
    "set_thread_policy",
]

Job = Callable[[], None]

#: Values of ``thread_policy``; ``None`` leaves threads with the policy they inherit.
THREAD_POLICIES = ("batch",)


def check_thread_policy(policy: Optional[str], *, allow_auto: bool = False) -> None:
    """Raise ``ValueError`` unless ``policy`` is one of :data:`THREAD_POLICIES` or ``None``
    (or ``"auto"``, which the server resolves, when ``allow_auto``)."""
    allowed = ("auto", *THREAD_POLICIES) if allow_auto else THREAD_POLICIES
    if policy is not None and policy not in allowed:
        names = ", ".join(repr(p) for p in allowed)
        raise ValueError(f"thread_policy must be {names} or None, got {policy!r}")


def set_thread_policy(policy: Optional[str]) -> bool:
    """Give the calling thread the scheduling policy ``policy`` (see the module's notes).

    Returns ``False`` for ``None``, and where the system has no such policy or refuses it
    (a sandbox may forbid ``sched_setscheduler``): the thread then keeps the one it has.
    """
    check_thread_policy(policy)
    if policy is None:
        return False
    setscheduler = getattr(os, "sched_setscheduler", None)
    batch = getattr(os, "SCHED_BATCH", None)
    if setscheduler is None or batch is None:
        return False
    try:
        # pid 0 is the calling thread, not the process: Linux schedules threads.
        setscheduler(0, batch, os.sched_param(0))
    except OSError:
        return False
    return True


#: The ``cpu_affinity`` option: ``None`` (off), ``"one"``, or CPU numbers.
CpuAffinity = Union[None, str, Iterable[int]]


def check_cpu_affinity(value: CpuAffinity) -> Union[None, str, FrozenSet[int]]:
    """The option in its stored form (``None``, ``"one"`` or a frozenset of CPU
    numbers); ``ValueError`` or ``TypeError`` for anything else."""
    if value is None or value == "one":
        return value
    if isinstance(value, (str, bytes)):
        raise ValueError(f"cpu_affinity must be 'one', CPU numbers or None, got {value!r}")
    try:
        cpus = frozenset(value)
    except TypeError:
        raise TypeError("cpu_affinity must be 'one', an iterable of CPU numbers or None, "
                        f"not {type(value).__name__}") from None
    if not cpus:
        raise ValueError("cpu_affinity must name at least one CPU (use None to switch it off)")
    for cpu in cpus:
        if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu < 0:
            raise ValueError(f"cpu_affinity: CPU numbers are ints >= 0, got {cpu!r}")
    return cpus


def resolve_cpu_affinity(value: Union[None, str, FrozenSet[int]], index: int = 0
                         ) -> Optional[FrozenSet[int]]:
    """The CPUs to bind to: ``"one"`` is the ``index``-th CPU (wrapping) of those the
    calling thread may run on, so that worker process ``i`` gets a core of its own;
    ``None`` where the system cannot bind threads, or for ``None``. ``ValueError`` if
    none of the CPUs named is one this process may run on."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if value is None or getaffinity is None:
        return None
    allowed = sorted(getaffinity(0))
    if value == "one":
        return frozenset((allowed[index % len(allowed)],))
    assert not isinstance(value, str)
    if value.isdisjoint(allowed):
        raise ValueError(f"cpu_affinity names no CPU this process may use "
                         f"(it may use {', '.join(map(str, allowed))})")
    return value


def set_thread_cpus(cpus: Optional[FrozenSet[int]]) -> bool:
    """Bind the calling thread to ``cpus`` (Linux: pid 0 is the calling thread).

    ``False`` for ``None``, where the system has no affinity, or when it refuses
    (none of ``cpus`` is available to this process): the thread stays where it was.
    Threads the calling thread starts later inherit the binding.
    """
    setaffinity = getattr(os, "sched_setaffinity", None)
    if cpus is None or setaffinity is None:
        return False
    try:
        setaffinity(0, cpus)
    except OSError:
        return False
    return True


def run_on_cpus(cpus: Optional[FrozenSet[int]], run: Callable[[], None]) -> None:
    """Call ``run()`` with the calling thread bound to ``cpus`` (``None``: unbound), then
    give the thread back the CPUs it had: it may be the caller's own (``serve()``)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    before = getaffinity(0) if getaffinity is not None and cpus is not None else None
    bound = set_thread_cpus(cpus)
    try:
        run()
    finally:
        if bound and before is not None:
            set_thread_cpus(frozenset(before))


class _Worker:
    """One pooled thread: its wake-up lock and the job handed to it."""

    __slots__ = ("pool", "wake", "job", "thread")

    def __init__(self, pool: "ThreadPool", job: Job, name: str) -> None:
        self.pool = pool
        # Held while the thread has nothing to do; releasing it hands over ``job``.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job: Optional[Job] = job
        self.thread = threading.Thread(target=self._run, name=name)

    def _run(self) -> None:
        pool = self.pool
        try:
            set_thread_policy(pool.thread_policy)
            set_thread_cpus(pool.cpus)
            while True:
                job = self.job
                if job is None:
                    return  # the pool is closing
                self.job = None
                job()
                del job  # do not keep the finished connection alive while idle
                if not pool._park(self):
                    return
                if not self.wake.acquire(timeout=pool.idle_timeout):
                    if pool._retire(self):
                        return
                    # submit() took this worker just as it timed out: its job is coming.
                    self.wake.acquire()
        finally:
            pool._exited(self)


class ThreadPool:
    """Runs each job in a thread of its own, reusing threads whose job has finished.

    ``submit(job, name)`` never queues: the job starts at once, in an idle thread or a
    new one. A job is expected to handle its own errors (the connection's ``run`` does).
    ``thread_policy="batch"`` runs the threads under ``SCHED_BATCH`` where the system
    has it (:func:`set_thread_policy`); ``None`` leaves them as they are born. ``cpus``
    binds them to those CPUs (:func:`set_thread_cpus`); ``None`` leaves them unbound.
    """

    def __init__(self, *, max_idle: int = 64, idle_timeout: float = 30.0,
                 thread_policy: Optional[str] = None,
                 cpus: Optional[FrozenSet[int]] = None) -> None:
        if max_idle < 0:
            raise ValueError("max_idle must be >= 0")
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        check_thread_policy(thread_policy)
        #: The scheduling policy each thread sets for itself when it starts.
        self.thread_policy = thread_policy
        #: The CPUs each thread binds itself to when it starts (``None``: unbound).
        self.cpus = cpus
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._idle: List[_Worker] = []  # a stack: the last parked is the first reused
        self._workers: Set[_Worker] = set()
        self._closed = False

    @property
    def idle(self) -> int:
        """Threads waiting for a job."""
        return len(self._idle)

    @property
    def threads(self) -> int:
        """Threads alive in the pool, busy or idle."""
        return len(self._workers)

    def submit(self, job: Job, name: str) -> None:
        """Run ``job`` now in a thread named ``name``.

        Raises ``RuntimeError`` if the pool is closed or a new thread cannot start
        (CPython's "can't start new thread", when memory or limits run out).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread pool is closed")
            new = not self._idle
            if new:
                worker = _Worker(self, job, name)
                self._workers.add(worker)  # registered before it starts: close() joins it
            else:
                worker = self._idle.pop()
        if not new:
            worker.job = job
            worker.thread.name = name
            worker.wake.release()
            return
        try:
            worker.thread.start()
        except RuntimeError:
            with self._lock:
                self._workers.discard(worker)
            raise

    def close(self, timeout: Optional[float] = None) -> bool:
        """Stop taking jobs, end the idle threads, and wait for every thread to exit.

        Busy threads exit when their job returns. Safe from a pooled thread (it is not
        waited for). Returns ``False`` if some thread was still running at ``timeout``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            workers = list(self._workers)
        for worker in idle:
            worker.job = None
            worker.wake.release()
        current = threading.current_thread()
        for worker in workers:
            if worker.thread is current or worker.thread.ident is None:
                continue
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            worker.thread.join(remaining)
        return not any(
            w.thread.is_alive() for w in workers if w.thread is not current
        )

    # Called by the workers.

    def _park(self, worker: _Worker) -> bool:
        """Make a worker whose job ended idle; ``False`` if it should exit instead."""
        with self._lock:
            if self._closed or len(self._idle) >= self.max_idle:
                return False
            worker.thread.name = "wsroute_sync-idle"
            self._idle.append(worker)
            return True

    def _retire(self, worker: _Worker) -> bool:
        """An idle worker's wait ran out: ``True`` if it left the pool, ``False`` if it
        was handed a job in the meantime."""
        with self._lock:
            try:
                self._idle.remove(worker)
            except ValueError:
                return False
            return True

    def _exited(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
