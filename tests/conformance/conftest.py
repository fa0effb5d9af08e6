"""Registers the ``conformance`` marker.

The Autobahn run lives in ``tests/test_conformance.py``. pytest loads this file
when it collects ``tests/`` (the default run, since ``conformance/`` sorts before
``test_conformance.py``). Running that one file on its own skips this conftest,
so the marker is also worth declaring in ``setup.cfg`` (``markers =``).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "conformance: Autobahn|Testsuite run against the echo server via kosoku "
        "(about 4 minutes on two cores; deselect with -m 'not conformance')",
    )
