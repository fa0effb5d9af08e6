"""The Go seed's functional options, as thin aliases over :class:`Server`'s keywords.

The Go original configured its server with ``NewServer(WithMaxConnections(2000),
WithLogger(l))``; :func:`new_server` and the ``with_*`` helpers build the same keyword
arguments, never a second code path.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, Union

from .options import ServerOptions
from .server import Server

__all__ = ["Option", "new_server", "with_max_connections", "with_logger", "with_option"]

Option = Callable[[Dict[str, Any]], None]


def with_option(name: str, value: Any) -> Option:
    """Return a functional option that sets the keyword ``name`` of ``Server``."""
    field_names = {f.name for f in dataclasses.fields(ServerOptions)}
    if name not in field_names:
        raise TypeError(f"unknown server option {name!r}")

    def apply(options: Dict[str, Any]) -> None:
        options[name] = value

    return apply


def with_max_connections(n: int) -> Option:
    """The seed's ``WithMaxConnections``: alias of ``Server(max_connections=n)``."""
    return with_option("max_connections", n)


def with_logger(logger: Union[logging.Logger, logging.LoggerAdapter]) -> Option:  # type: ignore[type-arg]
    """The seed's ``WithLogger``: alias of ``Server(logger=logger)``."""
    return with_option("logger", logger)


def new_server(*options: Option, **kwargs: Any) -> Server:
    """The seed's ``NewServer(opts...)``: build a :class:`Server` from functional options."""
    collected: Dict[str, Any] = {}
    for option in options:
        if not callable(option):
            raise TypeError(f"options must be made by with_*(), got {option!r}")
        option(collected)
    collected.update(kwargs)
    return Server(**collected)

