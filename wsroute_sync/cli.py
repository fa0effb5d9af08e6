"""The ``wsroute-sync`` command: a demo server, a raw echo server, and a user's server.

    python -m wsroute_sync                  the demo (routes echo, time, add, upper)
    python -m wsroute_sync echo --port 9001 a raw echo server (for Autobahn|Testsuite)
    wsroute-sync serve app_module:server    run a Server object from your module
    wsroute-sync call ws://h:p/ echo '{}'   call a route and print the reply
"""

from __future__ import annotations

import argparse
import datetime
import html
import importlib
import json
import logging
import signal
import sys
import threading
from importlib import resources
from typing import Any, Dict, Optional, Sequence, Tuple

from .client import Client
from .errors import ClientTimeout, ConnectionClosed, HandlerError, HandshakeRejected
from .errors import RouteError
from .http import HTTPRequest
from .server import Server

__all__ = ["main", "build_parser", "make_demo_server", "JSONFormatter"]

logger = logging.getLogger("wsroute_sync.cli")


class JSONFormatter(logging.Formatter):
    """One JSON object per line, like the seed's ``slog.NewJSONHandler`` example."""

    def format(self, record: logging.LogRecord) -> str:
        entry: Dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


#: The demo's browser page, package data beside this module.
_DEMO_PAGE = "static/demo.html"


def _demo_page(ws_path: str) -> bytes:
    """The page, told which path to open its WebSocket on (the server's ``path=``)."""
    page = resources.files("wsroute_sync").joinpath(_DEMO_PAGE).read_text(encoding="utf-8")
    default = '<meta name="ws-path" content="/">'
    chosen = f'<meta name="ws-path" content="{html.escape(ws_path)}">'
    return page.replace(default, chosen, 1).encode("utf-8")


def make_demo_server(**options: Any) -> Server:
    """The demo: ``echo`` returns its Params, ``time`` the server's time, ``add`` a sum.

    ``GET /`` answers with a page that calls these routes from a browser. It connects back
    to the host that served it, so its ``Origin`` passes the default same-host check.
    """
    server = Server(**options)
    page = _demo_page(server.options.path[0] if server.options.path else "/")

    def demo_page(request: HTTPRequest) -> Tuple[int, str, bytes]:
        return 200, "text/html; charset=utf-8", page

    server.register_http("/", demo_page)

    @server.route("echo")
    def echo(ctx: Any, message: bytes) -> bytes:
        return message

    @server.route("time")
    def now(ctx: Any, message: bytes) -> Dict[str, str]:
        return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat()}

    @server.route("add")
    def add(ctx: Any, message: bytes) -> Dict[str, float]:
        params = ctx.params
        numbers = params.get("numbers") if isinstance(params, dict) else params
        if not isinstance(numbers, list) or not all(
            isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers
        ):
            raise HandlerError('add expects {"numbers": [1, 2, ...]}')
        return {"sum": sum(numbers)}

    @server.route("upper")
    def upper(ctx: Any, message: bytes) -> Dict[str, str]:
        params = ctx.params
        text = params.get("text") if isinstance(params, dict) else None
        if not isinstance(text, str):
            raise HandlerError('upper expects {"text": "..."}')
        return {"text": text.upper()}

    return server


def _add_server_options(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on "
                        "(default 127.0.0.1; '' or 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=default_port,
                        help=f"TCP port (default {default_port}; 0 picks a free one)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="open connections at once (default 1000)")
    parser.add_argument("--max-message-size", type=int, default=None,
                        help="bytes per message, 0 for no limit (default 1048576)")
    parser.add_argument("--compression", choices=["none", "deflate"], default=None,
                        help="offer permessage-deflate (default none)")
    parser.add_argument("--allowed-origin", action="append", default=None, metavar="ORIGIN",
                        help="allow browser pages from ORIGIN (repeatable; '*' allows any)")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes sharing the port through SO_REUSEPORT "
                        "(default 1); --max-connections applies to each")
    parser.add_argument("--cpu-affinity", default=None, metavar="one|CPU,CPU...",
                        help="bind the server's threads to one CPU ('one', a different one "
                        "per worker) or to the CPUs listed (default: unbound; see the "
                        "guide's Threads section for the price)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsroute-sync",
        description="A threaded WebSocket server with JSON route dispatch. Without a "
        "command, runs the demo server.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the demo server (the default)",
                               description="Run the demo server: routes echo, time, add, "
                               "upper.")
    _add_server_options(demo, 8080)
    echo = commands.add_parser("echo", help="run a raw echo server (no routing)",
                               description="Echo every message back in its frame type; "
                               "for protocol test suites such as Autobahn.")
    _add_server_options(echo, 9001)
    serve = commands.add_parser("serve", help="run a Server object from your module",
                                description="Import MODULE and serve its ATTR, a "
                                "wsroute_sync.Server.")
    serve.add_argument("target", metavar="MODULE:ATTR", help="e.g. myapp:server")
    _add_server_options(serve, 8080)
    call = commands.add_parser(
        "call", help="call a route on a server and print the reply",
        description="Send {\"Route\": ROUTE, \"Params\": PARAMS} to the server at URL "
        "and print the reply on stdout. Exit status: 0 for a reply, 1 for an error "
        "envelope (its message goes to stderr), 2 when the server cannot be reached, "
        "closes the connection or does not answer in time.",
    )
    call.add_argument("url", metavar="URL", help="ws://host:port/path, wss://... or "
                      "ws+unix:///path/to.sock")
    call.add_argument("route", metavar="ROUTE", help="the route to call, e.g. echo")
    call.add_argument("params", metavar="PARAMS", nargs="?", default=None,
                      help="the Params as JSON, e.g. '{\"k\": 1}' (default null)")
    call.add_argument("--timeout", type=float, default=10.0,
                      help="seconds to connect, and again to wait for the reply (default 10)")
    call.add_argument("--binary", action="store_true",
                      help="send the request in a binary frame (the reply comes in one too)")
    call.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                      help="an extra handshake header, e.g. 'Authorization: Bearer T' "
                      "(repeatable)")
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if args.log_json:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(args.log_level)


def _server_options(args: argparse.Namespace) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    if args.max_connections is not None:
        options["max_connections"] = args.max_connections
    if args.max_message_size is not None:
        options["max_message_size"] = args.max_message_size or None
    if args.compression is not None:
        options["compression"] = None if args.compression == "none" else args.compression
    if args.allowed_origin:
        options["allowed_origins"] = args.allowed_origin
    if args.cpu_affinity is not None:
        options["cpu_affinity"] = _cpu_affinity(args.cpu_affinity)
    return options


def _cpu_affinity(text: str) -> Any:
    """``--cpu-affinity``: ``one``, or CPU numbers separated by commas."""
    if text == "one":
        return text
    try:
        return frozenset(int(part) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"wsroute-sync: --cpu-affinity takes 'one' or CPU numbers "
                         f"separated by commas, got {text!r}") from None


def _load_server(target: str) -> Server:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"wsroute-sync: expected MODULE:ATTR, got {target!r}")
    sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"wsroute-sync: cannot import {module_name!r}: {exc}") from exc
    server = getattr(module, attr, None)
    if callable(server) and not isinstance(server, Server):
        server = server()
    if not isinstance(server, Server):
        raise SystemExit(f"wsroute-sync: {target} is not a wsroute_sync.Server")
    return server


def _run(server: Server, host: str, port: int, workers: int = 1) -> int:
    def stop(signum: int, frame: Any) -> None:
        # close() from a thread: the signal handler must return for serve() to go on.
        threading.Thread(target=server.close, name="wsroute_sync-stop").start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if host == "0.0.0.0":
        address = f":{port}"
    if workers != 1:
        return _run_workers(server, address, workers)
    try:
        server.start(address)
    except OSError as exc:
        print(f"wsroute-sync: cannot listen on {address}: {exc}", file=sys.stderr)
        return 1
    # Printed, not logged: scripts and test harnesses read the bound port from it.
    print(f"listening on {server.url}", flush=True)
    server.wait_closed()
    return 0


def _run_workers(server: Server, address: str, workers: int) -> int:
    """``--workers N``: fork the workers, print ``listening on URL`` once they all are."""
    from .workers import serve_workers

    def ready(url: str) -> None:
        # Printed, not logged: scripts and test harnesses read the bound port from it.
        print(f"listening on {url}", flush=True)

    try:
        serve_workers(server, address, workers, ready=ready)
    except (TypeError, ValueError) as exc:
        print(f"wsroute-sync: --workers: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"wsroute-sync: cannot serve on {address} with {workers} workers: {exc}",
              file=sys.stderr)
        return 1
    return 0


def _call_usage_error(message: str) -> int:
    print(f"wsroute-sync call: error: {message}", file=sys.stderr)
    return 2


def _call(args: argparse.Namespace) -> int:
    """The ``call`` command: one request, the reply on stdout; see its ``--help``."""
    params: Any = None
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            return _call_usage_error(f"PARAMS is not valid JSON: {exc}")
    headers = []
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            return _call_usage_error(f"--header expects 'NAME: VALUE', got {header!r}")
        headers.append((name.strip(), value.strip()))
    if not args.timeout > 0:
        return _call_usage_error("--timeout must be > 0")
    try:
        client = Client.connect(args.url, timeout=args.timeout, headers=headers)
    except HandshakeRejected as exc:
        print(f"wsroute-sync: {args.url} refused the connection: HTTP {exc.status}"
              + (f" {exc.reason}" if exc.reason else ""), file=sys.stderr)
        return 2
    except (OSError, ClientTimeout, ConnectionClosed) as exc:
        print(f"wsroute-sync: cannot connect to {args.url}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # not a WebSocket URL, a header that is not Latin-1
        return _call_usage_error(str(exc))
    with client:
        try:
            reply = client.call(args.route, params, binary=args.binary)
        except RouteError as exc:
            print(f"wsroute-sync: {exc}", file=sys.stderr)
            return 1
        except ClientTimeout:
            print(f"wsroute-sync: no reply from {args.url} within {args.timeout:g}s",
                  file=sys.stderr)
            return 2
        except ConnectionClosed as exc:
            print(f"wsroute-sync: {args.url}: {exc}", file=sys.stderr)
            return 2
    sys.stdout.buffer.write(reply + b"\n")
    sys.stdout.flush()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] not in ("demo", "echo", "serve", "call", "-h", "--help"):
        arguments.insert(0, "demo")  # the demo is the default command
    args = parser.parse_args(arguments)
    if args.command == "call":
        return _call(args)
    _configure_logging(args)
    options = _server_options(args)
    try:
        if args.command == "echo":
            server = Server(message_handler=lambda connection, message: message, **options)
        elif args.command == "serve":
            server = _load_server(args.target)
            if options:
                logger.warning("serve: options other than --host/--port are set in your "
                               "code; ignoring %s", sorted(options))
        else:
            server = make_demo_server(**options)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return _run(server, args.host, args.port, args.workers)


