"""The Server: its lifecycle (listen, start, serve, close) and the wiring of admission.

The shape follows the Go original: a listener whose accept loop (accept.py) or follower
threads (follow.py) hand each complete request head here; the connection takes a slot
of a bounded semaphore without waiting (roster.py: HTTP 503 past the limit, before any
upgrade) and a thread of its own (pool.py), which gives the slot back in its ``finally``
beside the socket close. Handlers live in a dict guarded by a ``threading.Lock``
(registry.py), pages in pages.py; ``close()`` is idempotent and safe from any thread.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .accept import Acceptor
from .backplane import Backplane
from .connection import ServerConnection
from .context import Context
from .fanout import FanOut, close_all
from .frames import CLOSE_GOING_AWAY, Message
from .http import HTTPRequest, http_response
from .keepalive import Keepalive
from .listen import UNKNOWN_TIMEOUT, url_for
from .options import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADER_SIZE, DEFAULT_MAX_MESSAGE_SIZE
from .options import ServerOptions
from .pages import HTTPHandler, Pages
from .pool import CpuAffinity, ThreadPool, resolve_cpu_affinity, run_on_cpus
from .reaper import Reaper
from .registry import Routes
from .roster import Roster
from .routing import Dispatcher, Handler
from .upgrade import answer_and_close
from .wsgi import WSGIApp, WSGIApplication

__all__ = ["Server", "MessageHandler", "HTTPHandler"]

#: A raw message hook: ``message_handler(connection, message) -> reply or None``.
MessageHandler = Callable[[ServerConnection, Message], Optional[Message]]

_ABORT_MARGIN = 0.5  # how long close(timeout) waits past it for the threads it aborted
# Connection threads kept for reuse (pool.py), and how long one waits for the next.
_MAX_IDLE_THREADS, _IDLE_THREAD_SECONDS = 64, 30.0


class Server:
    """A threaded WebSocket server that routes JSON messages to handlers.

    Every keyword but ``message_handler`` is an option: keyword-only, checked at once,
    kept in ``server.options`` and documented, group by group as in the signature, by
    :class:`~wsroute_sync.options.ServerOptions` (and the guide's "Server options").
    ``None`` switches a feature off.

    message_handler: ``message_handler(connection, message) -> reply`` replaces JSON
        routing with a raw hook (an echo server is ``lambda c, m: m``).
    """

    def __init__(
        self,
        *,
        # Limits
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_pending_handshakes: Union[int, str, None] = "auto",
        # Per-client limits
        max_connections_per_ip: Optional[int] = None,
        message_rate: Optional[float] = None,
        message_burst: Optional[int] = None,
        trusted_proxies: Optional[Sequence[str]] = None,
        client_ip_header: str = "X-Forwarded-For",
        # Timeouts
        handshake_timeout: Optional[float] = 10.0,
        ping_interval: Optional[float] = 20.0,
        ping_timeout: Optional[float] = 20.0,
        write_timeout: Optional[float] = 10.0,
        close_timeout: Optional[float] = 10.0,
        handler_timeout: Optional[float] = 10.0,
        # Protocol
        path: Union[str, Sequence[str], None] = None,
        subprotocols: Optional[Sequence[str]] = None,
        compression: Optional[str] = None,
        # Security
        allowed_origins: Optional[Sequence[str]] = None,
        check_origin: Optional[Callable[[HTTPRequest], bool]] = None,
        authenticate: Optional[Callable[[HTTPRequest], Any]] = None,
        # HTTP
        health_path: Optional[str] = "/healthz",
        metrics_path: Optional[str] = "/metrics",
        # Scale-out
        backplane: Optional[Backplane] = None,
        # Threads
        thread_policy: Optional[str] = "auto",
        cpu_affinity: CpuAffinity = None,
        # Others
        message_handler: Optional[MessageHandler] = None,
        logger: Union[logging.Logger, logging.LoggerAdapter, None] = None,  # type: ignore[type-arg]
    ) -> None:
        # Every keyword but message_handler is a field of ServerOptions, which checks it
        # (tests/test_options.py pins the two lists to each other).
        keywords = dict(locals())
        del keywords["self"], keywords["message_handler"]
        self.options = ServerOptions(**keywords)
        if backplane is not None:
            backplane.attach(self)
        if message_handler is not None and not callable(message_handler):
            raise TypeError("message_handler must be callable or None")
        self.logger: Union[logging.Logger, logging.LoggerAdapter] = (  # type: ignore[type-arg]
            logger if logger is not None else logging.getLogger("wsroute_sync.server")
        )
        self.max_connections = max_connections
        no_routes: Dict[str, Handler] = {}
        self._dispatcher = Dispatcher(
            no_routes.get, Context, logger=self.logger, handler_timeout=handler_timeout
        )
        # The registry: a dict guarded by a lock, published to the dispatcher.
        self._routes = Routes(self._dispatcher)
        self._pages = Pages(
            health_path=health_path, metrics_path=metrics_path,
            closing=lambda: self._closing, active=lambda: self.active_connections,
            max_connections=max_connections, metrics=self.metrics_text, logger=self.logger,
        )
        #: The answer to a request that asks for no upgrade (the ConnectionOwner
        #: interface): health, metrics, the pages of :meth:`register_http`, else 426.
        self.http_answer = self._pages.answer
        #: The reply to one message, called by connection threads (the ConnectionOwner
        #: interface): JSON routing, or the raw ``message_handler``.
        self.handle_message: MessageHandler = (
            message_handler if message_handler is not None else self._dispatcher.dispatch
        )
        # Connections: slots, per-client counts, the live ones by id, the numbers.
        self._roster = Roster(self.options, self.logger)
        self._keepalive = Keepalive("wsroute_sync-keepalive", self.logger,
                                    interval=ping_interval, timeout=ping_timeout)
        #: Ping a connection every ping_interval (the ConnectionOwner interface).
        self.keep_alive = self._keepalive.add
        # Lifecycle.
        self._state_lock = threading.Lock()
        self._acceptor: Optional[Acceptor] = None
        self._ssl_context: Optional[ssl.SSLContext] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._closing = False
        self._closed = threading.Event()
        self._reaper = Reaper("wsroute_sync-reaper", self.logger, close_timeout)
        #: Drop a connection not closed within close_timeout (the ConnectionOwner interface).
        self.expect_close = self._reaper.schedule
        self._fanout = FanOut(
            connections=self._roster.connections, lookup=self._roster.get,
            instance_id=lambda: self._roster.instance_id, backplane=backplane,
            write_timeout=write_timeout, logger=self.logger,
        )
        self._pool = ThreadPool(
            max_idle=min(_MAX_IDLE_THREADS, max_connections), idle_timeout=_IDLE_THREAD_SECONDS,
            # "auto" is "batch" here; a worker process sets its pool back (workers.py),
            # and its own CPU under cpu_affinity="one".
            thread_policy=None if self.options.thread_policy is None else "batch",
            cpus=resolve_cpu_affinity(self.options.cpu_affinity),
        )
        self._supervisor: Any = None  # a workers.Supervisor in the parent of workers
        self.address: Any = None

    # The registry.

    def register(self, route: str, handler: Any) -> None:
        """Register ``handler`` for ``route``; safe while serving.

        ``handler`` is a callable ``handler(ctx, message: bytes)`` or an object with a
        ``handle(ctx, message)`` method. Registering a route again **replaces** its
        handler (as assigning to the Go original's map does); messages already being
        handled finish with the old one.
        """
        replaced = self._routes.register(route, handler)
        self.logger.debug("route %r %s", route, "replaced" if replaced else "registered")

    def unregister(self, route: str) -> None:
        """Remove ``route``; raises ``KeyError`` if it is not registered."""
        self._routes.unregister(route)
        self.logger.debug("route %r unregistered", route)

    def route(self, route: str) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`: ``@server.route("echo")``."""

        def decorator(handler: Handler) -> Handler:
            self.register(route, handler)
            return handler

        return decorator

    def register_http(self, path: str, handler: HTTPHandler) -> None:
        """Answer plain ``GET``/``HEAD`` requests for ``path`` (no WebSocket upgrade).

        ``handler(request)`` returns ``(status, content_type, body)``; it runs in the
        connection's thread before any upgrade, e.g. to serve a page that connects back.
        """
        self._pages.register(path, handler)

    @property
    def routes(self) -> List[str]:
        """The registered route names."""
        return self._routes.names()

    # Connections.

    @property
    def connections(self) -> List[ServerConnection]:
        """The live connections (upgraded or still in their handshake)."""
        return self._roster.connections()

    @property
    def active_connections(self) -> int:
        return self._roster.count()

    def broadcast(
        self,
        message: Any,
        *,
        room: Optional[str] = None,
        predicate: Optional[Callable[[ServerConnection], bool]] = None,
        timeout: Optional[float] = None,
    ) -> int:
        """Send ``message`` to every open connection (or those in ``room``, or those
        ``predicate`` picks).

        Safe from any thread; closed connections are skipped without raising. ``str``
        goes as text, bytes as binary, anything else as JSON text (``TypeError`` or
        ``ValueError`` for a value JSON cannot encode, raised before anything is sent).
        Writes never block on one client: the message is framed once, every socket is
        written without waiting, and clients whose buffers are full are served as they
        drain, together, for at most ``timeout`` seconds (default ``write_timeout``, else
        10). A client still behind after that cannot take even a Close frame, so it is
        disconnected and logged. A frame never lands inside another: a client busy with a
        large reply gets the broadcast after it. Returns how many connections **of this
        instance** received the whole message.

        With a ``backplane``, the message is then published, and every other instance
        delivers it to its own clients (in ``room``, if given). A ``predicate`` is a
        local function that cannot travel: a broadcast with one stays on this instance.
        """
        return self._fanout.broadcast(message, room=room, predicate=predicate, timeout=timeout)

    def send_to(self, connection_id: str, message: Any) -> bool:
        """Send ``message`` to the client with this connection id, wherever it is.

        A client of this instance gets it directly; with a ``backplane``, a client of
        another instance (the id's prefix names it) gets it through the backplane.
        Returns ``True`` once written to a local client or handed to the backplane
        (delivery over there is not confirmed), ``False`` if the client is not connected
        here and no backplane could take it.
        """
        return self._fanout.send_to(connection_id, message)

    def stats(self) -> Dict[str, Any]:
        """The server's numbers: connections, messages, errors, handler latency."""
        stats = self._roster.stats()
        stats["closing"] = self._closing
        return stats

    def metrics_text(self) -> str:
        """:meth:`stats` in the Prometheus text format, as ``GET /metrics`` serves it."""
        return self._roster.metrics_text()

    # Lifecycle.

    @property
    def url(self) -> str:
        """``ws://host:port/`` (or ``wss://``) of the listening socket."""
        if self.address is None:
            raise RuntimeError("the server is not listening")
        return url_for(self.address, tls=self._ssl_context is not None)

    def _listen(self, addr: str, ssl_context: Optional[ssl.SSLContext], *,
                reuse_port: bool = False) -> Acceptor:
        # reuse_port: workers.py's worker processes share one port (SO_REUSEPORT).
        with self._state_lock:
            if self._closing:
                raise RuntimeError("the server is closed; make a new one")
            if self._acceptor is not None:
                raise RuntimeError("the server is already listening")
            self._acceptor = acceptor = Acceptor(
                addr, reuse_port=reuse_port, ssl_context=ssl_context, options=self.options,
                on_head=self._on_head, logger=self.logger, admit=self._admit_accepted,
                spawn=self._pool.submit,
            )
            self.address = acceptor.address
            self._ssl_context = ssl_context
        self.logger.info("server listening on %s", self.url)
        if self.options.backplane is not None:
            # Never raises for an unreachable peer: local delivery starts regardless.
            self.options.backplane.start(self._roster.instance_id, self._fanout.deliver_remote)
        return acceptor

    def start(self, addr: str = "127.0.0.1:0", *, ssl_context: Optional[ssl.SSLContext] = None,
              reuse_port: bool = False) -> "Server":
        """Listen on ``addr`` and serve in a background thread; return once listening.

        ``server.address`` then holds the bound ``(host, port)``. Stop with :meth:`close`
        or use the server as a context manager. ``reuse_port``: share the port with other
        processes (``SO_REUSEPORT``), as the worker processes of ``serve(workers=N)`` do.
        """
        acceptor = self._listen(addr, ssl_context, reuse_port=reuse_port)
        thread = threading.Thread(target=run_on_cpus, args=(self._pool.cpus, acceptor.run),
                                  name="wsroute_sync-accept")  # bound like its connections
        self._accept_thread = thread
        thread.start()
        return self

    def serve(self, addr: str = ":8080", *, ssl_context: Optional[ssl.SSLContext] = None,
              workers: int = 1) -> None:
        """Listen on ``addr`` and serve in this thread until :meth:`close` is called.

        Returns normally once the server has closed. Raises ``OSError`` if the address
        cannot be bound (the Go original's ``Serve`` error).

        ``workers=N`` (N > 1) forks N worker processes that share the port through
        ``SO_REUSEPORT``, each with its own ``max_connections``; this process supervises
        them (see :mod:`wsroute_sync.workers`). Call it before starting threads.
        """
        if workers != 1:
            from .workers import serve_workers

            serve_workers(self, addr, workers, ssl_context=ssl_context)
            return
        # In the caller's thread, which is given back its CPUs after.
        run_on_cpus(self._pool.cpus, self._listen(addr, ssl_context).run)
        self._closed.wait()

    @property
    def closing(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closing

    def attach_supervisor(self, supervisor: Any, *, ssl_context: Optional[ssl.SSLContext]
                          ) -> None:
        """Hand this server to a supervisor of worker processes (workers.py): it does not
        listen itself, and :meth:`close` stops the supervisor."""
        with self._state_lock:
            if self._closing:
                raise RuntimeError("the server is closed; make a new one")
            if self._acceptor is not None or self._supervisor is not None:
                raise RuntimeError("the server is already listening")
            self._supervisor = supervisor
            self._ssl_context = ssl_context  # for url's scheme only

    def enter_worker_process(self, index: int = 0) -> None:
        """Make this copy of the server, in forked worker process ``index``, its own: own
        connection ids (and backplane instance id), no supervisor, its thread placement."""
        self._supervisor = None
        self._pool.cpus = resolve_cpu_affinity(self.options.cpu_affinity, index)
        if self.options.thread_policy == "auto":
            # Worker processes keep every core busy, and there a thread handed the GIL must
            # preempt to run soon: two workers on two cores with batch measured 72-78k
            # round trips/s at 50 connections against 84-103k without.
            self._pool.thread_policy = None
        self._roster.renew_instance_id()

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Block until :meth:`close` has finished; ``False`` if ``timeout`` ran out."""
        finished = self._closed.wait(timeout)
        thread = self._accept_thread
        if finished and thread is not None and thread is not threading.current_thread():
            thread.join()
        return finished

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Shut down gracefully; idempotent and safe from any thread, handlers included.

        Stops accepting, starts the closing handshake (Close 1001, going away) with every
        open connection at once, waits for the clients' answers up to ``close_timeout``,
        drops the connections still open, and waits for their threads. The whole of it
        is bounded by ``timeout`` seconds (``None``: no bound), plus at most half a
        second for the threads of connections it had to drop; a handler still running
        then is logged, not waited for. A handler calling it does not wait for its own
        connection.
        """
        with self._state_lock:
            first = not self._closing
            self._closing = True
        if not first:
            if not self._roster.serves(threading.current_thread()):
                self._closed.wait(timeout)
            return
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout

        def left(until: Optional[float]) -> Optional[float]:
            return None if until is None else max(0.0, until - time.monotonic())

        self.logger.info("server closing")
        if self._supervisor is not None:
            self._supervisor.stop(timeout)  # worker processes: each closes its clients
        acceptor = self._acceptor
        if acceptor is not None:
            acceptor.stop()
        accept_thread = self._accept_thread
        if accept_thread is not None and accept_thread is not threading.current_thread():
            accept_thread.join(left(deadline))
        if self.options.backplane is not None:
            self.options.backplane.close()  # no more deliveries from other instances
        # Sealed: no connection is registered any more, so this list is final.
        connections = self._roster.seal()
        self._keepalive.stop()  # no Ping may follow the Close frames
        close_timeout = self.options.close_timeout
        grace_end = started + (close_timeout if close_timeout is not None else 10.0)
        if deadline is not None:
            grace_end = min(grace_end, deadline)
        others = close_all(connections, CLOSE_GOING_AWAY, "server shutting down", grace_end)
        # Aborted connections cannot block any more (their sockets are shut down), but
        # their threads need a moment to end: a short margin past the deadline for that.
        margin_end = None if deadline is None else max(deadline, time.monotonic()) + _ABORT_MARGIN
        for connection in others:
            connection.wait_finished(left(margin_end))
        stuck = [c for c in others if not c.finished]
        # The pooled threads, idle, finishing a connection or following, end too.
        self._pool.close(left(margin_end))
        for connection in stuck:
            self.logger.warning("connection %s did not finish within %ss (a handler still "
                                "running?)", connection.id, timeout)
        self._reaper.stop()
        if acceptor is not None:
            acceptor.close()
        self._closed.set()
        self.logger.info("server closed (%d connection(s) closed, %d unfinished)",
                         len(connections) - len(stuck), len(stuck))

    def connection_done(self, connection: ServerConnection) -> None:
        """A connection has ended (ConnectionOwner): forget it, count it, free its slot."""
        self._keepalive.discard(connection)
        self._roster.done(connection)

    # The accept loop and admission.

    def _on_head(self, sock: socket.socket, remote: Any, request: HTTPRequest, rest: bytes
                 ) -> Optional[bytes]:
        # A complete request head in the accept loop: a slot and a thread, or a refusal.
        connection = self._admit_accepted(sock, remote, request, rest)
        if isinstance(connection, bytes):
            return connection
        try:
            self._pool.submit(connection.run, connection.thread_name)
        except RuntimeError as exc:  # "can't start new thread": out of memory or limits
            self.logger.error("cannot start a connection thread: %s", exc)
            self.connection_done(connection)
            return http_response(503, "server overloaded\n", headers=[("Retry-After", "1")])
        return None

    def _admit_accepted(self, sock: socket.socket, remote: Any, request: HTTPRequest,
                        rest: bytes) -> Union[bytes, ServerConnection]:
        # From the accept loop, or a follower thread that serves it itself (follow.py).
        assert self._acceptor is not None
        return self._admit(sock, remote, request, rest, self._acceptor.inherited_read_timeout)

    def _admit(self, sock: socket.socket, remote: Any, request: HTTPRequest, rest: bytes,
               inherited_read_timeout: Optional[float]) -> Union[bytes, ServerConnection]:
        """A slot and a registered connection for a complete request head, or the answer
        refusing it (503, or 429 for a client over its own limit)."""
        if self._closing:
            return http_response(503, "server shutting down\n")
        return self._roster.admit(remote, request, lambda connection_id: ServerConnection(
            self, sock, remote, connection_id, request, rest=rest,
            inherited_read_timeout=inherited_read_timeout,
        ))

    def serve_socket(self, sock: socket.socket, remote_address: Any, request: HTTPRequest, *,
                     rest: bytes = b"") -> None:
        """Serve one request whose head was already read, in the calling thread, until
        its connection ends (the WSGI entry point uses it).

        Takes a slot (503 when full or closing), answers plain HTTP or runs the
        handshake (refusals are written to the socket), then serves the WebSocket
        connection; the socket is closed and the slot freed when it returns. ``rest``
        holds bytes read past the head. Never raises for a client's fault.
        """
        connection = self._admit(sock, remote_address, request, rest, UNKNOWN_TIMEOUT)
        if isinstance(connection, bytes):
            answer_and_close(sock, connection)
            return
        connection.run()

    def wsgi_app(self, app: Optional[WSGIApplication] = None, *,
                 path: Union[str, Sequence[str], None] = None) -> WSGIApp:
        """A WSGI application serving this server's routes inside a WSGI server you already
        run (gunicorn ``-k gthread``, werkzeug's threaded server), on its port.

        An upgrade request on ``path`` (any path when ``None``) is served by the same code
        as :meth:`serve`, in the WSGI server's thread for that request; every other
        request goes to ``app`` untouched (``None``: 404). Flask:
        ``flask_app.wsgi_app = server.wsgi_app(flask_app.wsgi_app)``. See
        :mod:`wsroute_sync.wsgi`.
        """
        return WSGIApp(self, app, path=path)
