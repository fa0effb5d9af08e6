"""JSON route dispatch, sans-I/O: the request envelope, handler results, error envelopes.

A request is a JSON object ``{"Route": str, "Params": any}``; keys match
case-insensitively, as Go's ``encoding/json`` (the original's decoder) does. The reply is
whatever the handler returns, in the request's frame type; failures become
``{"code":1,"msg":"...","data":null}`` and the connection stays usable.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .errors import HandlerError
from .metrics import LATENCY_BUCKETS

__all__ = [
    "Handler",
    "EnvelopeError",
    "parse_envelope",
    "parse_request",
    "error_envelope",
    "encode_result",
    "as_message",
    "resolve_handler",
    "Dispatcher",
    "INTERNAL_ERROR_MESSAGE",
]

Message = Union[str, bytes]
Handler = Callable[[Any, bytes], Any]

#: What the client reads when a handler fails unexpectedly: nothing about internals.
INTERNAL_ERROR_MESSAGE = "internal error"
#: A route name quoted back in an error is cut here, so a 1 MB route is not echoed.
_MAX_QUOTED_ROUTE = 100

class _NotJSON(ValueError):
    """Python's json reads NaN and Infinity; JSON (RFC 8259 6) and Go do not."""


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value")


_monotonic = time.monotonic
_bisect = bisect.bisect_left
_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
# allow_nan=False: NaN and the infinities are no JSON either (the decoder above refuses
# them); json's default would write the bare words NaN and Infinity onto the wire.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class EnvelopeError(Exception):
    """The request is not a valid envelope; ``msg`` is what the client is told."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


def error_envelope(msg: str) -> str:
    """``{"code":1,"msg":<msg>,"data":null}``, compact, as the seed specifies."""
    return '{"code":1,"msg":' + json.dumps(msg) + ',"data":null}'


def _quote_route(route: str) -> str:
    if len(route) > _MAX_QUOTED_ROUTE:
        return route[:_MAX_QUOTED_ROUTE] + "..."
    return route


def parse_envelope(message: Message) -> Tuple[str, Any]:
    """Decode a request into ``(route, params)``; raise :class:`EnvelopeError`."""
    route, params, _ = parse_request(message)
    return route, params


def _parse_with_loads(text: str) -> Tuple[str, Any, str]:
    """The reference parse: the json module judges, names every error, and decides."""
    # The top-level members in the order they were written: a dict would fold a
    # repeated key into its first position, and Go lets the last spelling win.
    members: List[Tuple[str, Any]] = []

    def remember(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        members[:] = pairs  # nested objects come first; the top level is the last call
        return dict(pairs)

    decoder = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=remember)
    try:
        request = decoder.decode(text)
    except RecursionError:
        # The C decoder recurses per nesting level: {"a":[[[[...]]]]} 100,000 deep.
        raise EnvelopeError("invalid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise EnvelopeError(f"invalid JSON: {exc.msg} at position {exc.pos}") from None
    except _NotJSON as exc:
        raise EnvelopeError(f"invalid JSON: {exc}") from None
    except ValueError:
        # Python's limit on digits in an int (sys.set_int_max_str_digits).
        raise EnvelopeError("invalid JSON: number too long") from None
    if type(request) is not dict:
        raise EnvelopeError("invalid request: expected a JSON object")
    route = params = None
    has_route = has_params = False
    for key, value in members:
        folded = key.lower()
        if folded == "route":
            route, has_route = value, True
        elif folded == "params":
            params, has_params = value, True
    if not has_route:
        raise EnvelopeError('invalid request: missing "Route"')
    if type(route) is not str:
        raise EnvelopeError('invalid request: "Route" must be a string')
    return route, params, _dumps(params) if has_params else "null"


_WHITESPACE = " \t\n\r"
_scan_value = _decoder.scan_once  # type: ignore[attr-defined]
_scan_string = json.decoder.scanstring  # type: ignore[attr-defined]

# The envelope as clients write it, up to the Params value: "Route" first, exactly so
# spelled, its value a string without escapes (so its text is its value) or control
# characters (which JSON forbids in strings), any JSON whitespace between the tokens.
_WS = r"[ \t\n\r]*"
_ENVELOPE_HEAD = re.compile(
    _WS + r"\{" + _WS + r'"Route"' + _WS + ":" + _WS + r'"([^"\\\x00-\x1f]*)"' + _WS + ","
    + _WS + r'"Params"' + _WS + ":" + _WS
).match


def parse_request(message: Message) -> Tuple[str, Any, str]:
    """Decode a request into ``(route, params, params_text)``.

    ``params_text`` is the client's own JSON text of ``Params`` (``"null"`` when
    absent), cut out of the message rather than encoded again: like Go's
    ``json.RawMessage``, the handler receives exactly what was sent, and a large
    ``Params`` costs one parse, not a parse and a re-encoding.

    Three readers, from the cheapest: the usual shape (``"Route"`` then ``"Params"``)
    by one regular expression and the json module's C value scanner; any other object
    by a walk over its members (:func:`_walk_request`); anything unusual by
    ``json.loads``, which judges and describes it (:func:`_parse_with_loads`). Each
    hands on what it does not recognise, and all agree where they overlap
    (``tests/test_routing.py``).
    """
    if isinstance(message, str):
        text = message
    else:
        # The envelope is UTF-8 in binary frames too (RFC 8259 8.1); json.loads would
        # also guess UTF-16 and UTF-32, which Go's encoding/json does not.
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError("invalid JSON: not valid UTF-8") from None
    head = _ENVELOPE_HEAD(text)
    if head is not None:
        # The common shape, in C: one match, then the value scanner for Params. Whatever
        # else follows the value (another member, a repeated key, junk) goes the long way.
        start = head.end()
        try:
            params, stop = _scan_value(text, start)
        except (ValueError, StopIteration, RecursionError):
            pass  # the reference parse below names the error
        else:
            tail = text[stop:]
            if tail == "}" or tail.strip(_WHITESPACE) == "}":
                return head.group(1), params, text[start:stop]
    return _walk_request(text)


def _walk_request(text: str) -> Tuple[str, Any, str]:
    """The top-level object walked member by member, each value read by the C scanner;
    anything that is not a plain object goes to :func:`_parse_with_loads`."""
    route: Any = None
    params: Any = None
    params_text = "null"
    has_route = False
    ws = _WHITESPACE
    end = len(text)
    i = 0
    try:
        while i < end and text[i] in ws:
            i += 1
        if i >= end or text[i] != "{":
            raise ValueError
        i += 1
        first = True
        while True:
            while text[i] in ws:
                i += 1
            if first and text[i] == "}":
                i += 1
                break
            first = False
            if text[i] != '"':
                raise ValueError
            key, i = _scan_string(text, i + 1)
            while text[i] in ws:
                i += 1
            if text[i] != ":":
                raise ValueError
            i += 1
            while text[i] in ws:
                i += 1
            value, stop = _scan_value(text, i)
            # encoding/json matches field names case-insensitively; of several keys
            # that fold to the same name the last one wins, as it does in Go.
            if key == "Route" or key.lower() == "route":
                route, has_route = value, True
            elif key == "Params" or key.lower() == "params":
                params, params_text = value, text[i:stop]
            i = stop
            while text[i] in ws:
                i += 1
            if text[i] == ",":
                i += 1
                continue
            if text[i] == "}":
                i += 1
                break
            raise ValueError
        while i < end and text[i] in ws:
            i += 1
        if i != end:
            raise ValueError
    except (ValueError, IndexError, StopIteration, RecursionError):
        # Not the plain shape walked above: the reference parse decides and explains.
        return _parse_with_loads(text)
    if not has_route:
        raise EnvelopeError('invalid request: missing "Route"')
    if type(route) is not str:
        raise EnvelopeError('invalid request: "Route" must be a string')
    return route, params, params_text


def encode_result(result: Any, text: bool) -> Optional[Message]:
    """Turn a handler's return value into the reply message, or ``None`` for no reply.

    bytes-like goes as is, ``str`` as UTF-8, ``None`` sends nothing, anything else is
    JSON-encoded. A text reply must be valid UTF-8 (RFC 6455 5.6), so bytes that are
    not raise ``UnicodeDecodeError`` rather than go out in a text frame.

    Raises ``TypeError`` for a value with no JSON form (a set, an object, a dict key
    that is not a str, int, float, bool or None) and ``ValueError`` for one JSON cannot
    carry: NaN or an infinity anywhere (RFC 8259 6), a circular reference, an int over
    Python's digit limit (``sys.get_int_max_str_digits()``). Nesting deeper than the
    recursion limit raises ``RecursionError``; a dict subclass's own ``items()`` may
    raise anything.
    """
    if result is None:
        return None
    kind = type(result)
    if kind is bytes:
        raw: bytes = result
        return raw.decode("utf-8") if text else raw
    if kind is str:
        string: str = result
        return string if text else string.encode("utf-8")
    if isinstance(result, str):
        # A str subclass (a StrEnum member) is text as a push's is, not a JSON string;
        # str.__str__ gives its characters as a plain str, whatever its own __str__ says.
        string = str.__str__(result)
        return string if text else string.encode("utf-8")
    if isinstance(result, (bytes, bytearray, memoryview)):
        data = bytes(result)
        return data.decode("utf-8") if text else data
    encoded: str = _dumps(result)
    return encoded if text else encoded.encode("utf-8")


def resolve_handler(handler: Any) -> Handler:
    """Accept a plain callable ``handler(ctx, message)`` or an object with ``handle``.

    The object form is the Go seed's ``CommHandler``.
    """
    handle = getattr(handler, "handle", None)
    if callable(handle):
        return handle  # type: ignore[no-any-return]
    if callable(handler):
        return handler  # type: ignore[no-any-return]
    raise TypeError(
        "a handler is a callable handler(ctx, message) or an object with a handle(ctx, "
        f"message) method, not {type(handler).__name__}"
    )


class Dispatcher:
    """Route one message to its handler and produce the reply.

    ``lookup(route)`` returns the handler or ``None``; ``make_context(route, params,
    connection, deadline)`` builds the ``ctx``. Handlers run in the caller's thread.
    """

    __slots__ = ("lookup", "_make_context", "_logger", "_handler_timeout")

    def __init__(
        self,
        lookup: Callable[[str], Optional[Handler]],
        make_context: Callable[[str, Any, Any, Optional[float]], Any],
        *,
        logger: Union[logging.Logger, logging.LoggerAdapter],  # type: ignore[type-arg]
        handler_timeout: Optional[float],
    ) -> None:
        #: Called for every message, from every connection thread, without a lock: it
        #: must be safe to call concurrently, like the ``get`` of a dict that nobody
        #: changes. To change the routes, assign a new lookup (:class:`~wsroute_sync.
        #: registry.Routes` assigns the ``get`` of a fresh copy after every change).
        self.lookup = lookup
        self._make_context = make_context
        self._logger = logger
        self._handler_timeout = handler_timeout

    @staticmethod
    def _error(connection: Any, kind: str, msg: str, text: bool) -> Message:
        # ``kind`` ("invalid_json", "unknown_route"...) labels the error metrics.
        connection.metrics.error(kind)
        envelope = error_envelope(msg)
        return envelope if text else envelope.encode("utf-8")

    def dispatch(self, connection: Any, message: Message) -> Optional[Message]:
        """Handle one request message from ``connection``; return the reply or ``None``.

        This is the server's ``message_handler`` in routed mode. ``connection`` has a
        ``metrics`` attribute (:class:`~wsroute_sync.metrics.ConnectionMetrics`).
        """
        text = type(message) is str
        try:
            route, params, params_text = parse_request(message)
        except EnvelopeError as exc:
            kind = "invalid_json" if exc.msg.startswith("invalid JSON") else "invalid_request"
            return self._error(connection, kind, exc.msg, text)
        handler = self.lookup(route)
        if handler is None:
            return self._error(connection, "unknown_route", f"unknown route: {_quote_route(route)}",
                               text)
        logger = self._logger
        timeout = self._handler_timeout
        start = _monotonic()
        deadline = None if timeout is None else start + timeout
        ctx = self._make_context(route, params, connection, deadline)
        try:
            result = handler(ctx, params_text.encode("utf-8"))
        except HandlerError as exc:
            connection.metrics.observe(route, _monotonic() - start)
            return self._error(connection, "handler_error", exc.message, text)
        except Exception:
            connection.metrics.observe(route, _monotonic() - start)
            logger.error("handler for route %r failed", _quote_route(route), exc_info=True)
            return self._error(connection, "handler_exception", INTERNAL_ERROR_MESSAGE, text)
        finished = _monotonic()
        elapsed = finished - start
        row = connection.metrics.latency.get(route)
        if row is None:
            connection.metrics.observe(route, elapsed)
        else:  # ConnectionMetrics.observe, inline: this runs for every message
            row[_bisect(LATENCY_BUCKETS, elapsed)] += 1
            row[-1] += elapsed
        if deadline is not None and finished > deadline:
            logger.warning(
                "handler for route %r overran its %.3gs deadline by %.3fs",
                _quote_route(route), timeout, finished - deadline,
            )
        if text:
            # The usual results for a text request, without encode_result's dispatch.
            result_type = type(result)
            if result_type is bytes:
                try:
                    return result.decode("utf-8")  # type: ignore[no-any-return]
                except UnicodeDecodeError:
                    pass  # encode_result raises it again, and it is logged below
            elif result_type is str and result.isascii():
                return result  # type: ignore[no-any-return]
        try:
            reply = encode_result(result, text)
            if text and reply is not None and not reply.isascii():
                # A str can hold lone surrogates, which have no UTF-8 form: find out
                # here, not in the middle of writing the frame.
                reply.encode("utf-8")  # type: ignore[union-attr]
            return reply
        except UnicodeEncodeError:
            logger.error(
                "handler for route %r returned text that cannot be encoded as UTF-8",
                _quote_route(route),
            )
        except UnicodeDecodeError:
            logger.error(
                "handler for route %r returned bytes that are not UTF-8 for a text frame",
                _quote_route(route),
            )
        except Exception:
            # TypeError, ValueError, RecursionError from the encoder, or anything a dict
            # subclass's items() raises: every failure here is the handler's result, so
            # the client gets bad_result and the connection goes on.
            logger.error(
                "handler for route %r returned a value JSON cannot encode: %s",
                _quote_route(route), type(result).__name__, exc_info=True,
            )
        return self._error(connection, "bad_result", INTERNAL_ERROR_MESSAGE, text)


def as_message(message: Any) -> Message:
    """A message pushed to clients (``send``, broadcast): ``str`` as text, bytes-like as
    binary, anything else as JSON text.

    Raises ``UnicodeEncodeError`` for text with no UTF-8 form (lone surrogates) and
    ``TypeError``/``ValueError`` for values JSON cannot encode, before anything is written.
    """
    if isinstance(message, str):
        if not message.isascii():
            message.encode("utf-8")
        return message
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    encoded = encode_result(message, True)
    assert isinstance(encoded, str)
    return encoded
