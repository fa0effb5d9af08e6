"""Options are validated up front; the seed's functional options are thin aliases."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Dict

import pytest

from wsroute_sync import Server, ServerOptions, new_server, with_logger, with_max_connections
from wsroute_sync import with_option


def test_defaults_follow_the_go_original() -> None:
    server = Server()
    assert server.options.max_connections == 1000
    assert server.options.handler_timeout == 10.0
    assert server.options.max_message_size == 1 << 20
    assert server.logger is logging.getLogger("wsroute_sync.server")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_connections": 0}, ValueError),
        ({"max_connections": -5}, ValueError),
        ({"max_connections": "10"}, TypeError),
        ({"max_connections": 1.5}, TypeError),
        ({"max_connections": True}, TypeError),
        ({"max_message_size": 0}, ValueError),
        ({"max_header_size": 10}, ValueError),
        ({"ping_interval": 0}, ValueError),
        ({"ping_timeout": -1}, ValueError),
        ({"close_timeout": "5"}, TypeError),
        ({"handler_timeout": 0}, ValueError),
        ({"compression": "gzip"}, ValueError),
        ({"path": "ws"}, ValueError),
        ({"path": [1]}, TypeError),
        ({"subprotocols": []}, ValueError),
        ({"check_origin": "yes"}, TypeError),
        ({"allowed_origins": ["*"], "check_origin": lambda r: True}, ValueError),
        ({"logger": "wsroute"}, TypeError),
        ({"message_handler": 3}, TypeError),
        ({"health_path": "healthz"}, ValueError),
    ],
)
def test_bad_values_fail_at_construction(kwargs: Dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        Server(**kwargs)


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Server(max_conns=5)  # type: ignore[call-arg]


def test_none_switches_features_off() -> None:
    server = Server(ping_interval=None, ping_timeout=None, write_timeout=None,
                    close_timeout=None, handler_timeout=None, max_message_size=None,
                    handshake_timeout=None, health_path=None, metrics_path=None)
    assert server.options.ping_interval is None


def test_functional_options_are_aliases() -> None:
    logger = logging.getLogger("test.functional")
    server = new_server(with_max_connections(2000), with_logger(logger))
    assert server.options.max_connections == 2000
    assert server.logger is logger
    assert new_server(with_option("path", "/ws")).options.path == ("/ws",)
    with pytest.raises(ValueError):
        new_server(with_max_connections(0))
    with pytest.raises(TypeError):
        with_option("nonsense", 1)
    with pytest.raises(TypeError):
        new_server(2000)  # type: ignore[arg-type]


def test_every_server_keyword_is_an_option() -> None:
    """Server hands its keywords to ServerOptions as they are, all but message_handler:
    the two lists, and their defaults, are the same."""
    params = inspect.signature(Server).parameters
    fields = {f.name: f.default for f in dataclasses.fields(ServerOptions)}
    assert set(params) == set(fields) | {"message_handler"}
    for name, default in fields.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name
