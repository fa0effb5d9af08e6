"""wsroute_sync: a threaded, synchronous WebSocket server with JSON route dispatch."""

__version__ = "0.1.0"

__all__ = ["__version__"]
