"""Which Autobahn cases we run, in which chunks, and what counts as a pass.

Pure data and functions: imported both by the test process and by the kosoku
runner subprocess, so it must not import kosoku, pytest or anything with I/O.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CHUNKS",
    "EXPECTED_CASES_PER_GROUP",
    "MAX_MESSAGE_SIZE",
    "PASSING_BEHAVIORS",
    "PASSING_CLOSE_BEHAVIORS",
    "Chunk",
    "case_sort_key",
    "group_of",
    "is_pass",
    "select",
]

# Groups 1-10 and 12-13 of the Autobahn fuzzingclient suite (there is no group
# 8 or 11), 517 cases in all. kosoku 0.1.0 ships exactly these; the counts pin
# the selection so a silently shrinking case index cannot pass as "all green".
EXPECTED_CASES_PER_GROUP: dict[str, int] = {
    "1": 16,
    "2": 11,
    "3": 7,
    "4": 10,
    "5": 20,
    "6": 145,
    "7": 37,
    "9": 54,
    "10": 1,
    "12": 90,
    "13": 126,
}

# Group 9 sends single messages of up to 16 MiB (9.1.6, 9.2.6); give the
# server headroom so a limit that counts framing or uses ">=" still passes.
MAX_MESSAGE_SIZE = 32 * 1024 * 1024

# Autobahn's verdicts, as kosoku reports them (`Behavior.value`,
# `BehaviorClose.value`). UNIMPLEMENTED is deliberately not a pass: it is what
# 12.x/13.x report when the server does not negotiate permessage-deflate.
PASSING_BEHAVIORS = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
PASSING_CLOSE_BEHAVIORS = frozenset({"OK", "INFORMATIONAL"})


@dataclass(frozen=True)
class Chunk:
    """A slice of the suite that runs in one kosoku process under one timeout.

    Attributes:
        name: label used in the summary and failure messages.
        patterns: case ids or ``*`` globs, matched like kosoku's ``-i``.
        compression: start the server with ``--compression deflate``.
        estimate: seconds the chunk took against ``wsroute_sync echo``, two
            chunks at a time on a busy two-core machine (the slowest run seen).
            Drives the longest-first schedule and the chunk's timeout.
    """

    name: str
    patterns: tuple[str, ...]
    compression: bool = False
    estimate: float = 5.0


def _subgroups(group: int, first: int, last: int) -> tuple[str, ...]:
    return tuple(f"{group}.{sub}.*" for sub in range(first, last + 1))


# Small chunks keep the blast radius of a hang small: a server that never
# answers a Close loses the rest of its chunk, not the rest of the suite.
# Groups 12/13 are most of the run time (1000 compressed round trips per
# case), so each of their sub-groups is its own chunk; that also lets two
# workers balance the load. Groups 1-10 run without compression: they test
# the default configuration, and kosoku offers no extension in them anyway.
CHUNKS: tuple[Chunk, ...] = (
    Chunk("1 framing", ("1.*",), estimate=2),
    Chunk("2 pings/pongs", ("2.*",), estimate=3),
    Chunk("3 reserved bits", ("3.*",), estimate=2),
    Chunk("4 opcodes", ("4.*",), estimate=3),
    Chunk("5 fragmentation", ("5.*",), estimate=5),
    Chunk("6.1-6.4 UTF-8 handling", _subgroups(6, 1, 4), estimate=8),
    Chunk("6.5-6.23 UTF-8 vectors", _subgroups(6, 5, 23), estimate=3),
    Chunk("7 close handling", ("7.*",), estimate=2),
    Chunk("9 limits/performance", ("9.*",), estimate=17),
    Chunk("10 misc", ("10.*",), estimate=1),
    Chunk("12.1 deflate json", ("12.1.*",), compression=True, estimate=45),
    Chunk("12.2 deflate bmp", ("12.2.*",), compression=True, estimate=290),
    Chunk("12.3 deflate text", ("12.3.*",), compression=True, estimate=345),
    Chunk("12.4 deflate html", ("12.4.*",), compression=True, estimate=64),
    Chunk("12.5 deflate pdf", ("12.5.*",), compression=True, estimate=213),
    *(
        Chunk(f"13.{sub} deflate params", (f"13.{sub}.*",), compression=True, estimate=est)
        for sub, est in ((1, 42), (2, 48), (3, 93), (4, 48), (5, 70), (6, 46), (7, 90))
    ),
)


def case_sort_key(case_id: str) -> tuple[int, ...]:
    """Numeric order: 1.2.10 after 1.2.9, 10.1.1 after 9.8.6."""
    return tuple(int(part) for part in case_id.split("."))


def group_of(case_id: str) -> str:
    """``"6.5.3"`` -> ``"6"``."""
    return case_id.split(".", 1)[0]


def select(case_ids: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The ids matching any pattern, in suite order.

    fnmatch, like kosoku's own ``-i`` globs: ``"6.1.*"`` matches ``6.1.3`` but
    not ``6.10.1`` because the literal ``"6.1."`` must match first.
    """
    chosen = {cid for cid in case_ids if any(fnmatch.fnmatchcase(cid, p) for p in patterns)}
    return sorted(chosen, key=case_sort_key)


def is_pass(behavior: str, behavior_close: str) -> bool:
    """Pass = OK, NON-STRICT or INFORMATIONAL, with an acceptable close."""
    return behavior in PASSING_BEHAVIORS and behavior_close in PASSING_CLOSE_BEHAVIORS
