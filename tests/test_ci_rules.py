"""The suite's own rules: with CI=true a skip fails, saying why; a dying thread fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_pytest(tmp_path: Path, body: str, ci: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )


SKIPPING = """
    import pytest

    def test_needs_a_browser():
        pytest.skip("chromium is not installed")

    @pytest.mark.skipif(True, reason="no redis-server")
    def test_needs_redis():
        pass

    @pytest.mark.xfail(reason="known", strict=True)
    def test_expected_failure():
        assert False
"""


def test_a_skip_fails_under_ci(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, SKIPPING, ci=True)
    assert result.returncode == 1, result.stdout
    assert "CI=true: this test would skip: chromium is not installed" in result.stdout
    assert "CI=true: this test would skip: no redis-server" in result.stdout
    # A skip in the call fails the test; a skipif (set-up) fails its set-up: an error.
    assert "1 failed, 1 xfailed, 1 error" in result.stdout


def test_a_skip_is_a_skip_elsewhere(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, SKIPPING, ci=False)
    assert result.returncode == 0, result.stdout
    assert "2 skipped, 1 xfailed" in result.stdout


def test_a_thread_that_dies_fails_the_test(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, """
        import threading

        def test_dies():
            t = threading.Thread(target=lambda: 1 / 0, name="doomed")
            t.start()
            t.join()
    """, ci=False)
    assert result.returncode == 1, result.stdout
    assert "threads died: ['doomed: ZeroDivisionError" in result.stdout
