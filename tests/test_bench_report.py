"""benchmarks/bench.py's paired ratios: the A/B verdicts of the notes rest on them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def records(bench: Any, scenario: str, pairs: List[tuple]) -> List[Dict[str, Any]]:
    out = []
    for rnd, (ours, peer) in enumerate(pairs):
        for server, rate in ((bench.OURS, ours), ("gorilla", peer)):
            out.append({"server": server, "scenario": scenario, "placement": "pinned",
                        "round": rnd, "rate": rate})
    return out


def scenario(bench: Any, key: str) -> Any:
    return next(s for s in bench.SCENARIOS if s.key == key)


def test_a_steady_gap_is_reported_with_an_interval_that_excludes_one(bench: Any) -> None:
    # The peer's rate swings by 2x between rounds; ours is 0.9x of it in every round.
    rounds = [(90.0, 100.0), (180.0, 200.0), (99.0, 110.0), (135.0, 150.0), (171.0, 190.0)]
    text = bench.render_paired(records(bench, "c50", rounds), scenario(bench, "c50"), "pinned")
    assert "rate, paired by round:" in text
    line = next(l for l in text.splitlines() if "gorilla" in l.lower())
    assert "0.90x (90% interval 0.90-0.90)" in line
    assert "ours better in 0 of 5 rounds" in line


def test_a_noisy_tie_has_an_interval_around_one(bench: Any) -> None:
    rounds = [(110.0, 100.0), (90.0, 100.0), (105.0, 100.0), (95.0, 100.0)]
    text = bench.render_paired(records(bench, "churn", rounds), scenario(bench, "churn"),
                               "pinned")
    line = next(l for l in text.splitlines() if "gorilla" in l.lower())
    low, high = line.split("interval ")[1].split(")")[0].split("-")
    assert float(low) < 1.0 < float(high)
    assert "ours better in 2 of 4 rounds" in line


def test_fewer_than_three_rounds_print_nothing(bench: Any) -> None:
    rounds = [(90.0, 100.0), (180.0, 200.0)]
    assert bench.render_paired(records(bench, "c50", rounds), scenario(bench, "c50"),
                               "pinned") == ""
