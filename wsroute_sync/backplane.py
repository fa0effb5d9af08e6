"""Backplanes: broadcast, room and ``send_to`` messages that reach every server instance.

A server process holds only its own clients. With a backplane, ``server.broadcast()``,
``server.broadcast(data, room=...)`` and ``server.send_to(connection_id, data)`` deliver to
the local clients directly, then publish the message; every other instance delivers it to
its own clients. Each message carries the publisher's instance id, and an instance drops
the messages it published itself, so nothing reaches a client twice::

    Backplane           the interface a Server uses (start, publish, close)
      RedisBackplane    Redis pub/sub through redis-py: pip install 'wsroute_sync[redis]'
    BackplaneMessage    what travels: kind, data, target, origin, destination

Delivery is at most once, as Redis pub/sub itself: a message published while the link is
down is lost (and counted in the log), never replayed or repeated.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import threading
import time
import urllib.parse
from typing import Any, Callable, Optional, Union

__all__ = ["Backplane", "BackplaneMessage", "RedisBackplane", "Deliver"]

#: The kinds of message a server publishes.
KINDS = ("broadcast", "room", "send_to")


@dataclasses.dataclass(frozen=True)
class BackplaneMessage:
    """One message between instances.

    Attributes:
        kind: ``"broadcast"`` (every client), ``"room"`` (the clients in room ``target``)
            or ``"send_to"`` (the client whose connection id is ``target``).
        data: ``str`` for a text frame, ``bytes`` for a binary frame.
        target: the room name or the connection id; ``None`` for a broadcast.
        origin: the publishing instance's id (its receivers ignore it).
        destination: the one instance that should receive it (``send_to``: the instance
            whose id prefixes the connection id), or ``None`` for every instance.
    """

    kind: str
    data: Union[str, bytes]
    target: Optional[str] = None
    origin: str = ""
    destination: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.data, (str, bytes)):
            raise TypeError("data must be str or bytes")
        if self.kind != "broadcast" and not isinstance(self.target, str):
            raise ValueError(f"a {self.kind} message needs a target")

    def encode(self) -> bytes:
        """A JSON header line, then the payload as it is (no base64 for binary frames)."""
        binary = isinstance(self.data, bytes)
        header = json.dumps(
            {"v": 1, "k": self.kind, "t": self.target, "o": self.origin,
             "d": self.destination, "b": binary},
            separators=(",", ":"),
        ).encode("utf-8")
        payload = self.data if isinstance(self.data, bytes) else self.data.encode("utf-8")
        return header + b"\n" + payload

    @classmethod
    def decode(cls, raw: bytes) -> "BackplaneMessage":
        """The inverse of :meth:`encode`; ``ValueError`` for anything else."""
        header_bytes, sep, payload = raw.partition(b"\n")
        if not sep:
            raise ValueError("no header line")
        try:
            header = json.loads(header_bytes)
        except ValueError as exc:
            raise ValueError(f"bad header: {exc}") from exc
        if not isinstance(header, dict) or header.get("v") != 1:
            raise ValueError("unknown header version")
        data: Union[str, bytes] = payload if header.get("b") else payload.decode("utf-8")
        try:
            return cls(
                kind=header.get("k"),  # type: ignore[arg-type]
                data=data,
                target=header.get("t"),
                origin=str(header.get("o") or ""),
                destination=header.get("d"),
            )
        except TypeError as exc:
            raise ValueError(str(exc)) from exc


#: What a server hands its backplane: ``deliver(message)`` for messages from elsewhere.
Deliver = Callable[[BackplaneMessage], None]


class Backplane(abc.ABC):
    """Carries messages between server instances; one backplane object per server.

    The server calls :meth:`start` once it listens (in each worker process, when it has
    workers), :meth:`publish` for each broadcast, room message or ``send_to`` meant for
    other instances, and :meth:`close` when it closes. An implementation hands every
    message another instance published to ``deliver``, from one thread of its own (never
    a thread per connection), through :meth:`_dispatch`, which drops the messages this
    instance published: the publisher has delivered those to its own clients already.
    """

    def __init__(self) -> None:
        self.instance_id: Optional[str] = None
        self._deliver: Optional[Deliver] = None
        self._owner: Any = None

    @abc.abstractmethod
    def start(self, instance_id: str, deliver: Deliver) -> None:
        """Begin receiving for ``instance_id``; must not raise because the peer is down."""

    @abc.abstractmethod
    def publish(self, message: BackplaneMessage) -> bool:
        """Send ``message`` to the other instances; ``False`` if it could not be sent.

        Must not block for long and must not raise because the peer is unreachable.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop receiving and release connections; idempotent, and a no-op if never started."""

    @property
    def connected(self) -> bool:
        """True while messages can be published and received."""
        return True

    def attach(self, server: Any) -> None:
        """Called by ``Server(backplane=...)``: a backplane serves one server (a second
        server gets ``ValueError``)."""
        if self._owner is not None and self._owner is not server:
            raise ValueError("this backplane already belongs to another Server; make one each")
        self._owner = server

    def _dispatch(self, message: BackplaneMessage) -> None:
        """Hand a received message to the server, unless this instance published it."""
        deliver = self._deliver
        if deliver is None or message.origin == self.instance_id:
            return
        if message.destination is not None and message.destination != self.instance_id:
            return
        deliver(message)


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


class RedisBackplane(Backplane):
    """A backplane on Redis pub/sub, through redis-py (``pip install 'wsroute_sync[redis]'``).

    Each server subscribes to two channels: ``{channel_prefix}:all`` (broadcasts and room
    messages) and ``{channel_prefix}:instance:{id}`` (``send_to`` for its own clients), so a
    message for one client crosses only to the instance that holds it. Instances that
    should reach each other share a Redis server and a ``channel_prefix``.

    Failures never take the server down, and local delivery never waits for Redis:

    - **Redis unreachable at start**: the server starts anyway, serving its own clients
      (degraded mode), logs an ERROR, and keeps trying. Call :meth:`wait_connected` after
      ``server.start()`` to fail fast instead.
    - **Redis lost while serving**: local delivery goes on; the subscriber thread (one per
      server) reconnects with back-off (0.1 s doubling up to ``max_backoff``); the gap is
      logged with how long it lasted and how many messages could not be published.
      Messages other instances published during the gap are missed, not replayed.

    Args:
        url: a redis-py URL, ``redis://[:password@]host:port/db``, ``rediss://`` for TLS,
            or ``unix:///path/to/redis.sock``.
        channel_prefix: the channels' common prefix (default ``"wsroute_sync"``).
        connect_timeout: seconds to connect, and for a publish to complete (default 2).
        max_backoff: longest pause between reconnection attempts (default 10 s).
        logger: default ``logging.getLogger("wsroute_sync.backplane")``.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        channel_prefix: str = "wsroute_sync",
        connect_timeout: float = 2.0,
        max_backoff: float = 10.0,
        logger: Union[logging.Logger, logging.LoggerAdapter, None] = None,  # type: ignore[type-arg]
    ) -> None:
        super().__init__()
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must be redis://, rediss:// or unix://, got {url!r}")
        if not isinstance(channel_prefix, str) or not channel_prefix:
            raise ValueError("channel_prefix must be a non-empty string")
        for name, value in (("connect_timeout", connect_timeout), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        try:
            import redis  # noqa: F401 - fail here, at construction, not when serving
        except ImportError as exc:
            raise ImportError(
                "RedisBackplane needs redis-py: pip install 'wsroute_sync[redis]'"
            ) from exc
        self.url = url
        self.channel_prefix = channel_prefix
        self.connect_timeout = float(connect_timeout)
        self.max_backoff = float(max_backoff)
        self.logger: Union[logging.Logger, logging.LoggerAdapter] = (  # type: ignore[type-arg]
            logger if logger is not None else logging.getLogger("wsroute_sync.backplane")
        )
        self._all_channel = f"{channel_prefix}:all"
        self._own_channel = ""
        # redis.Redis clients; Any, as their typing differs between redis-py versions.
        self._publisher: Any = None
        self._subscriber: Any = None
        self._pubsub: Any = None
        self._thread: Optional[threading.Thread] = None
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._unsent = 0  # messages not published since the link went down
        self._stop_token = b""

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Block until subscribed to Redis; ``False`` if ``timeout`` ran out first."""
        return self._connected.wait(timeout)

    def _channel_of(self, instance_id: str) -> str:
        return f"{self.channel_prefix}:instance:{instance_id}"

    def start(self, instance_id: str, deliver: Deliver) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        with self._lock:
            if self._thread is not None:
                raise RuntimeError("this backplane is already started")
            self.instance_id = instance_id
            self._deliver = deliver
            self._own_channel = self._channel_of(instance_id)
            self._stop_token = f"stop {instance_id} {id(self)} {time.monotonic()}".encode()
            # No retries inside redis-py: a failure must reach our loop, which reconnects
            # with back-off and logs the gap. Publishing gets a socket timeout so that a
            # hung Redis cannot hold a broadcast for long; the subscriber has none, since
            # it waits for messages for as long as the link is quiet (TCP keepalive finds
            # a dead peer).
            common: Any = dict(socket_connect_timeout=self.connect_timeout,
                               socket_keepalive=True, retry=Retry(NoBackoff(), 0))
            self._publisher = redis.Redis.from_url(
                self.url, socket_timeout=self.connect_timeout, **common
            )
            self._subscriber = redis.Redis.from_url(self.url, **common)
            self._thread = threading.Thread(
                target=self._run, name=f"wsroute_sync-backplane-{instance_id}", daemon=True
            )
            self._thread.start()

    def publish(self, message: BackplaneMessage) -> bool:
        import redis

        publisher = self._publisher
        if publisher is None or not self._connected.is_set():
            with self._lock:
                self._unsent += 1
            return False
        channel = (self._all_channel if message.destination is None
                   else self._channel_of(message.destination))
        try:
            publisher.publish(channel, message.encode())
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._unsent += 1
                first = self._unsent == 1
            if first:
                self.logger.warning("backplane: publishing to Redis failed (%s); messages "
                                    "reach this instance's clients only", exc)
            return False
        return True

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            thread = self._thread
            publisher, subscriber = self._publisher, self._subscriber
        if thread is not None:
            if self._connected.is_set() and publisher is not None:
                # Wake the subscriber, blocked reading its subscription, with a message on
                # its own channel: no other thread touches its connection.
                try:
                    publisher.publish(self._own_channel, self._stop_token)
                except Exception:  # it is down: the subscriber has noticed or will
                    pass
            thread.join(self.connect_timeout + 1.0)
            if thread.is_alive():  # pragma: no cover - a peer that stopped answering
                pubsub = self._pubsub
                if pubsub is not None and pubsub.connection is not None:
                    try:
                        pubsub.connection.disconnect()
                    except Exception:
                        pass
                thread.join(self.connect_timeout)
        for client in (publisher, subscriber):
            if client is not None:
                try:
                    client.close()
                except Exception:  # pragma: no cover - closing sockets
                    pass
        self._connected.clear()

    # The subscriber thread.

    def _run(self) -> None:
        import redis

        assert self._subscriber is not None
        target = _redact(self.url)
        delay = 0.1
        lost_at = time.monotonic()
        ever_connected = False
        attempts = 0
        while not self._stopping.is_set():
            pubsub = self._subscriber.pubsub()
            self._pubsub = pubsub
            try:
                attempts += 1
                pubsub.subscribe(self._all_channel, self._own_channel)
                self._await_subscribed(pubsub)
                self._connected.set()
                with self._lock:
                    unsent, self._unsent = self._unsent, 0
                if ever_connected:
                    self.logger.warning(
                        "backplane: reconnected to Redis at %s after %.1fs; %d message(s) "
                        "could not be published meanwhile, and messages other instances "
                        "published meanwhile were missed", target,
                        time.monotonic() - lost_at, unsent,
                    )
                elif attempts > 1:
                    self.logger.warning("backplane: connected to Redis at %s after %.1fs "
                                        "of local-only delivery", target,
                                        time.monotonic() - lost_at)
                else:
                    self.logger.info("backplane: subscribed to Redis at %s as %s",
                                     target, self.instance_id)
                ever_connected = True
                delay = 0.1
                if self._stopping.is_set():
                    break
                self._receive(pubsub)
            except (redis.RedisError, OSError) as exc:
                if self._stopping.is_set():
                    break
                if self._connected.is_set():
                    self._connected.clear()
                    lost_at = time.monotonic()
                    self.logger.warning(
                        "backplane: lost Redis at %s (%s); local delivery continues, "
                        "reconnecting", target, exc,
                    )
                elif attempts == 1:
                    self.logger.error(
                        "backplane: cannot reach Redis at %s (%s); serving this instance's "
                        "clients only until it answers", target, exc,
                    )
                else:
                    self.logger.debug("backplane: Redis at %s still unreachable (%s); next "
                                      "try in %.1fs", target, exc, delay)
            finally:
                self._connected.clear()
                self._pubsub = None
                try:
                    pubsub.close()
                except Exception:  # pragma: no cover - closing a broken socket
                    pass
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, self.max_backoff)

    def _await_subscribed(self, pubsub: Any) -> None:
        """Read both subscription confirmations, so that publishing can start."""
        import redis

        waiting = {self._all_channel.encode(), self._own_channel.encode()}
        deadline = time.monotonic() + self.connect_timeout
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise redis.TimeoutError("no subscription confirmation from Redis")
            reply = pubsub.get_message(timeout=remaining)
            if reply is not None and reply.get("type") == "subscribe":
                waiting.discard(reply.get("channel"))

    def _receive(self, pubsub: Any) -> None:
        """Deliver messages until the connection fails or close() wakes us."""
        while True:
            reply = pubsub.get_message(timeout=None)
            if reply is None or reply.get("type") != "message":
                continue
            raw = reply.get("data")
            if raw == self._stop_token or self._stopping.is_set():
                return
            try:
                message = BackplaneMessage.decode(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                self.logger.warning("backplane: ignoring a malformed message on %s: %s",
                                    reply.get("channel"), exc)
                continue
            try:
                self._dispatch(message)
            except Exception:
                self.logger.error("backplane: delivering a %s message failed", message.kind,
                                  exc_info=True)
