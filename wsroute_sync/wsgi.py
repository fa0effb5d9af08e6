"""A WSGI application that serves a Server's WebSocket routes inside a threaded WSGI server.

``server.wsgi_app(app, path="/ws")`` returns a :class:`WSGIApp`. A WebSocket upgrade
request (on ``path``, or any when ``path`` is ``None``) is handed, with the client's
socket, to :meth:`Server.serve_socket <wsroute_sync.Server.serve_socket>`: the same
handshake checks, limits, routing and shutdown as ``server.serve()``, run in the WSGI
server's own thread for that request until the client leaves. Every other request goes
to ``app`` untouched (``app=None``: 404).

Supported: gunicorn's threaded worker (``-k gthread`` or ``--threads N``) and werkzeug's
threaded server (``flask run --with-threads``, ``make_server(..., threaded=True)``).
Both put the client socket in the environ (``gunicorn.socket``, ``werkzeug.socket``)
and give each request its own thread. Elsewhere (waitress, gunicorn's sync, gevent or
eventlet workers, werkzeug without threads) an upgrade raises ``RuntimeError`` naming
these two: there is either no socket to take or no thread to spare for a long-lived
connection.

After the connection, the WSGI server is told the socket is gone the way each expects:
gunicorn closes a connection on ``StopIteration`` from the application (what its
workers catch as "closing connection"); werkzeug gets an ordinary response, whose write
fails on the socket we shut down, which it takes for a client that left.
"""

from __future__ import annotations

import io
import logging
import signal
import socket
import threading
import weakref
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Protocol
from typing import Sequence, Tuple, Union
from urllib.parse import quote

from .http import Headers, HTTPRequest

__all__ = ["WSGIApp", "SocketServer", "close_on_sigterm", "request_from_environ"]

#: A WSGI environ, ``start_response`` and application (PEP 3333).
Environ = Dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApplication = Callable[[Environ, StartResponse], Iterable[bytes]]



class SocketServer(Protocol):
    """What the WSGI application needs of a :class:`~wsroute_sync.Server` (which has it)."""

    def serve_socket(self, sock: socket.socket, remote_address: Any, request: HTTPRequest, *,
                     rest: bytes = b"") -> None: ...

    def close(self, timeout: Optional[float] = 10.0) -> None: ...


_logger = logging.getLogger("wsroute_sync.wsgi")

_SUPPORTED = (
    "wsroute_sync serves WebSocket upgrades inside gunicorn's threaded worker "
    "(gunicorn -k gthread --threads N) and werkzeug's threaded server "
    "(flask run --with-threads, werkzeug.serving.make_server(..., threaded=True)); "
    "elsewhere run server.serve() on a port of its own"
)
_NOT_FOUND = b"Not Found\n"
# Bytes a client may have sent behind its request head, taken from the WSGI server's
# read buffer: RFC 6455 4.1 has the client wait for the 101, so this is at most a
# misbehaving client's first frames.
_READ_AHEAD_LIMIT = 65536

# Servers whose close() is already chained to this process's SIGTERM handler.
_closing_on_sigterm: "weakref.WeakSet[SocketServer]" = weakref.WeakSet()
_sigterm_lock = threading.Lock()


class WSGIApp:
    """A WSGI application: WebSocket upgrades to ``server``, the rest to ``app``.

    Made by :meth:`Server.wsgi_app <wsroute_sync.Server.wsgi_app>`; in Flask,
    ``flask_app.wsgi_app = server.wsgi_app(flask_app.wsgi_app)``.

    Args:
        server: the :class:`~wsroute_sync.Server` whose routes and limits apply.
        app: the WSGI application for every other request; ``None`` answers them 404.
        path: the ``PATH_INFO`` (the path inside this application, as the wrapped app
            sees it) or paths whose upgrade requests are ours; ``None``: every upgrade
            request, as in the standalone server. Upgrades elsewhere go to ``app``.

    Made in the main thread of a gunicorn worker (the default: gunicorn imports the
    application there), it also chains ``server.close()`` to the worker's SIGTERM
    handler, so that stopping gunicorn sends Close 1001 to the WebSocket clients
    instead of waiting out ``--graceful-timeout`` (see :func:`close_on_sigterm`).
    """

    def __init__(
        self,
        server: SocketServer,
        app: Optional[WSGIApplication] = None,
        *,
        path: Union[str, Sequence[str], None] = None,
    ) -> None:
        if app is not None and not callable(app):
            raise TypeError(f"app must be a WSGI application or None, not {type(app).__name__}")
        self.server = server
        self.app = app
        self.paths = _check_paths(path)
        worker = _gunicorn_worker()
        if worker is not None:
            close_on_sigterm(server)
            if not any(cls.__module__ == "gunicorn.workers.gthread"
                       for cls in type(worker).__mro__):
                # Said at start-up, not only on the first upgrade (which raises).
                _logger.warning("gunicorn's %s cannot hold WebSocket connections: "
                                "upgrades will fail; %s", type(worker).__name__, _SUPPORTED)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if not self._is_ours(environ):
            if self.app is not None:
                return self.app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                             ("Content-Length", str(len(_NOT_FOUND)))])
            return [_NOT_FOUND]
        sock, server_name = _client_socket(environ)
        request = request_from_environ(environ)
        rest = _read_ahead(environ, sock)
        self.server.serve_socket(sock, request.remote_address, request, rest=rest)
        # serve_socket has ended the connection and closed the socket. Under werkzeug the
        # descriptor stays open (its makefile() reader still holds it: socket.close()
        # waits for the last file object) until werkzeug closes it: shut it down, so
        # that nothing werkzeug writes next can reach the client after our last frame.
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # a socket closed for good (gunicorn), or one the client reset
        if server_name == "gunicorn":
            # gunicorn's workers catch StopIteration from the application as "closing
            # connection": no response is written and the socket is closed (Flask-Sock
            # and simple-websocket end their connections the same way).
            raise StopIteration("wsroute_sync: WebSocket connection ended")
        # werkzeug: an ordinary response; writing it fails with EPIPE on the shut-down
        # socket, which werkzeug handles as a client that left (no traceback), and its
        # "Connection: close" ends the keep-alive loop. Raising ConnectionError instead
        # would also work, but debugging middleware around the app would report it.
        start_response("101 Switching Protocols", [])
        return []

    def _is_ours(self, environ: Environ) -> bool:
        upgrade = environ.get("HTTP_UPGRADE")
        if not upgrade or not any(token.strip().lower() == "websocket"
                                  for token in upgrade.split(",")):
            return False
        # HTTP/2 multiplexes requests on one socket: it is never ours to take (and a
        # WebSocket over HTTP/2 is an extended CONNECT, RFC 8441, not an Upgrade).
        if environ.get("SERVER_PROTOCOL") not in ("HTTP/1.1", "HTTP/1.0"):
            return False
        return self.paths is None or environ.get("PATH_INFO", "") in self.paths

    def __repr__(self) -> str:
        return f"<WSGIApp paths={sorted(self.paths) if self.paths else None} app={self.app!r}>"


def _check_paths(path: Union[str, Sequence[str], None]) -> Optional[FrozenSet[str]]:
    if path is None:
        return None
    paths = [path] if isinstance(path, str) else list(path)
    for item in paths:
        if not isinstance(item, str):
            raise TypeError(f"path must be a str, a sequence of str or None, "
                            f"not {type(item).__name__}")
        if not item.startswith("/"):
            raise ValueError(f"a path starts with '/', got {item!r}")
    if not paths:
        raise ValueError("path must name at least one path (or be None for every path)")
    return frozenset(paths)


def _client_socket(environ: Environ) -> Tuple[socket.socket, str]:
    """The client's socket, and which server gave it; ``RuntimeError`` where none can."""
    software = environ.get("SERVER_SOFTWARE") or "this WSGI server"
    for key, name in (("gunicorn.socket", "gunicorn"), ("werkzeug.socket", "werkzeug")):
        sock = environ.get(key)
        if sock is not None:
            break
    else:
        raise RuntimeError(f"{software} gives the application no client socket "
                           f"(no gunicorn.socket or werkzeug.socket in the environ): {_SUPPORTED}")
    if not isinstance(sock, socket.socket):
        raise RuntimeError(f"{software}: {key} is {type(sock).__name__}, not a socket: "
                           f"{_SUPPORTED}")
    if not environ.get("wsgi.multithread"):
        # A WebSocket holds its thread for as long as the client stays: without a
        # thread per request it would stop the whole server (or process) meanwhile.
        raise RuntimeError(f"{software} is not serving requests in threads "
                           f"(wsgi.multithread is false): {_SUPPORTED}")
    return sock, name


def request_from_environ(environ: Environ) -> HTTPRequest:
    """The :class:`~wsroute_sync.HTTPRequest` a WSGI environ describes.

    The target is the raw request URI where the server gives one (``RAW_URI``,
    ``REQUEST_URI``), else rebuilt from ``SCRIPT_NAME``, ``PATH_INFO`` and
    ``QUERY_STRING``. Headers come from the ``HTTP_*`` keys plus ``CONTENT_TYPE`` and
    ``CONTENT_LENGTH``, in the environ's order, which both gunicorn and werkzeug fill
    in the order the client sent them; a header sent twice arrives joined with commas
    (PEP 3333), and names lose the difference between ``-`` and ``_``.
    """
    version = str(environ.get("SERVER_PROTOCOL", "HTTP/1.1"))
    items: List[Tuple[str, str]] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            items.append((key[5:].replace("_", "-"), str(value)))
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            items.append((key.replace("_", "-"), str(value)))
    return HTTPRequest(
        method=str(environ.get("REQUEST_METHOD", "GET")),
        target=_target(environ),
        headers=Headers(items),
        http_version=version[5:] if version.startswith("HTTP/") else version,
        remote_address=_remote_address(environ),
    )


def _target(environ: Environ) -> str:
    for key in ("RAW_URI", "REQUEST_URI"):
        raw = environ.get(key)
        if isinstance(raw, str) and raw.startswith("/"):
            return raw
    # PEP 3333 "native strings": the path's bytes, percent-decoded, as Latin-1.
    path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
    target = quote(path.encode("latin-1"), safe="/;=,:@!$&'()*+~") or "/"
    query = environ.get("QUERY_STRING")
    return f"{target}?{query}" if query else target


def _remote_address(environ: Environ) -> Optional[Tuple[str, int]]:
    host, port = environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT")
    if not host:
        return None
    try:
        return (str(host), int(port)) if port not in (None, "") else (str(host), 0)
    except (TypeError, ValueError):
        return (str(host), 0)


def _read_ahead(environ: Environ, sock: socket.socket) -> bytes:
    """Bytes the WSGI server read from the client past the request head.

    Both servers read the head through a buffer: werkzeug through ``wsgi.input``, a
    ``BufferedReader`` over the socket; gunicorn through the parser's unreader, which
    ``wsgi.input`` (its request body, empty for a GET) holds. What a client sent early
    sits there and would be lost if we read only the socket.
    """
    stream = environ.get("wsgi.input")
    if isinstance(stream, io.BufferedReader):
        timeout = sock.gettimeout()
        try:
            # Non-blocking: the buffered bytes, or what the kernel holds now, never a wait.
            sock.setblocking(False)
            return stream.read1(_READ_AHEAD_LIMIT) or b""
        except (OSError, ValueError):
            return b""
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass
    unreader = getattr(getattr(stream, "reader", None), "unreader", None)
    buffered = getattr(unreader, "buf", None)
    if isinstance(buffered, io.BytesIO):
        # gunicorn's Unreader keeps read-ahead in a BytesIO; the connection is closed
        # after us, so nobody reads it again and a copy is enough.
        return buffered.getvalue()
    return b""


def close_on_sigterm(server: SocketServer) -> None:
    """Close ``server`` (Close 1001 to its clients) when this process gets SIGTERM.

    Chains to the SIGTERM handler in place, which must be a Python callable (a gunicorn
    worker's, which stops the worker gracefully): that handler still runs, and
    ``server.close()`` starts in a thread of its own. Call it from the main thread.
    :class:`WSGIApp` does this by itself when it is made in a gunicorn worker's main
    thread; with ``gunicorn --preload`` the application is made in the master instead,
    so call this from a ``post_worker_init(worker)`` hook in the gunicorn config.
    Calling it again for the same server does nothing.
    """
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        raise ValueError("SIGTERM has no Python handler to chain to here; "
                         "call server.close() from your own shutdown code")
    with _sigterm_lock:
        if server in _closing_on_sigterm:
            return
        chained: Callable[[int, Any], Any] = previous

        def handler(signum: int, frame: Any) -> None:
            # A thread: close() waits for the clients' Close answers, and a signal
            # handler must not block the thread it interrupted (gunicorn's main loop).
            threading.Thread(target=server.close, name="wsroute_sync-sigterm-close").start()
            chained(signum, frame)

        signal.signal(signal.SIGTERM, handler)  # ValueError outside the main thread
        _closing_on_sigterm.add(server)
    _logger.debug("server %r closes on SIGTERM (chained to %r)", server, previous)


def _gunicorn_worker() -> Any:
    """The gunicorn worker whose main thread this is, or ``None``.

    gunicorn installs its workers' signal handlers before it loads the application, and
    SIGTERM's is a bound method of the worker; there is no other way to know the worker
    from the application, and no hook runs when SIGTERM arrives.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if any(cls.__module__ == "gunicorn.workers.base" for cls in type(owner).__mro__):
        return owner
    return None
