#!/usr/bin/env python3
"""CPU cost of permessage-deflate for small messages, server side, sans I/O.

Measures what wsroute_sync's protocol core spends per 64-byte echo (receive one
client frame, produce the reply frame) with compression off and on, in one process,
so that the default of the ``compression`` option rests on a number::

    python benchmarks/deflate_cost.py [--messages 20000] [--payload 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import Request, TextMessage  # noqa: E402
from wsproto.extensions import PerMessageDeflate  # noqa: E402

from wsroute_sync.http import parse_request_head  # noqa: E402
from wsroute_sync.handshake import accept_upgrade  # noqa: E402
from wsroute_sync.stream import MessageStream  # noqa: E402


def per_message_us(compression: Optional[str], messages: int, payload: int) -> float:
    client = WSConnection(ConnectionType.CLIENT)
    extensions = [PerMessageDeflate()] if compression else []
    head = client.send(Request(host="bench", target="/", extensions=extensions))
    response, ws, _, deflate = accept_upgrade(parse_request_head(head), compression=compression)
    client.receive_data(response)
    list(client.events())
    stream = MessageStream(ws, max_message_size=1 << 20, extensions=deflate)
    text = json.dumps({"Route": "echo", "Params": {"message": "x" * payload}})
    # Different frames, as a real client's would be: the deflate context carries over.
    frames: List[bytes] = [client.send(TextMessage(data=text[:-2] + str(i % 10) + '"}'))
                           for i in range(messages)]
    start = time.process_time()
    for frame in frames:
        for message in stream.receive(frame):
            stream.send(message)  # type: ignore[arg-type]
    return (time.process_time() - start) / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    off = min(per_message_us(None, args.messages, args.payload) for _ in range(args.rounds))
    on = min(per_message_us("deflate", args.messages, args.payload) for _ in range(args.rounds))
    print(f"payload {args.payload} B, best of {args.rounds} x {args.messages} messages")
    print(f"compression off: {off:7.2f} us CPU per message (receive + reply frame)")
    print(f"compression on : {on:7.2f} us CPU per message")
    print(f"on / off       : {on / off:7.1f}x")


if __name__ == "__main__":
    main()
