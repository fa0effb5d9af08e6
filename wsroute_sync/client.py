"""A synchronous client for wsroute_sync servers, on simple-websocket.

    from wsroute_sync import Client

    with Client.connect("ws://127.0.0.1:8080/") as client:
        client.call("echo", {"message": "hi"})        # b'{"message":"hi"}'
        client.call_json("add", {"numbers": [1, 2]})  # {'sum': 3}

simple-websocket does the WebSocket work after the opening handshake: its reader thread
reads frames, answers pings and queues whole messages. This module adds what a routed
server's client needs on top, and closes gaps that would otherwise make a program hang
or misread a reply:

* one deadline (``timeout``) bounds the TCP connect, the TLS handshake and the HTTP
  upgrade (simple-websocket's connect has no timeout at all);
* a refused upgrade raises :class:`~wsroute_sync.HandshakeRejected` with the HTTP status,
  headers and the body's text (simple-websocket keeps only the status), a server hanging
  up mid-handshake raises :class:`~wsroute_sync.ConnectionClosed`, the socket is closed
  on every failure, and ``ws+unix://`` URLs reach a server on a unix socket;
* frames that arrive in the same read as the ``101`` answer are delivered at once
  (simple-websocket leaves them in wsproto's buffer until more data comes);
* the server's Close is answered (RFC 6455 5.5.1; simple-websocket's client does not),
  a connection lost without one reports code 1006, and ``close()`` never leaves the
  reader thread blocked;
* writes hold a lock and use ``sendall``, so frames from two threads never interleave;
  on ``wss://`` every read and write also takes the TLS socket's own lock
  (:mod:`wsroute_sync.sharedtls`), because OpenSSL does not allow one connection to be
  read and written at the same time, and writes are bounded by ``timeout`` there too;
* the reader thread (ours, not simple-websocket's) never waits for a writer: a send
  waiting for the server to read does not stop the client reading, so both sides
  writing more than the kernel buffers hold cannot wait for each other. Its pongs and
  Close answers go out after the frame being written, without blocking.

Requests and replies are paired by order: the server handles one message of a
connection at a time and answers in order, and the envelope carries no request id.
"""

from __future__ import annotations

import functools
import json
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import simple_websocket  # type: ignore[import-untyped]
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .errors import ClientTimeout, ConnectionClosed, HandshakeRejected, RouteError
from .sharedtls import SharedTLSSocket, wait_for

__all__ = ["Client", "Message", "is_error_envelope"]

#: A WebSocket message: ``str`` for a text frame, ``bytes`` for a binary one.
Message = Union[str, bytes]
HeadersArg = Union[Mapping[str, str], Sequence[Tuple[str, str]], None]

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
# The most the reader queues for a server that does not read (see _thread).
_CONTROL_LIMIT = 64 << 10
# A 64 KiB read takes a whole typical frame at once (simple-websocket reads 4 KiB).
_RECV_SIZE = 65536
# How much of a refusal's body is kept for the exception's text.
_MAX_REJECTION_BODY = 1024
_ABNORMAL_CLOSURE = 1006  # RFC 6455 7.4.1: no Close frame was received
_ENVELOPE_KEYS = frozenset(("code", "msg", "data"))
# Compact, non-ASCII kept, as the server writes; strict: RFC 8259 has no NaN.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _timeval(seconds: float) -> bytes:
    # SO_SNDTIMEO takes a struct timeval; zero would mean "block for ever".
    whole = int(seconds)
    micros = int((seconds - whole) * 1e6)
    return struct.pack("ll", whole, micros if whole or micros else 1)


def is_error_envelope(reply: Message) -> Optional[Tuple[int, str]]:
    """``(code, msg)`` if ``reply`` is an error envelope, else ``None``.

    An error envelope is a JSON object with exactly the keys ``code``, ``msg`` and
    ``data``, where ``code`` is a non-zero integer and ``msg`` a string, as the server
    sends ``{"code":1,"msg":"unknown route: x","data":null}``. Anything else is a reply,
    including ``{"code":0,...}`` and objects with more keys.
    """
    # The common case: skip decoding a reply that cannot be one.
    if isinstance(reply, str):
        if reply[:64].lstrip()[:1] != "{" or '"code"' not in reply:
            return None
    elif reply[:64].lstrip()[:1] != b"{" or b'"code"' not in reply:
        return None
    try:
        value = json.loads(reply)
    except (ValueError, RecursionError):
        return None
    if type(value) is not dict or value.keys() != _ENVELOPE_KEYS:
        return None
    code, msg = value["code"], value["msg"]
    if type(code) is not int or code == 0 or type(msg) is not str:
        return None
    return code, msg


class _Transport(simple_websocket.Client):  # type: ignore[misc]
    """simple-websocket's client with a bounded opening and a complete closing handshake.

    ``__init__`` and ``handshake`` replace the parent's, which cannot bound the connect,
    keep only the status of a refusal and leave the socket open on failure. ``_thread``
    and ``_handle_events`` replace its reader, which wrote pongs and Close answers with
    a blocking send from the reader thread, and so stopped reading whenever the server
    did. simple-websocket's ``receive()`` and message queue are used as they are.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: Optional[float],
        headers: List[Tuple[bytes, bytes]],
        subprotocols: List[str],
        ssl_context: Optional[ssl.SSLContext],
    ) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("ws", "wss", "ws+unix"):
            raise ValueError(f"expected a ws://, wss:// or ws+unix:// URL, got {url!r}")
        # Two locks, so that the reader never waits for a writer: a writer waiting for
        # the server to take its bytes must not stop us taking the server's, or both
        # sides wait for each other when each writes more than the kernel buffers hold.
        # _state: wsproto's state, the Close frames seen and _control; held briefly,
        # never while waiting for the network. _writer: order on the wire; held for a
        # whole write, so that frames from two threads never interleave.
        self._state = threading.Lock()
        self._writer = threading.Lock()
        # The pongs and Close answers the reader made and nobody has written yet: a
        # writer holding _writer writes them before it lets go; else the reader does,
        # without blocking (see _reader_flush).
        self._control = bytearray()
        # The reader holds _writer while the server has not taken all of _control.
        self._reader_writing = False
        # While it does: when the server has taken nothing for ``timeout`` seconds.
        self._stall_deadline: Optional[float] = None
        self._fragments: List[Union[str, bytes, bytearray]] = []
        #: ``(code, reason)`` of the Close frame received / sent, once there is one.
        self.received: Optional[Tuple[int, str]] = None
        self.sent: Optional[Tuple[int, str]] = None
        self._closed_early = False
        self.subprotocols = subprotocols
        self._extra_headers = headers
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        if scheme == "ws+unix":
            # ws+unix:///run/app.sock: the URL's path names the socket file.
            if not parts.path:
                raise ValueError(f"ws+unix URL without a socket path: {url!r}")
            self.host, self.port, self.path = "localhost", 0, "/"
            self._host_header = "localhost"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(parts.path)
            except BaseException:
                sock.close()
                raise
        else:
            if not parts.hostname:
                raise ValueError(f"URL without a host: {url!r}")
            secure = scheme == "wss"
            default_port = 443 if secure else 80
            self.host = parts.hostname
            self.port = parts.port or default_port
            self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            # RFC 9110 7.2: Host carries the port unless it is the scheme's default.
            host_header = f"[{self.host}]" if ":" in self.host else self.host
            if self.port != default_port:
                host_header += f":{self.port}"
            self._host_header = host_header
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            try:
                # Replies are small and awaited one by one: no Nagle delay for requests.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if secure:
                    context = ssl_context or ssl.create_default_context()
                    sock = context.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        try:
            # The reader thread reads while callers write: over TLS, one OpenSSL call at
            # a time (see sharedtls.py).
            stream: Union[socket.socket, SharedTLSSocket] = (
                SharedTLSSocket(sock) if isinstance(sock, ssl.SSLSocket) else sock)
            simple_websocket.ws.Base.__init__(
                self, stream, connection_type=ConnectionType.CLIENT, receive_bytes=_RECV_SIZE,
                # A daemon: a client its program forgot to close must not keep the
                # interpreter alive; close() joins it.
                thread_class=functools.partial(
                    threading.Thread, name="wsroute_sync-client-reader", daemon=True
                ),
            )
        except BaseException:
            sock.close()
            raise
        if self._closed_early:
            # The server closed right after accepting: the messages before its Close
            # are kept for receive(), which then raises ConnectionClosed.
            self.connected = False
            self.event.set()
            self.abort()

    def _recv_before(self, what: str) -> bytes:
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise ClientTimeout(f"timed out waiting for {what}")
            self.sock.settimeout(remaining)
        try:
            data: bytes = self.sock.recv(_RECV_SIZE)
        except socket.timeout:
            raise ClientTimeout(f"timed out waiting for {what}") from None
        except ConnectionError as exc:  # reset: the server dropped us unread
            raise ConnectionClosed(
                _ABNORMAL_CLOSURE, f"connection lost during the handshake: {exc}"
            ) from None
        return data

    def handshake(self) -> None:
        """Send the upgrade request and read the answer (called by ``Base.__init__``)."""
        request = Request(
            host=self._host_header, target=self.path, subprotocols=self.subprotocols,
            extra_headers=self._extra_headers,
        )
        try:
            self.sock.sendall(self.ws.send(request))
        except ConnectionError as exc:
            raise ConnectionClosed(
                _ABNORMAL_CLOSURE, f"connection lost during the handshake: {exc}"
            ) from None
        rejection: Optional[RejectConnection] = None
        body = bytearray()
        accepted = False
        while not accepted:
            data = self._recv_before("the handshake response")
            if not data:
                if rejection is not None:
                    self._reject(rejection, bytes(body))  # the body ended with the stream
                raise ConnectionClosed(
                    _ABNORMAL_CLOSURE, "the server closed the connection during the handshake"
                )
            try:
                self.ws.receive_data(data)
                # Stop at the accept: the events after it are frames, handled below.
                for event in self.ws.events():
                    if isinstance(event, AcceptConnection):
                        self.subprotocol = event.subprotocol
                        accepted = True
                        break
                    if isinstance(event, RejectConnection):
                        rejection = event
                    elif isinstance(event, RejectData):
                        body += event.data[: _MAX_REJECTION_BODY - len(body)]
                        if event.body_finished and rejection is not None:
                            self._reject(rejection, bytes(body))
            except RemoteProtocolError as exc:
                # Not HTTP, or a 101 that is not a valid WebSocket accept.
                raise ConnectionClosed(
                    CloseReason.PROTOCOL_ERROR, f"invalid handshake response: {exc}"
                ) from None
        # From now on the reader thread blocks in recv; a timeout would read as a loss.
        self.sock.settimeout(None)
        # Writes alone get a deadline (a socket timeout would bound reads too): a server
        # that stops reading must not pin a sender for ever. The kernel's on a plain
        # socket; on TLS, the poll() of the shared socket.
        if isinstance(self.sock, SharedTLSSocket):
            self.sock.write_timeout = self._timeout
        elif self._timeout is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                 _timeval(self._timeout))
        self.connected = True
        # Frames that came in the same read as the 101 wait in wsproto's buffer: hand
        # them over now, or they would sit there until the next read (simple-websocket
        # only looks at the first event of its handshake read).
        self._closed_early = not self._handle_events()
        try:
            self._reader_flush()
        except OSError:
            pass  # the reader thread finds the connection lost
        # Base.__init__ refuses a connection that is not connected at this point: a
        # Close among those frames is acted on once the reader thread exists (__init__).
        self.connected = True

    def _thread(self) -> None:
        """The reader: reads until the connection ends, and never waits for a writer."""
        try:
            while self.connected:
                if self._reader_writing:
                    # Our pong or Close waits for the server to take bytes: wait for
                    # that or for input, whichever comes first, but not past the
                    # deadline a writer would have.
                    left = None
                    if self._stall_deadline is not None:
                        left = self._stall_deadline - time.monotonic()
                        if left <= 0:
                            self._fail((_ABNORMAL_CLOSURE, "send timed out"))
                            break
                    # Past _CONTROL_LIMIT, read nothing more until the server takes
                    # some: a server that pings and never reads must not fill memory.
                    events = _POLLOUT if len(self._control) > _CONTROL_LIMIT else (
                        _POLLIN | _POLLOUT)
                    ready = wait_for(self.sock, events, left)
                    if ready & _POLLOUT:
                        self._reader_flush()
                    if not ready & ~_POLLOUT:
                        continue
                data = self.sock.recv(self.receive_bytes)
                if not data:
                    break
                with self._state:
                    self.ws.receive_data(data)
                keep_going = self._handle_events()
                self._reader_flush()
                if not keep_going:
                    self._write_close_answer()
                    break
        except (OSError, LocalProtocolError):
            pass  # the connection is lost: reported as 1006 unless a Close came
        finally:
            # However the reader ends (even by a bug), nobody may wait for it forever.
            self.connected = False
            self.event.set()
            if self._reader_writing:
                self._reader_writing = False
                self._writer.release()
            self.sock.close()

    def _handle_events(self) -> bool:
        """Act on what wsproto parsed: whole messages go to ``receive()``, pings and the
        server's Close are answered (RFC 6455 5.5.1), queued in ``_control``. Returns
        ``False`` once the connection is closing."""
        with self._state:
            try:
                for event in self.ws.events():
                    if isinstance(event, (TextMessage, BytesMessage)):
                        self._add_fragment(event.data, event.message_finished)
                    elif isinstance(event, Ping):
                        self._control += self.ws.send(event.response())
                    elif isinstance(event, Pong):
                        self.pong_received = True
                    elif isinstance(event, CloseConnection):
                        self._closing(event)
                        return False
            except LocalProtocolError:
                self.connected = False
                self.event.set()
                return False
        return True

    def _add_fragment(self, data: Union[str, bytes, bytearray], finished: bool) -> None:
        # wsproto hands text over as str, split only between whole characters.
        if not finished:
            self._fragments.append(data)
            return
        if self._fragments:
            self._fragments.append(data)
            if isinstance(data, str):
                data = "".join(self._fragments)  # type: ignore[arg-type]
            else:
                data = b"".join(self._fragments)  # type: ignore[arg-type]
            self._fragments = []
        self.input_buffer.append(bytes(data) if isinstance(data, bytearray) else data)
        self.event.set()

    def _closing(self, event: CloseConnection) -> None:
        """A Close came, or wsproto found a protocol error (the caller holds _state)."""
        self.close_reason = event.code
        self.close_message = event.reason
        state = self.ws.state
        if state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED):
            self.received = (int(event.code), event.reason or "")
        if state is ConnectionState.REMOTE_CLOSING:
            # The server's Close: answer it, echoing its code (an empty Close, "1005 no
            # status", is answered with an empty one).
            self._control += self.ws.send(CloseConnection(code=event.code, reason=""))
        elif state is ConnectionState.OPEN:
            # wsproto found a protocol error (1002, 1007): fail the connection.
            code, reason = int(event.code), event.reason or ""
            self._control += self.ws.send(CloseConnection(code=code, reason=reason))
            self.sent = (code, reason)
        self.connected = False
        self.event.set()

    def _reader_flush(self) -> None:
        """Write ``_control`` without blocking, if no writer holds the wire (a writer
        writes it before it lets go); what the server cannot take yet stays queued,
        and the reader keeps the wire until it has taken it."""
        with self._state:
            if not self._control:
                return
            if not self._reader_writing:
                # Tried under _state, where a writer checks _control a last time before
                # it lets go: either it sees these bytes, or this finds the wire free.
                if not self._writer.acquire(blocking=False):
                    return
                self._reader_writing = True
                self._stall_deadline = None
        # Only the reader adds to _control, and it holds the wire: nobody else
        # touches the buffer until it lets go.
        while self._control:
            try:
                sent = self._send_nowait(self._control)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                if self._stall_deadline is None and self._timeout is not None:
                    self._stall_deadline = time.monotonic() + self._timeout
                return
            del self._control[:sent]
            self._stall_deadline = None  # progress: the server is reading
        with self._state:
            self._reader_writing = False
            self._writer.release()

    def _send_nowait(self, data: bytearray) -> int:
        if isinstance(self.sock, SharedTLSSocket):
            return self.sock.send_nowait(data)
        sent: int = self.sock.send(data, socket.MSG_DONTWAIT)
        return sent

    def _write_close_answer(self) -> None:
        """Make sure the Close answer is written before the reader hangs up."""
        if not self._reader_writing:
            if not self._writer.acquire(timeout=-1 if self._timeout is None else self._timeout):
                return  # a writer stuck for that long: the server is not reading
            self._reader_writing = True
        with self._state:
            out = self._take_control()
        if out:
            self.sock.sendall(out)

    def _take_control(self) -> bytes:
        """The queued pongs and Close answers, now the caller's to write (under _state)."""
        out = bytes(self._control)
        self._control.clear()
        return out

    def _frame_behind_control(self, event: Union[TextMessage, BytesMessage, CloseConnection]
                              ) -> Optional[bytes]:
        """The frame for ``event`` behind the queued control frames (they were made
        first, so they go first); ``None`` once the connection is closing. The caller
        holds _writer, so the bytes go out in this order."""
        with self._state:
            if not self.connected or self.ws.state is not ConnectionState.OPEN:
                return None
            frame: bytes = self.ws.send(event)
            return self._take_control() + frame

    def _release_writer(self, flush: bool = True) -> None:
        """Let go of the wire, first writing the control frames the reader queued while
        it was held (``flush=False`` when the stream is broken)."""
        while True:
            with self._state:
                if not flush or not self._control:
                    self._writer.release()
                    return
                out = self._take_control()
            try:
                self.sock.sendall(out)
            except OSError:
                flush = False
                self.abort()

    @staticmethod
    def _reject(event: RejectConnection, body: bytes) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
        reason = body.decode("utf-8", "replace").strip()
        raise HandshakeRejected(event.status_code, reason, headers=headers)

    def send_message(self, data: Message) -> None:
        """Send a data frame; raises the library's ConnectionClosed once closed."""
        event = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        # Whoever holds the wire gives it up once the server takes nothing for
        # ``timeout`` seconds: a writer by its write deadline, the reader by its own.
        self._writer.acquire()
        flush = False
        try:
            out = self._frame_behind_control(event)
            if out is None:
                raise self.closed_error()
            self.sock.sendall(out)
            flush = True
        except (BlockingIOError, socket.timeout):
            # The write deadline ran out mid-frame: the stream is broken, drop it (and
            # write nothing more, not even a Close).
            self._fail((_ABNORMAL_CLOSURE, "send timed out"))
            raise ClientTimeout(
                f"the server took nothing for {self._timeout}s; the client is closed"
            ) from None
        except OSError as exc:
            # The peer is gone (reset, broken pipe).
            self._fail(None)
            raise ConnectionClosed(_ABNORMAL_CLOSURE, f"send failed: {exc}") from None
        finally:
            self._release_writer(flush)

    def _fail(self, sent: Optional[Tuple[int, str]]) -> None:
        if sent is not None:
            with self._state:
                self.sent = sent
        self.connected = False
        self.event.set()
        self.abort()

    def closed_error(self) -> ConnectionClosed:
        """The exception for a connection that is closing or closed.

        The code is the one of the Close frame received; else the one we sent; else 1006
        (RFC 6455 7.1.5: the connection was lost without a Close frame).
        """
        with self._state:  # the reader may be recording the Close right now
            frame = self.received or self.sent
        if frame is not None:
            return ConnectionClosed(*frame)
        return ConnectionClosed(_ABNORMAL_CLOSURE, "connection lost without a Close frame")

    def start_close(self, code: int, reason: str, lock_timeout: Optional[float]) -> None:
        """Send our Close; the reader thread ends when the server answers and hangs up."""
        if not self._writer.acquire(timeout=-1 if lock_timeout is None else lock_timeout):
            # Another thread is stuck writing: the server is not reading, drop it.
            self.abort()
            return
        flush = False
        try:
            out = self._frame_behind_control(CloseConnection(code=code, reason=reason))
            if out is not None:
                try:
                    self.sock.sendall(out)
                except OSError:
                    pass
                else:
                    flush = True
                    with self._state:
                        self.sent = (code, reason)
                    return
            if self.ws.state is not ConnectionState.LOCAL_CLOSING:
                self.abort()  # nothing to wait for: make sure the reader thread ends
        finally:
            self._release_writer(flush)

    def abort(self) -> None:
        """Drop the TCP connection; wakes the reader thread out of its ``recv``."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Client:
    """A connection to a wsroute_sync server: calls, pushes, and a clean close.

    Make one with :meth:`connect`. ``call`` sends ``{"Route":..,"Params":..}`` and returns
    the next message the server sends, so requests and replies pair up by order (the
    server handles one message per connection at a time). **Pushed messages are not
    told apart from replies**: the envelope has no request id, so a message a handler
    pushes with ``ctx.send`` (or a ``server.broadcast``) that arrives while a ``call``
    waits is taken as that call's reply. Consume pushes with :meth:`receive`, and do not
    mix ``call`` with routes that push on the same client.

    ``call`` is serialised by a lock, so threads may share a client for calls; ``send``
    is thread-safe; ``receive`` and ``call`` compete for the same incoming messages.

    Errors: :class:`~wsroute_sync.ClientTimeout` when a timeout runs out,
    :class:`~wsroute_sync.ConnectionClosed` (``code``, ``reason``) once the connection is
    closed by either side (1006 when it was lost without a Close frame, e.g. the
    server process died), :class:`~wsroute_sync.RouteError` (``code``, ``msg``) when a
    call is answered with an error envelope, and
    :class:`~wsroute_sync.HandshakeRejected` (``status``, ``reason``, ``headers``) when
    the server refuses the upgrade. ``OSError`` from the connect itself (refused,
    unknown host) is raised as it is.
    """

    def __init__(self, transport: _Transport, url: str, timeout: Optional[float]) -> None:
        """Use :meth:`connect`."""
        self._transport = transport
        self._call_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closing = False
        #: The URL the client connected to.
        self.url = url
        #: The default for :meth:`call` and for :meth:`close`'s wait, in seconds.
        self.timeout = timeout

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        timeout: Optional[float] = 10.0,
        headers: HeadersArg = None,
        subprotocols: Optional[Sequence[str]] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> "Client":
        """Open a connection to ``url`` (``ws://``, ``wss://`` or ``ws+unix:///path``).

        Args:
            timeout: seconds for the whole opening (TCP connect, TLS, HTTP upgrade);
                also the default for :meth:`call` and how long :meth:`close` waits for
                the server's answer. ``None`` waits as long as it takes.
            headers: extra request headers, a mapping or ``(name, value)`` pairs (e.g.
                ``{"Authorization": "Bearer ..."}``).
            subprotocols: subprotocols to offer, in order of preference; the one the
                server picked is :attr:`subprotocol`.
            ssl_context: for ``wss://``; default: ``ssl.create_default_context()``.

        Raises:
            ClientTimeout: the opening did not finish within ``timeout``.
            HandshakeRejected: the server answered with an HTTP status other than 101.
            ConnectionClosed: the server hung up during the handshake, or sent
                something that is not a valid WebSocket handshake response (1002).
            OSError: the TCP connect failed (refused, unreachable, unknown host), or
                TLS did (``ssl.SSLError``, e.g. a certificate that does not verify).
            ValueError: ``url`` is not a WebSocket URL.
        """
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 or None, got {timeout!r}")
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
        try:
            # RFC 9110 5.5: field values are octets; Latin-1 maps str to them one to one.
            header_list = [(name.encode("latin-1"), value.encode("latin-1"))
                           for name, value in pairs]
        except UnicodeEncodeError as exc:
            raise ValueError(f"header names and values must be Latin-1: {exc}") from None
        if isinstance(subprotocols, str):
            subprotocols = [subprotocols]
        try:
            transport = _Transport(
                url, timeout=timeout, headers=header_list,
                subprotocols=list(subprotocols or ()), ssl_context=ssl_context,
            )
        except ClientTimeout:
            raise
        except socket.timeout:
            raise ClientTimeout(f"timed out connecting to {url}") from None
        return cls(transport, url, timeout)

    # Properties.

    @property
    def closed(self) -> bool:
        """True once the connection is closing or closed, by either side."""
        transport = self._transport
        return self._closing or not transport.connected

    @property
    def subprotocol(self) -> Optional[str]:
        """The subprotocol the server chose, or ``None``."""
        subprotocol: Optional[str] = self._transport.subprotocol
        return subprotocol

    @property
    def close_code(self) -> Optional[int]:
        """The close code once the connection has closed (1006: lost without a Close)."""
        if not self.closed:
            return None
        return self._transport.closed_error().code

    # Messages.

    def send(self, message: Any) -> None:
        """Send a message: ``str`` as text, bytes-like as binary, anything else as JSON.

        Raises :class:`~wsroute_sync.ConnectionClosed` once the connection is closed, and
        :class:`~wsroute_sync.ClientTimeout` (closing the client) if the server takes
        none of it for :attr:`timeout` seconds (``ws://`` and ``ws+unix://`` only).
        """
        if isinstance(message, str):
            data: Message = message
        elif isinstance(message, (bytes, bytearray, memoryview)):
            data = bytes(message)
        else:
            data = _dumps(message)
        if self._closing:
            raise self._transport.closed_error()
        self._transport.send_message(data)

    def receive(self, timeout: Optional[float] = None) -> Message:
        """The next message (``str`` for text, ``bytes`` for binary), in arrival order.

        Waits up to ``timeout`` seconds (``None``: until a message comes or the
        connection closes). Messages that arrived before the connection closed are
        still returned; after them, :class:`~wsroute_sync.ConnectionClosed` is raised.

        Raises:
            ClientTimeout: nothing arrived within ``timeout``; the client stays usable.
            ConnectionClosed: the connection is closed and no message is left.
        """
        transport = self._transport
        try:
            message: Optional[Message] = transport.receive(timeout=timeout)
        except simple_websocket.ConnectionClosed:
            raise transport.closed_error() from None
        if message is None:
            raise ClientTimeout(f"no message within {timeout}s")
        return message

    def request(
        self,
        message: Message,
        *,
        timeout: Optional[float] = None,
    ) -> bytes:
        """Send one raw request message and return the reply as bytes.

        The lower layer of :meth:`call`, for requests built by hand. ``timeout``
        defaults to the client's :attr:`timeout`. A call that times out **closes the
        client**: its reply may still come, and would then be taken for the answer to
        the next call.

        Raises:
            RouteError: the reply is an error envelope.
            ClientTimeout: no reply within ``timeout``, or the server stopped taking the
                request (the client is then closed).
            ConnectionClosed: the connection closed before the reply came.
        """
        if timeout is None:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._call_lock:
            self.send(message)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                reply = self.receive(remaining)
            except ClientTimeout:
                self._abort(1000, "call timed out")
                raise ClientTimeout(
                    f"no reply within {timeout}s; the client is closed, because the late "
                    "reply would be taken for the answer to the next call"
                ) from None
        error = is_error_envelope(reply)
        if error is not None:
            raise RouteError(*error)
        return reply.encode("utf-8") if isinstance(reply, str) else reply

    def call(
        self,
        route: str,
        params: Any = None,
        *,
        timeout: Optional[float] = None,
        binary: bool = False,
    ) -> bytes:
        """Call ``route`` with ``params`` and return the reply's bytes.

        Sends ``{"Route": route, "Params": params}`` (a text frame, or binary with
        ``binary=True``; the server answers in the same type). ``params`` must be
        JSON-encodable (``ValueError`` for NaN and infinities, which JSON has not, and
        the server refuses). See :meth:`request` for ``timeout`` and the errors.
        """
        if not isinstance(route, str):
            raise TypeError(f"route must be a str, not {type(route).__name__}")
        envelope = _dumps({"Route": route, "Params": params})
        return self.request(envelope.encode("utf-8") if binary else envelope,
                            timeout=timeout)

    def call_json(
        self,
        route: str,
        params: Any = None,
        *,
        timeout: Optional[float] = None,
    ) -> Any:
        """:meth:`call`, with the reply decoded as JSON (``ValueError`` if it is not)."""
        return json.loads(self.call(route, params, timeout=timeout))

    # Closing.

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection: send Close, wait for the server's answer, hang up.

        Idempotent. Waits up to :attr:`timeout` (``None``: as long as it takes) for the
        closing handshake, then drops the TCP connection. A ``receive`` or ``call``
        waiting in another thread raises :class:`~wsroute_sync.ConnectionClosed`.
        """
        with self._close_lock:
            first = not self._closing
            self._closing = True
        transport = self._transport
        if first:
            transport.start_close(code, reason, lock_timeout=self.timeout)
        thread = transport.thread
        if thread is not threading.current_thread():
            thread.join(self.timeout)
            if thread.is_alive():  # no answer in time
                transport.abort()
                thread.join()

    def _abort(self, code: int, reason: str) -> None:
        # Close without waiting: the server is busy (a call timed out) and would answer
        # the Close only when its handler returns.
        with self._close_lock:
            self._closing = True
        transport = self._transport
        transport.start_close(code, reason, lock_timeout=self.timeout)
        transport.abort()
        if transport.thread is not threading.current_thread():
            transport.thread.join()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Client {self.url} {state}>"
