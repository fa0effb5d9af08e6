"""Flask-Sock under gunicorn's threaded worker, with the same settings as our gunicorn row.

A ``@sock.route("/")`` handler loops ``receive()`` → ``dispatch`` → ``send()`` as the
Flask-Sock documentation shows. Flask-Sock takes the socket from ``gunicorn.socket``
and hands it to simple-websocket, which starts a reader thread per connection next to
the gunicorn thread running the handler. The gunicorn settings come from
wsroute-sync-gunicorn.py (``GUNICORN``), so the two rows run the same command.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from _common import dispatch, free_port, parse_args, prepare_process

_ours = import_module("wsroute-sync-gunicorn")


def load_app() -> Any:
    from flask import Flask
    from flask_sock import Sock  # type: ignore[import-untyped]  # no stubs

    app = Flask("bench")
    sock = Sock(app)

    @app.route("/page")
    def page() -> str:
        return "a Flask page next to the WebSocket route"

    @sock.route("/")  # type: ignore[untyped-decorator]
    def echo(ws: Any) -> None:
        while True:
            ws.send(dispatch(ws.receive()))  # ConnectionClosed ends it; Flask-Sock catches

    return app


def main() -> None:
    args = parse_args(__doc__ or "")
    _ours.skip_without("gunicorn", "flask", "flask_sock")
    prepare_process()
    _ours.run_gunicorn(load_app, args.port or free_port())


if __name__ == "__main__":
    main()
