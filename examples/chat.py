"""A chat server: rooms kept in ``ctx.values``, messages fanned out with ``broadcast``.

    python examples/chat.py              # a scripted conversation, then exit
    python examples/chat.py --serve 127.0.0.1:8080

Routes: ``join {"room", "name"}``, ``say {"text"}``, ``who``. Each connection remembers
its room and name in ``ctx.values`` (a dict that lives as long as the connection);
``say`` pushes ``{"room", "from", "text"}`` to every *other* connection in the room with
``server.broadcast(message, predicate=...)`` and answers the sender with the count.

Why not to the sender too: the envelope has no request id, so a client pairs a reply
with its request by order. A push to the sender's own connection while its ``say``
is being handled would arrive before the reply and be taken for it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List

from wsroute_sync import Client, HandlerError, Server, ServerConnection

server = Server()


@server.route("join")
def join(ctx: Any, message: bytes) -> Dict[str, Any]:
    params = ctx.params if isinstance(ctx.params, dict) else {}
    room, name = params.get("room"), params.get("name")
    if not isinstance(room, str) or not isinstance(name, str) or not room or not name:
        raise HandlerError('join expects {"room": "...", "name": "..."}')
    ctx.values["room"], ctx.values["name"] = room, name
    return {"joined": room, "members": members(room)}


@server.route("say")
def say(ctx: Any, message: bytes) -> Dict[str, int]:
    room = ctx.values.get("room")
    if room is None:
        raise HandlerError("join a room first")
    text = ctx.params.get("text") if isinstance(ctx.params, dict) else None
    if not isinstance(text, str):
        raise HandlerError('say expects {"text": "..."}')
    sender = ctx.connection

    def same_room(connection: ServerConnection) -> bool:
        return connection is not sender and connection.values.get("room") == room

    delivered = server.broadcast(
        {"room": room, "from": ctx.values["name"], "text": text}, predicate=same_room
    )
    return {"delivered": delivered}


@server.route("who")
def who(ctx: Any, message: bytes) -> Dict[str, Any]:
    room = ctx.values.get("room")
    return {"room": room, "members": members(room) if room else []}


def members(room: str) -> List[str]:
    return sorted(c.values["name"] for c in server.connections if c.values.get("room") == room)


def conversation() -> None:
    """Three clients, two rooms: who hears what."""
    with server.start("127.0.0.1:0"):
        alice = Client.connect(server.url)
        bob = Client.connect(server.url)
        carol = Client.connect(server.url)
        with alice, bob, carol:
            print("alice:", alice.call_json("join", {"room": "lobby", "name": "alice"}))
            print("bob:  ", bob.call_json("join", {"room": "lobby", "name": "bob"}))
            print("carol:", carol.call_json("join", {"room": "games", "name": "carol"}))
            print("alice says hi:", alice.call_json("say", {"text": "hi, lobby!"}))
            print("bob hears:", json.loads(bob.receive(timeout=5)))
            # carol's next message is the answer to her call: nothing was pushed to her.
            print("carol's room:", carol.call_json("who"))
            print("bob answers:", bob.call_json("say", {"text": "hello alice"}))
            print("alice hears:", json.loads(alice.receive(timeout=5)))


def serve_until_interrupted() -> None:
    try:
        server.wait_closed()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="ADDR",
                        help="serve on ADDR (e.g. :8080 or 127.0.0.1:0) until Ctrl-C "
                        "instead of running the scripted conversation")
    args = parser.parse_args()
    if args.serve:
        server.start(args.serve)
        print("chat server on", server.url, flush=True)
        serve_until_interrupted()
    else:
        conversation()


if __name__ == "__main__":
    main()
