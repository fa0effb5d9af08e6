"""Counters and the handler latency histogram, and their Prometheus text form.

Each connection counts into its own :class:`ConnectionMetrics`: what it reads and handles
is written only by its own thread, so that path takes no lock and loses no count; what
it sends (``messages_out``) is counted under the connection's lock by whichever thread
sends (replies, pushes, broadcasts) as the frame is made. The server adds a
connection's numbers to its running totals once, when the connection ends, and
:func:`render_prometheus` turns a snapshot into the text exposition format (0.0.4).
"""

from __future__ import annotations

import bisect
import math
import operator
from typing import Dict, Iterable, List, Mapping, Tuple, Union

__all__ = [
    "LATENCY_BUCKETS",
    "ConnectionMetrics",
    "Totals",
    "render_prometheus",
]

#: Upper bounds in seconds of the handler latency histogram (the last bucket is +Inf).
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)


class ConnectionMetrics:
    """What one connection did (see the module docstring for who writes what)."""

    __slots__ = ("messages_in", "messages_out", "errors", "latency")

    def __init__(self) -> None:
        self.messages_in = 0
        self.messages_out = 0
        self.errors: Dict[str, int] = {}
        # route -> [count per bucket..., +Inf count, sum of seconds]
        self.latency: Dict[str, List[float]] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def observe(self, route: str, seconds: float) -> None:
        # routing.Dispatcher.dispatch does the same inline once a route has its row.
        row = self.latency.get(route)
        if row is None:
            row = self.latency[route] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        row[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-1] += seconds


class Totals:
    """Running sums over finished connections, plus the connection counters."""

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected = 0
        self.messages_in = 0
        self.messages_out = 0
        self.errors: Dict[str, int] = {}
        self.latency: Dict[str, List[float]] = {}

    def add(self, metrics: Union[ConnectionMetrics, "Totals"]) -> None:
        """Add a connection's (or other totals') numbers.

        A live connection's thread may be writing while another thread reads here: the
        dict and list copies below are single C-level operations under the GIL, so they
        see a consistent state without the connection taking a lock per message.
        """
        self.messages_in += metrics.messages_in
        self.messages_out += metrics.messages_out
        for kind, n in dict(metrics.errors).items():
            self.errors[kind] = self.errors.get(kind, 0) + n
        for route, row in dict(metrics.latency).items():
            row = list(row)
            total = self.latency.get(route)
            if total is None:
                self.latency[route] = row
            else:
                # Element-wise in C: a Python loop over the 18 entries was a tenth of
                # the interpreter's work for a short connection.
                total[:] = map(operator.add, total, row)

    def snapshot(self, live: Iterable[ConnectionMetrics]) -> "Totals":
        """These totals plus the live connections' numbers, as a new object."""
        out = Totals()
        out.accepted, out.rejected = self.accepted, self.rejected
        out.add(self)
        for metrics in live:
            out.add(metrics)
        return out

    def latency_summary(self) -> Dict[str, Dict[str, Union[int, float, Dict[str, int]]]]:
        """Per route: count, sum of seconds and cumulative bucket counts."""
        out: Dict[str, Dict[str, Union[int, float, Dict[str, int]]]] = {}
        for route, row in sorted(self.latency.items()):
            cumulative = 0
            buckets: Dict[str, int] = {}
            for bound, n in zip(LATENCY_BUCKETS + (math.inf,), row[:-1]):
                cumulative += int(n)
                buckets["+Inf" if bound == math.inf else repr(bound)] = cumulative
            out[route] = {"count": cumulative, "sum": row[-1], "buckets": buckets}
        return out


def _label(value: str) -> str:
    # Exposition format: backslash, double quote and newline are escaped in labels.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(stats: Mapping[str, object], totals: Totals) -> str:
    """The Prometheus text format (version 0.0.4) for a server's numbers."""
    lines: List[str] = []

    def metric(name: str, kind: str, help_text: str, samples: List[Tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            number = repr(float(value)) if isinstance(value, float) and not value.is_integer() \
                else str(int(value))
            lines.append(f"{name}{labels} {number}")

    metric("wsroute_sync_connections_active", "gauge", "Open connections.",
           [("", float(stats["active"]))])  # type: ignore[arg-type]
    metric("wsroute_sync_connections_max", "gauge", "The max_connections limit.",
           [("", float(stats["max"]))])  # type: ignore[arg-type]
    metric("wsroute_sync_connections_accepted_total", "counter",
           "Connections admitted under the limit.", [("", float(totals.accepted))])
    metric("wsroute_sync_connections_rejected_total", "counter",
           "Connections refused with 503 over the limit.", [("", float(totals.rejected))])
    metric("wsroute_sync_messages_in_total", "counter", "Messages received.",
           [("", float(totals.messages_in))])
    metric("wsroute_sync_messages_out_total", "counter", "Messages sent.",
           [("", float(totals.messages_out))])
    metric("wsroute_sync_errors_total", "counter", "Error envelopes sent, by kind.",
           [(f'{{kind="{_label(kind)}"}}', float(n)) for kind, n in sorted(totals.errors.items())])
    lines.append("# HELP wsroute_sync_handler_seconds Handler run time, by route.")
    lines.append("# TYPE wsroute_sync_handler_seconds histogram")
    for route, summary in totals.latency_summary().items():
        route_label = _label(route)
        buckets = summary["buckets"]
        assert isinstance(buckets, dict)
        for bound, n in buckets.items():
            lines.append(
                f'wsroute_sync_handler_seconds_bucket{{route="{route_label}",le="{bound}"}} {n}'
            )
        lines.append(f'wsroute_sync_handler_seconds_sum{{route="{route_label}"}} '
                     f'{float(summary["sum"])!r}')  # type: ignore[arg-type]
        lines.append(f'wsroute_sync_handler_seconds_count{{route="{route_label}"}} '
                     f'{summary["count"]}')
    return "\n".join(lines) + "\n"
