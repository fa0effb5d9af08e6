"""wsroute_sync's routes inside gunicorn's threaded worker, in front of a Flask app.

The Flask app's ``wsgi_app`` is wrapped with ``server.wsgi_app(...)``, as a user would
deploy it; each WebSocket is served in the gunicorn worker thread that read its request.
flask-sock-gunicorn.py runs Flask-Sock under the same gunicorn settings (``GUNICORN``,
the equivalent of the command below), so the two rows differ only in the WebSocket code:

    gunicorn -k gthread --workers 1 --threads 10100 --worker-connections 20000 \\
        --backlog 1024 --keep-alive 5 --bind 127.0.0.1:PORT module:app

One worker process: a gthread worker is one GIL, like the standalone server. Threads are
started by gunicorn's pool as connections need them, so 10,100 costs nothing until the
c10k scenario; ``--worker-connections`` lifts gunicorn's default cap of 1,000
connections per worker. bench.py measures CPU over the master and its worker.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict

from _common import BACKLOG, free_port, parse_args, prepare_process, ready

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

#: Exit status that tells bench.py "cannot run here", as opposed to a crash.
EXIT_SKIP = 3

#: gunicorn settings shared by both gunicorn rows (names as in gunicorn's config file).
GUNICORN: Dict[str, Any] = {
    "worker_class": "gthread",
    "workers": 1,
    "threads": 10100,
    "worker_connections": 20000,
    "backlog": BACKLOG,
    "keepalive": 5,
    "accesslog": None,
    "loglevel": "warning",
}


def run_gunicorn(load: Callable[[], Any], port: int) -> None:
    """Serve the WSGI app ``load()`` returns with gunicorn in this process (the master).

    ``READY port=N`` is printed by the worker once it has loaded the app: the master
    listens earlier, but requests would wait in the backlog until the worker boots.
    """
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings = dict(GUNICORN, bind=[f"127.0.0.1:{port}"])
            if "control_socket_disable" in self.cfg.settings:
                # gunicorn >= 25 opens a control socket in $HOME by default; two
                # gunicorns (a test run and a benchmark) would share its path.
                settings["control_socket_disable"] = True
            for key, value in settings.items():
                self.cfg.set(key, value)
            self.cfg.set("post_worker_init", lambda worker: ready(port))

        def load(self) -> Any:
            return load()

    Application().run()


def skip_without(*modules: str) -> None:
    """Exit with ``EXIT_SKIP`` (and a SKIP line bench.py shows) if a module is missing."""
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        print(f"SKIP not installed: {', '.join(missing)} (pip install {' '.join(missing)})",
              flush=True)
        sys.exit(EXIT_SKIP)


def load_app() -> Any:
    from flask import Flask

    from wsroute_sync import Server

    # No _common.dispatch here: wsroute_sync parses the envelope, routes and re-encodes
    # itself; that is the work the peers reproduce with dispatch.
    server = Server(max_connections=20000)

    @server.route("echo")
    def echo(ctx: object, message: bytes) -> bytes:  # message = Params as UTF-8 JSON
        return message

    app = Flask("bench")

    @app.route("/page")
    def page() -> str:
        return "a Flask page next to the WebSocket routes"

    app.wsgi_app = server.wsgi_app(app.wsgi_app)  # type: ignore[method-assign]
    return app


def main() -> None:
    args = parse_args(__doc__ or "")
    skip_without("gunicorn", "flask", "wsroute_sync")
    prepare_process()
    run_gunicorn(load_app, args.port or free_port())


if __name__ == "__main__":
    main()
