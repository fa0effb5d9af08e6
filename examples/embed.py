"""Embed a server in a script: serve in the background, call it, close.

    python examples/embed.py

``server.start()`` returns once the server listens (port 0 picks a free port, so the
script never collides with another one); ``with`` closes the server at the end, after
the client has hung up. Useful for tests, notebooks and tools that need a WebSocket
endpoint for a moment.
"""

from __future__ import annotations

from typing import Any, Dict

from wsroute_sync import Client, HandlerError, RouteError, Server

server = Server(max_connections=10)


@server.route("greet")
def greet(ctx: Any, message: bytes) -> Dict[str, str]:
    name = ctx.params.get("name") if isinstance(ctx.params, dict) else None
    if not isinstance(name, str):
        raise HandlerError('greet expects {"name": "..."}')
    return {"greeting": f"hello, {name}"}


def main() -> None:
    with server.start("127.0.0.1:0"):
        print(f"serving on {server.url}")
        with Client.connect(server.url, timeout=5) as client:
            print("greet ->", client.call_json("greet", {"name": "embedded world"}))
            try:
                client.call("greet", {"nom": "?"})
            except RouteError as exc:
                print("greet with bad params ->", exc)
    print("closed:", server.stats()["active"], "connections left")


if __name__ == "__main__":
    main()
