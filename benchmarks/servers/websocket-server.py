"""websocket-server (PyPI ``websocket-server``): socketserver threads, one per connection.

Used through its documented callback API; the only change is the listen
backlog, which socketserver sets to 5.
"""

from __future__ import annotations

import logging
from typing import Any

from _common import BACKLOG, dispatch, parse_args, prepare_process, ready
from websocket_server import WebsocketServer  # type: ignore[import-untyped]


class _Server(WebsocketServer):  # type: ignore[misc]  # untyped package
    # socketserver's default of 5 drops SYNs under 8 churn loops or 10k
    # connections, turning the benchmark into a measure of SYN retransmits.
    request_queue_size = BACKLOG


def on_message(client: dict[str, Any], server: WebsocketServer, message: str) -> None:
    server.send_message(client, dispatch(message))


def main() -> None:
    args = parse_args(__doc__ or "")
    prepare_process()
    server = _Server(host="127.0.0.1", port=args.port, loglevel=logging.WARNING)
    server.set_fn_message_received(on_message)
    ready(server.port)
    server.run_forever()


if __name__ == "__main__":
    main()
