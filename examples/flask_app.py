"""A Flask page and WebSocket routes on one port, inside the WSGI server you already run.

    python examples/flask_app.py                         # a tryout, then exit
    python examples/flask_app.py --serve 127.0.0.1:8000  # werkzeug's threaded server
    gunicorn -k gthread --threads 100 --chdir examples flask_app:app

``app.wsgi_app = server.wsgi_app(app.wsgi_app, path="/ws")`` puts the server's routes in
front of Flask: a WebSocket upgrade to ``/ws`` is served by the same code as
``server.serve()`` (handshake checks, ``max_connections``, routing, ``broadcast``...),
in the WSGI server's own thread for that connection, until the client leaves; every
other request reaches Flask untouched. The page at ``/`` connects back to ``/ws``.

Under gunicorn each open WebSocket holds one of the ``--threads`` of a worker for its
whole life, so ``max_connections`` stays below ``--threads``: the threads left over
answer pages and the 503 a client over the limit gets. SIGTERM to gunicorn closes the
WebSocket clients with 1001 (going away) before the worker exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from typing import Any, Dict
from urllib.request import urlopen

from flask import Flask
from werkzeug.serving import make_server

from wsroute_sync import Client, HandlerError, Server

# Below gunicorn's --threads (100 in the command above): see the docstring.
server = Server(max_connections=90)


@server.route("echo")
def echo(ctx: Any, message: bytes) -> bytes:
    return message


@server.route("shout")
def shout(ctx: Any, message: bytes) -> Dict[str, int]:
    text = ctx.params.get("text") if isinstance(ctx.params, dict) else None
    if not isinstance(text, str):
        raise HandlerError('shout expects {"text": "..."}')
    # Every other client gets a push; the sender gets the count as its reply (a push to
    # its own connection now would arrive before the reply and be taken for it).
    sender = ctx.connection
    sent = server.broadcast({"shout": text.upper()}, predicate=lambda c: c is not sender)
    return {"delivered": sent}


app = Flask(__name__)

PAGE = """<!doctype html>
<title>wsroute_sync in Flask</title>
<p>Flask served this page; the WebSocket below is wsroute_sync, on the same port.</p>
<pre id="log"></pre>
<script>
const log = (line) => { document.getElementById("log").textContent += line + "\\n"; };
const scheme = location.protocol === "https:" ? "wss://" : "ws://";
const ws = new WebSocket(scheme + location.host + "/ws");
ws.onopen = () => ws.send(JSON.stringify({Route: "echo", Params: {hello: "flask"}}));
ws.onmessage = (event) => log("<- " + event.data);
</script>
"""


@app.route("/")
def index() -> str:
    return PAGE


@app.route("/stats")
def stats() -> Dict[str, Any]:
    # The server's counters include the WebSocket clients served through Flask's port.
    return {"active": server.stats()["active"], "max": server.max_connections}


app.wsgi_app = server.wsgi_app(app.wsgi_app, path="/ws")  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="HOST:PORT",
                        help="serve with werkzeug's threaded server until Ctrl-C")
    args = parser.parse_args()
    host, port = (args.serve or "127.0.0.1:0").rsplit(":", 1)
    # threaded=True: a thread per connection, so an open WebSocket does not hold up
    # the pages (werkzeug's single-threaded mode is refused on the first upgrade).
    httpd = make_server(host, int(port), app, threaded=True)
    base = f"{host}:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, name="werkzeug")
    thread.start()
    try:
        if args.serve:
            print(f"serving http://{base}/ with WebSocket routes on ws://{base}/ws", flush=True)
            threading.Event().wait()  # until Ctrl-C
        else:
            # werkzeug logs every request to stderr; the tryout shows only what it prints
            # (errors still show).
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            tryout(base)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()  # Close 1001 to the WebSocket clients, then the HTTP server stops
        httpd.shutdown()
        thread.join()
        httpd.server_close()


def tryout(base: str) -> None:
    with urlopen(f"http://{base}/", timeout=5) as page:
        print("GET /      ->", page.status, page.headers["Content-Type"])
    with Client.connect(f"ws://{base}/ws", timeout=5) as ann, \
            Client.connect(f"ws://{base}/ws", timeout=5) as ben:
        print("echo       ->", ann.call_json("echo", {"hello": "flask"}))
        with urlopen(f"http://{base}/stats", timeout=5) as stats:
            print("GET /stats ->", json.load(stats))
        print("shout      ->", ann.call_json("shout", {"text": "hi all"}))
        print("ben hears  ->", ben.receive(5))


if __name__ == "__main__":
    main()
