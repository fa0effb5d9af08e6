"""The public surface is explicit: __all__ everywhere, and pinned here."""

from __future__ import annotations

import importlib
import pkgutil

import wsroute_sync

PUBLIC = {
    "__version__", "Server", "ServerConnection", "ServerOptions", "Context", "Headers",
    "HTTPRequest", "new_server", "with_max_connections", "with_logger", "with_option",
    "error_envelope", "basic_auth", "WSRouteError", "HandlerError", "HandshakeRejected", "ConnectionClosed",
    "RouteError", "ClientTimeout", "Client", "Backplane", "BackplaneMessage", "RedisBackplane",
}


def test_package_exports_are_pinned() -> None:
    assert set(wsroute_sync.__all__) >= PUBLIC
    for name in wsroute_sync.__all__:
        assert hasattr(wsroute_sync, name), name


def test_every_module_declares_all_and_exports_exist() -> None:
    for info in pkgutil.iter_modules(wsroute_sync.__path__):
        module = importlib.import_module(f"wsroute_sync.{info.name}")
        assert hasattr(module, "__all__"), info.name
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.{name}"


def test_exceptions_share_one_base() -> None:
    for name in ("HandlerError", "HandshakeRejected", "ConnectionClosed", "RouteError",
                 "ClientTimeout"):
        assert issubclass(getattr(wsroute_sync, name), wsroute_sync.WSRouteError)
