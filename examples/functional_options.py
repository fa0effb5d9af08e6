"""The Go seed's functional options, with a JSON logger.

    python examples/functional_options.py

The Go original was configured with ``NewServer(WithMaxConnections(2000),
WithLogger(slog.New(slog.NewJSONHandler(os.Stdout, nil))))``. Here the same reads
``new_server(with_max_connections(2000), with_logger(logger))``: thin aliases over
``Server(max_connections=2000, logger=logger)``, validated the same way. The library
installs no log handlers; the program decides where records go and how they look
(here: one JSON object per line on stdout, with the standard library only).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from wsroute_sync import Client, new_server, with_logger, with_max_connections


class JSONFormatter(logging.Formatter):
    """One JSON object per line, like Go's ``slog.NewJSONHandler``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def make_logger() -> logging.Logger:
    logger = logging.getLogger("example.server")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # this handler only, whatever the root logger does
    return logger


def main() -> None:
    server = new_server(with_max_connections(2000), with_logger(make_logger()))

    @server.route("echo")
    def echo(ctx: Any, message: bytes) -> bytes:
        return message

    with server.start("127.0.0.1:0"):
        with Client.connect(server.url, timeout=5) as client:
            reply = client.call("echo", {"max_connections": server.max_connections})
            server.logger.info("echo replied %s", reply.decode())


if __name__ == "__main__":
    main()
