"""The Server: a listening socket, an accept loop, a thread per connection, a registry.

The shape follows the Go original: a blocking listener; each accepted connection takes a
slot of a bounded semaphore (without waiting; over the limit the client gets HTTP 503
before any upgrade) and gets its own thread, which releases the slot in its ``finally``
beside the socket close; handlers live in a dict guarded by a ``threading.Lock``.

Connection threads do not take that lock for each message: every change to the dict,
made under the lock, also publishes a fresh copy of it, and lookups read the copy
published last. With hundreds of threads, a lock taken per message is where they
queue: a thread that loses the GIL while holding it stalls every other one that
needs it.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import secrets
import selectors
import socket
import ssl
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

from .backplane import Backplane, BackplaneMessage
from .connection import UNKNOWN_TIMEOUT, ServerConnection, prepare_listener
from .context import Context
from .errors import HandshakeRejected
from .http import HTTPRequest, http_response
from .options import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADER_SIZE, DEFAULT_MAX_MESSAGE_SIZE
from .options import ServerOptions
from .protocol import CLOSE_GOING_AWAY, Message
from .metrics import Totals, render_prometheus
from .pool import ThreadPool
from .routing import Dispatcher, Handler, encode_result, resolve_handler

__all__ = ["Server", "parse_address", "MessageHandler", "HTTPHandler"]

#: A raw message hook: ``message_handler(connection, message) -> reply or None``.
MessageHandler = Callable[[ServerConnection, Message], Optional[Message]]
#: A plain HTTP page: ``handler(request) -> (status, content_type, body)``.
HTTPHandler = Callable[[HTTPRequest], Tuple[int, str, Union[bytes, str]]]

# Refused connections (over the limit) wait in the accept loop's selector for the
# client to read the 503 and hang up; past this many they are closed at once.
_MAX_LINGERING = 512
_LINGER_SECONDS = 2.0
# Accepting in batches keeps a burst of connects from starving the wake-up pipe.
_ACCEPT_BATCH = 64
_LISTEN_BACKLOG = 1024
# Connection threads kept for reuse once their connection ends (see pool.py), and how
# long one waits for the next connection before it exits.
_MAX_IDLE_THREADS = 64
_IDLE_THREAD_SECONDS = 30.0


def _as_message(message: Any) -> Message:
    """``str`` and bytes-like as they are; anything else as JSON text."""
    if isinstance(message, str):
        if not message.isascii():
            message.encode("utf-8")  # lone surrogates: UnicodeEncodeError before any write
        return message
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    encoded = encode_result(message, True)
    assert isinstance(encoded, str)
    return encoded


def _in_room(room: Optional[str], predicate: Optional[Callable[[ServerConnection], bool]]
             ) -> Callable[[ServerConnection], bool]:
    if predicate is None:
        return lambda connection: room in connection.rooms
    return lambda connection: room in connection.rooms and predicate(connection)


def parse_address(addr: str) -> Tuple[socket.AddressFamily, Any]:
    """Parse ``":8080"``, ``"host:port"``, ``"[::1]:port"`` or ``"unix:/path"``.

    An empty host listens on every interface (IPv6 and IPv4 where the system has a dual
    stack), as Go's ``net.Listen("tcp", ":8080")`` does.
    """
    if not isinstance(addr, str):
        raise TypeError(f"address must be a string like ':8080', not {type(addr).__name__}")
    if addr.startswith("unix:"):
        path = addr[len("unix:"):]
        if not path:
            raise ValueError("unix: address needs a path, e.g. 'unix:/tmp/app.sock'")
        return socket.AF_UNIX, path
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        raise ValueError(f"address {addr!r} has no port; use ':8080' or 'host:8080'")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"address {addr!r} has an invalid port {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], port)
    if ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets: '[{host}]:{port}'")
    return socket.AF_INET, (host, port)


class _Reaper:
    """One thread for the whole server that drops connections whose Close went unanswered.

    A Close started from another thread (``server.close()``, ``connection.close()``)
    cannot shorten the read timeout the connection thread is already blocked in, so the
    deadline is kept here instead of in a timer per connection.
    """

    def __init__(self, name: str) -> None:
        self._heap: List[Tuple[float, int, ServerConnection]] = []
        self._cond = threading.Condition(threading.Lock())
        self._counter = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._name = name

    def schedule(self, connection: ServerConnection, delay: float) -> None:
        with self._cond:
            if self._stopped:
                return
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._counter), connection))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, connection = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                if not connection.finished:
                    connection._logger.info(
                        "connection %s: no Close answer within close_timeout, dropping",
                        connection.id,
                    )
                    connection._abort()


class Server:
    """A threaded WebSocket server that routes JSON messages to handlers.

    Keyword-only options, grouped as in :class:`~wsroute_sync.options.ServerOptions`;
    ``None`` switches a feature off:

    Limits:
        max_connections: open connections at once (default 1000); one more gets
            HTTP 503 "Too many connections" with ``Retry-After`` before any upgrade.
        max_message_size: bytes in one message, after reassembly and decompression
            (default 1 MiB); more closes the connection with 1009.
        max_header_size: bytes of the HTTP request head (default 16 KiB); more gets 431.

    Timeouts (seconds):
        handshake_timeout: to receive the whole request head (default 10); else 408.
        ping_interval, ping_timeout: an idle connection is pinged after
            ``ping_interval`` and closed with 1011 if no pong comes within
            ``ping_timeout`` (defaults 20 and 20).
        write_timeout: a write that makes no progress for this long drops the client
            (default 10), so a client that stops reading cannot pin a thread.
        close_timeout: how long to wait for the client's answer to our Close (default 10).
        handler_timeout: a handler's deadline (default 10), on ``ctx.deadline``.
            Python cannot stop a thread, so it is cooperative; overruns are logged.

    Protocol:
        path: accept upgrades only on this path (or these paths); default: any path.
        subprotocols: subprotocols the server speaks, in order of preference.
        compression: ``"deflate"`` to offer permessage-deflate (RFC 7692); default off,
            because it costs more CPU than it saves on small JSON messages.

    Security:
        allowed_origins: origins allowed to connect (``["*"]`` for any); default: the
            gorilla rule, no ``Origin`` or an ``Origin`` whose host equals ``Host``.
        check_origin: ``check_origin(request) -> bool`` instead of that rule.
        authenticate: ``authenticate(request) -> identity`` run before the upgrade; a
            falsy result refuses with 403, raising ``HandshakeRejected`` picks the status.

    HTTP:
        health_path: plain ``GET`` answered with the server's health (default
            ``/healthz``); metrics_path: Prometheus text (default ``/metrics``).

    Scale-out:
        backplane: a :class:`~wsroute_sync.Backplane` such as ``RedisBackplane(url)``;
            ``broadcast()`` (with or without ``room=``) and ``send_to()`` then reach the
            clients of every instance that shares it; default: this process only.

    Threads:
        thread_policy: ``"batch"`` runs connection threads under Linux's ``SCHED_BATCH``
            policy, so that hundreds of threads waking up to wait for the GIL do not
            preempt the one holding it; ``None`` leaves them under the policy they
            inherit. ``"auto"`` (default): ``"batch"`` in a single server process,
            ``None`` in the worker processes of ``serve(workers=N)``, where it measured
            slower. Elsewhere, or where the system refuses, batch changes nothing.

    Others:
        message_handler: ``message_handler(connection, message) -> reply`` replaces JSON
            routing with a raw hook (an echo server is ``lambda c, m: m``).
        logger: where records go (default ``logging.getLogger("wsroute_sync.server")``).
    """

    def __init__(
        self,
        *,
        # Limits
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
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
        # Others
        message_handler: Optional[MessageHandler] = None,
        logger: Union[logging.Logger, logging.LoggerAdapter, None] = None,  # type: ignore[type-arg]
    ) -> None:
        self.options = ServerOptions(
            max_connections=max_connections,
            max_message_size=max_message_size,
            max_header_size=max_header_size,
            handshake_timeout=handshake_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            write_timeout=write_timeout,
            close_timeout=close_timeout,
            handler_timeout=handler_timeout,
            path=path,  # type: ignore[arg-type]
            subprotocols=subprotocols,  # type: ignore[arg-type]
            compression=compression,
            allowed_origins=allowed_origins,  # type: ignore[arg-type]
            check_origin=check_origin,
            authenticate=authenticate,
            health_path=health_path,
            metrics_path=metrics_path,
            backplane=backplane,
            thread_policy=thread_policy,
            logger=logger,
        )
        if backplane is not None:
            backplane._attach(self)
        if message_handler is not None and not callable(message_handler):
            raise TypeError("message_handler must be callable or None")
        self.logger: Union[logging.Logger, logging.LoggerAdapter] = (  # type: ignore[type-arg]
            logger if logger is not None else logging.getLogger("wsroute_sync.server")
        )
        self.max_connections = max_connections
        # The registry: a dict guarded by a lock; handlers are called outside it.
        self._handlers: Dict[str, Handler] = {}
        self._http_handlers: Dict[str, HTTPHandler] = {}
        self._handlers_lock = threading.Lock()
        no_routes: Dict[str, Handler] = {}
        self._dispatcher = Dispatcher(
            no_routes.get, Context, logger=self.logger, handler_timeout=handler_timeout
        )
        self._message_handler: MessageHandler = (
            message_handler if message_handler is not None else self._dispatcher.dispatch
        )
        # Connections: slots, and the live ones by id.
        self._slots = threading.BoundedSemaphore(max_connections)
        self._connections: Dict[str, ServerConnection] = {}
        self._connections_lock = threading.Lock()
        self._id_prefix = secrets.token_hex(4) + "-"
        self._ids = itertools.count(1)
        self._totals = Totals()
        # Lifecycle.
        self._state_lock = threading.Lock()
        self._listener: Optional[socket.socket] = None
        self._ssl_context: Optional[ssl.SSLContext] = None
        self._unix_path: Optional[str] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._accept_done = threading.Event()
        self._closing = False
        self._closed = threading.Event()
        self._reaper = _Reaper("wsroute_sync-reaper")
        self._pool = ThreadPool(
            max_idle=min(_MAX_IDLE_THREADS, max_connections), idle_timeout=_IDLE_THREAD_SECONDS,
            # "auto" is "batch" here; a worker process sets its pool back (workers.py).
            thread_policy=None if self.options.thread_policy is None else "batch",
        )
        # SO_RCVTIMEO that accepted sockets inherit from the listener (prepare_listener).
        self._accepted_read_timeout: Optional[float] = UNKNOWN_TIMEOUT
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
        if not isinstance(route, str):
            raise TypeError(f"route must be a str, not {type(route).__name__}")
        resolved = resolve_handler(handler)
        with self._handlers_lock:
            replaced = route in self._handlers
            self._handlers[route] = resolved
            self._publish_routes()
        self.logger.debug("route %r %s", route, "replaced" if replaced else "registered")

    def unregister(self, route: str) -> None:
        """Remove ``route``; raises ``KeyError`` if it is not registered."""
        with self._handlers_lock:
            del self._handlers[route]
            self._publish_routes()
        self.logger.debug("route %r unregistered", route)

    def _publish_routes(self) -> None:
        # Called with _handlers_lock held. The dispatcher looks routes up, without the
        # lock, in a copy that is never changed afterwards; replacing its lookup is one
        # attribute store, so a message sees either the old routes or the new ones.
        self._dispatcher.lookup = dict(self._handlers).get

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
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError("an HTTP path starts with '/'")
        if not callable(handler):
            raise TypeError("an HTTP handler is a callable handler(request)")
        with self._handlers_lock:
            self._http_handlers[path] = handler

    @property
    def routes(self) -> List[str]:
        """The registered route names."""
        with self._handlers_lock:
            return list(self._handlers)

    # Connections.

    @property
    def connections(self) -> List[ServerConnection]:
        """The live connections (upgraded or still in their handshake)."""
        with self._connections_lock:
            return list(self._connections.values())

    @property
    def active_connections(self) -> int:
        with self._connections_lock:
            return len(self._connections)

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
        goes as text, bytes as binary, anything else as JSON text. Writes never block on
        one client: every socket is written without waiting, and clients whose buffers
        are full are served as they drain, together, for at most ``timeout`` seconds
        (default ``write_timeout``, else 10). A client still behind after that cannot
        take even a Close frame, so it is disconnected and logged. Returns how many
        connections **of this instance** received the whole message.

        With a ``backplane``, the message is then published, and every other instance
        delivers it to its own clients (in ``room``, if given). A ``predicate`` is a
        local function that cannot travel: a broadcast with one stays on this instance.
        """
        data = _as_message(message)
        if room is not None and not isinstance(room, str):
            raise TypeError(f"room must be a str, not {type(room).__name__}")
        # Local clients first and directly: they never wait for, nor depend on, the
        # backplane; other instances ignore what we publish back to us.
        sent = self._broadcast_local(
            data, predicate=predicate if room is None else _in_room(room, predicate),
            timeout=timeout,
        )
        backplane = self.options.backplane
        if backplane is not None and predicate is None:
            backplane.publish(BackplaneMessage(
                "broadcast" if room is None else "room", data, target=room,
                origin=self._id_prefix[:-1],
            ))
        return sent

    def send_to(self, connection_id: str, message: Any) -> bool:
        """Send ``message`` to the client with this connection id, wherever it is.

        A client of this instance gets it directly; with a ``backplane``, a client of
        another instance (the id's prefix names it) gets it through the backplane.
        Returns ``True`` once written to a local client or handed to the backplane
        (delivery over there is not confirmed), ``False`` if the client is not connected
        here and no backplane could take it.
        """
        data = _as_message(message)
        with self._connections_lock:
            connection = self._connections.get(connection_id)
        if connection is not None:
            return connection._send(data)
        owner = connection_id.rpartition("-")[0] if isinstance(connection_id, str) else ""
        backplane = self.options.backplane
        if backplane is None or not owner or owner == self._id_prefix[:-1]:
            return False
        return backplane.publish(BackplaneMessage(
            "send_to", data, target=connection_id, origin=self._id_prefix[:-1],
            destination=owner,
        ))

    def _deliver_remote(self, message: BackplaneMessage) -> None:
        """A message another instance published: to our own clients, on the backplane's
        thread."""
        if message.kind == "send_to":
            with self._connections_lock:
                connection = self._connections.get(message.target or "")
            if connection is not None:
                connection._send(message.data)
            return
        predicate = _in_room(message.target, None) if message.kind == "room" else None
        self._broadcast_local(message.data, predicate=predicate)

    def _broadcast_local(
        self,
        message: Any,
        *,
        predicate: Optional[Callable[[ServerConnection], bool]] = None,
        timeout: Optional[float] = None,
    ) -> int:
        """:meth:`broadcast` to this instance's clients only."""
        data = _as_message(message)
        limit = timeout if timeout is not None else (self.options.write_timeout or 10.0)
        deadline = time.monotonic() + limit
        shared: Dict[bool, bytes] = {}  # one frame for every connection on the fast path
        waiting: List[ServerConnection] = []  # their own thread is writing: try again
        writing: Dict[socket.socket, Tuple[ServerConnection, memoryview]] = {}
        sent = 0

        def start(connection: ServerConnection) -> None:
            nonlocal sent
            frame = connection._frame_shared(data, shared)
            if frame is None:
                connection._send_lock.release()
                return
            rest = connection._write_nowait(memoryview(frame))
            if rest is None:
                connection._send_lock.release()
            elif len(rest) == 0:
                connection.metrics.messages_out += 1
                connection._send_lock.release()
                sent += 1
            else:
                writing[connection._sock] = (connection, rest)

        for connection in self.connections:
            if not connection.open or (predicate is not None and not predicate(connection)):
                continue
            if connection._send_lock.acquire(blocking=False):
                start(connection)
            else:
                waiting.append(connection)
        if not waiting and not writing:
            return sent
        selector = selectors.DefaultSelector()
        try:
            for sock in writing:
                selector.register(sock, selectors.EVENT_WRITE)
            while (waiting or writing) and time.monotonic() < deadline:
                for connection in list(waiting):
                    if connection._send_lock.acquire(blocking=False):
                        waiting.remove(connection)
                        start(connection)
                        if connection._sock in writing:
                            selector.register(connection._sock, selectors.EVENT_WRITE)
                if not writing:
                    if waiting:
                        # Only locks to wait for: a short pause, bounded by the deadline.
                        waiting[0]._send_lock.acquire(timeout=min(0.005, limit))
                        waiting[0]._send_lock.release()
                    continue
                wait = max(0.0, min(deadline - time.monotonic(), 0.005 if waiting else 1.0))
                for key, _ in selector.select(wait):
                    sock = cast(socket.socket, key.fileobj)
                    connection, rest = writing[sock]
                    left = connection._write_nowait(rest)
                    if left is None or len(left) == 0:
                        selector.unregister(sock)
                        del writing[sock]
                        if left is not None:
                            connection.metrics.messages_out += 1
                            sent += 1
                        connection._send_lock.release()
                    else:
                        writing[sock] = (connection, left)
        finally:
            selector.close()
            for connection, _ in writing.values():
                self.logger.warning(
                    "connection %s: too slow to take a broadcast within %.3gs; dropping it",
                    connection.id, limit,
                )
                connection._write_failed("broadcast write timed out")
                connection._send_lock.release()
            for connection in waiting:
                self.logger.warning(
                    "connection %s: busy writing for %.3gs, broadcast not delivered; dropping it",
                    connection.id, limit,
                )
                connection._abort()
        return sent

    def stats(self) -> Dict[str, Any]:
        """The server's numbers: connections, messages, errors, handler latency."""
        with self._connections_lock:
            live = [c.metrics for c in self._connections.values()]
            active = len(live)
            totals = self._totals.snapshot(live)
        return {
            "active": active,
            "max": self.max_connections,
            "accepted": totals.accepted,
            "rejected": totals.rejected,
            "messages_in": totals.messages_in,
            "messages_out": totals.messages_out,
            "errors": dict(sorted(totals.errors.items())),
            "handler_latency": totals.latency_summary(),
            "closing": self._closing,
        }

    def metrics_text(self) -> str:
        """:meth:`stats` in the Prometheus text format, as ``GET /metrics`` serves it."""
        with self._connections_lock:
            live = [c.metrics for c in self._connections.values()]
            totals = self._totals.snapshot(live)
            stats = {"active": len(live), "max": self.max_connections}
        return render_prometheus(stats, totals)

    # Lifecycle.

    @property
    def url(self) -> str:
        """``ws://host:port/`` (or ``wss://``) of the listening socket."""
        if self.address is None:
            raise RuntimeError("the server is not listening")
        if isinstance(self.address, str):
            return f"ws+unix://{self.address}"
        host, port = self.address[0], self.address[1]
        scheme = "wss" if self._ssl_context is not None else "ws"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}/"

    def _listen(self, addr: str, ssl_context: Optional[ssl.SSLContext], *,
                reuse_port: bool = False) -> None:
        # reuse_port: workers.py's worker processes share one port (SO_REUSEPORT).
        with self._state_lock:
            if self._closing:
                raise RuntimeError("the server is closed; make a new one")
            if self._listener is not None:
                raise RuntimeError("the server is already listening")
            family, address = parse_address(addr)
            if family == socket.AF_UNIX:
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    if os.path.exists(address):
                        os.unlink(address)  # a stale socket file from an earlier run
                    listener.bind(address)
                    listener.listen(_LISTEN_BACKLOG)
                except BaseException:
                    listener.close()
                    raise
                self._unix_path = address
                self.address = address
            else:
                host, port = address
                if host == "":
                    if socket.has_dualstack_ipv6():
                        listener = socket.create_server(
                            ("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                            backlog=_LISTEN_BACKLOG, reuse_port=reuse_port,
                        )
                    else:  # pragma: no cover - depends on the system
                        listener = socket.create_server(("0.0.0.0", port),
                                                        backlog=_LISTEN_BACKLOG,
                                                        reuse_port=reuse_port)
                else:
                    infos = socket.getaddrinfo(host, port, family=0, type=socket.SOCK_STREAM)
                    fam = infos[0][0]
                    listener = socket.create_server(
                        infos[0][4][:2], family=fam, backlog=_LISTEN_BACKLOG,
                        reuse_port=reuse_port,
                    )
                self.address = listener.getsockname()[:2]
            listener.setblocking(False)
            if ssl_context is None and prepare_listener(
                listener, read_timeout=self.options.handshake_timeout,
                write_timeout=self.options.write_timeout,
            ):
                self._accepted_read_timeout = self.options.handshake_timeout
            self._listener = listener
            self._ssl_context = ssl_context
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        self.logger.info("server listening on %s", self.url)
        if self.options.backplane is not None:
            # Never raises for an unreachable peer: local delivery starts regardless.
            self.options.backplane.start(self._id_prefix[:-1], self._deliver_remote)

    def start(self, addr: str = "127.0.0.1:0", *, ssl_context: Optional[ssl.SSLContext] = None
              ) -> "Server":
        """Listen on ``addr`` and serve in a background thread; return once listening.

        ``server.address`` then holds the bound ``(host, port)``. Stop with :meth:`close`
        or use the server as a context manager.
        """
        self._listen(addr, ssl_context)
        thread = threading.Thread(target=self._accept_loop, name="wsroute_sync-accept")
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
        self._listen(addr, ssl_context)
        self._accept_loop()
        self._closed.wait()

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

        Stops accepting, sends Close 1001 (going away) to every open connection, waits
        for the connection threads up to ``timeout`` seconds (dropping connections that
        do not finish their closing handshake within ``close_timeout``), and logs those
        it could not finish. A handler calling it does not wait for its own connection.
        """
        with self._state_lock:
            first = not self._closing
            self._closing = True
        if not first:
            if not self._in_connection_thread():
                self._closed.wait(timeout)
            return
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        self.logger.info("server closing")
        if self._supervisor is not None:
            self._supervisor.stop(timeout)  # worker processes: each closes its clients
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:  # pragma: no cover - the pipe is never full: one byte
                pass
        accept_thread = self._accept_thread
        if accept_thread is not None and accept_thread is not threading.current_thread():
            accept_thread.join()
        if self.options.backplane is not None:
            self.options.backplane.close()  # no more deliveries from other instances
        with self._connections_lock:
            # No connection is registered once _closing is set, so this list is final.
            connections = list(self._connections.values())
        current = threading.current_thread()
        for connection in connections:
            # Do not queue behind a thread stuck writing to a slow client for long.
            connection._start_close(CLOSE_GOING_AWAY, "server shutting down", lock_timeout=0.5)
        close_timeout = self.options.close_timeout
        grace_end = started + (close_timeout if close_timeout is not None else 10.0)
        if deadline is not None:
            grace_end = min(grace_end, deadline)
        # A connection whose thread has not started yet has no thread: it is waited for.
        others = [c for c in connections if c.thread is not current]
        for connection in others:
            connection.wait_finished(max(0.0, grace_end - time.monotonic()))
        for connection in others:
            if not connection.finished:
                connection._abort()  # unblocks its read; a running handler still finishes
        for connection in others:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            connection.wait_finished(remaining)
        stuck = [c for c in others if not c.finished]
        # The pooled threads, idle or finishing a connection, end too.
        self._pool.close(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for connection in stuck:
            self.logger.warning(
                "connection %s did not finish within %ss (a handler still running?)",
                connection.id, timeout,
            )
        self._reaper.stop()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass
        self._closed.set()
        self.logger.info(
            "server closed (%d connection(s) closed, %d unfinished)",
            len(connections) - len(stuck), len(stuck),
        )

    def _in_connection_thread(self) -> bool:
        current = threading.current_thread()
        with self._connections_lock:
            return any(c.thread is current for c in self._connections.values())

    # The accept loop.

    def _accept_loop(self) -> None:
        listener = self._listener
        wake = self._wake_r
        assert listener is not None and wake is not None
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "listener")
        selector.register(wake, selectors.EVENT_READ, "wake")
        lingering: Dict[socket.socket, float] = {}
        paused_until: Optional[float] = None
        try:
            while not self._closing:
                now = time.monotonic()
                timeouts = [d - now for d in lingering.values()]
                if paused_until is not None:
                    timeouts.append(paused_until - now)
                timeout = max(0.0, min(timeouts)) if timeouts else None
                for key, _ in selector.select(timeout):
                    if key.data == "wake":
                        try:
                            wake.recv(64)
                        except OSError:
                            pass
                    elif key.data == "listener":
                        if not self._accept_batch(listener, selector, lingering):
                            # Out of file descriptors: stop watching the listener for
                            # a moment instead of spinning on a socket we cannot accept.
                            selector.unregister(listener)
                            paused_until = time.monotonic() + 0.1
                    else:
                        self._drain_refused(key.fileobj, selector, lingering)  # type: ignore[arg-type]
                now = time.monotonic()
                if paused_until is not None and now >= paused_until:
                    selector.register(listener, selectors.EVENT_READ, "listener")
                    paused_until = None
                for sock, deadline in list(lingering.items()):
                    if now >= deadline:
                        selector.unregister(sock)
                        del lingering[sock]
                        sock.close()
        finally:
            for sock in lingering:
                sock.close()
            selector.close()
            listener.close()
            self._accept_done.set()

    def _accept_batch(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        lingering: Dict[socket.socket, float],
    ) -> bool:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, remote = listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                self.logger.error("accept failed: %s; pausing accepts for 0.1s", exc)
                return False
            self._admit(sock, remote, selector, lingering)
        return True

    def _admit(
        self,
        sock: socket.socket,
        remote: Any,
        selector: selectors.BaseSelector,
        lingering: Dict[socket.socket, float],
    ) -> None:
        if not self._slots.acquire(blocking=False):
            self._totals.rejected += 1
            self.logger.warning(
                "too many connections (max %d): refusing %s with 503", self.max_connections,
                remote,
            )
            self._refuse_over_limit(sock, selector, lingering)
            return
        self._totals.accepted += 1
        if self._ssl_context is not None:
            sock = self._ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        connection = ServerConnection(
            self, sock, remote, f"{self._id_prefix}{next(self._ids)}"
        )
        with self._connections_lock:
            if self._closing:
                registered = False
            else:
                # Registered before it starts, so close() never misses a connection.
                self._connections[connection.id] = connection
                registered = True
        if not registered:
            self._slots.release()
            sock.close()
            return
        try:
            self._pool.submit(connection.run, f"wsroute_sync-conn-{connection.id}")
        except RuntimeError as exc:  # "can't start new thread": out of memory or limits
            self.logger.error("cannot start a connection thread: %s", exc)
            with self._connections_lock:
                self._connections.pop(connection.id, None)
            self._slots.release()
            sock.close()

    def _refuse_over_limit(
        self,
        sock: socket.socket,
        selector: selectors.BaseSelector,
        lingering: Dict[socket.socket, float],
    ) -> None:
        # Answered from the accept loop itself: no thread is started for a client we
        # refuse, and a flood of connects cannot make the server exceed its limit.
        response = http_response(
            503, "Too many connections\n", headers=[("Retry-After", "1")]
        )
        try:
            sock.setblocking(False)
            sock.send(response)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(lingering) >= _MAX_LINGERING:
            sock.close()
            return
        selector.register(sock, selectors.EVENT_READ, "refused")
        lingering[sock] = time.monotonic() + _LINGER_SECONDS

    @staticmethod
    def _drain_refused(
        sock: socket.socket,
        selector: selectors.BaseSelector,
        lingering: Dict[socket.socket, float],
    ) -> None:
        try:
            if sock.recv(65536):
                return  # the request, still arriving: keep waiting for the hang-up
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        selector.unregister(sock)
        del lingering[sock]
        sock.close()

    # Called by connections.

    def _connection_done(self, connection: ServerConnection) -> None:
        with self._connections_lock:
            self._connections.pop(connection.id, None)
            self._totals.add(connection.metrics)
        self._slots.release()
        self.logger.debug(
            "connection %s: closed (%s %s)", connection.id, connection.close_code,
            connection.close_reason,
        )

    def _schedule_abort(self, connection: ServerConnection) -> None:
        if self.options.close_timeout is not None:
            self._reaper.schedule(connection, self.options.close_timeout)

    def _authenticate(self, request: HTTPRequest) -> Any:
        assert self.options.authenticate is not None
        try:
            identity = self.options.authenticate(request)
        except HandshakeRejected:
            raise
        except Exception as exc:
            self.logger.error("authenticate hook failed", exc_info=True)
            raise HandshakeRejected(500, "authentication failed") from exc
        if not identity:
            raise HandshakeRejected(403, "forbidden")
        return identity

    def _plain_http(self, request: HTTPRequest) -> bytes:
        """The answer to a request that does not ask for a WebSocket upgrade."""
        options = self.options
        head_only = request.method == "HEAD"
        if request.method in ("GET", "HEAD"):
            if options.health_path is not None and request.path == options.health_path:
                body = json.dumps(
                    {
                        "status": "closing" if self._closing else "ok",
                        "active_connections": self.active_connections,
                        "max_connections": self.max_connections,
                    }
                )
                return http_response(
                    503 if self._closing else 200, body,
                    content_type="application/json", head_only=head_only,
                )
            if options.metrics_path is not None and request.path == options.metrics_path:
                return http_response(
                    200, self.metrics_text(), head_only=head_only,
                    content_type="text/plain; version=0.0.4; charset=utf-8",
                )
            with self._handlers_lock:
                page = self._http_handlers.get(request.path)
            if page is not None:
                try:
                    status, content_type, page_body = page(request)
                except Exception:
                    self.logger.error("HTTP handler for %s failed", request.path, exc_info=True)
                    return http_response(500, "internal error\n", head_only=head_only)
                return http_response(status, page_body, content_type=content_type,
                                     head_only=head_only)
        return http_response(
            426,
            "This is a WebSocket endpoint: connect with a WebSocket client.\n",
            headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"),
                     ("Sec-WebSocket-Version", "13")],
            head_only=head_only,
        )
