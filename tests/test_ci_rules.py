"""The suite's own rules: with CI=true a skip fails, saying why; a dying thread fails;
``error_logs`` collects the library's ERROR records."""

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

    def test_needs_a_module():
        pytest.importorskip("wsroute_sync_no_such_module")

    @pytest.fixture
    def nginx():
        pytest.skip("nginx is not installed")

    def test_needs_nginx(nginx):
        pass

    @pytest.mark.xfail(reason="known", strict=True)
    def test_expected_failure():
        assert False

    @pytest.mark.xfail(reason="not run", run=False)
    def test_not_run():
        assert False
"""


def test_a_skip_fails_under_ci(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, SKIPPING, ci=True)
    assert result.returncode == 1, result.stdout
    for reason in ("chromium is not installed", "no redis-server", "nginx is not installed",
                   "could not import 'wsroute_sync_no_such_module'"):
        assert f"CI=true: this test would skip: {reason}" in result.stdout, result.stdout
    # A skip in the call fails the test; one in set-up (a skipif mark, a fixture) fails
    # the set-up, which pytest counts as an error. xfail is left alone, even unrun.
    assert "2 failed, 2 xfailed, 2 errors" in result.stdout, result.stdout


def test_a_skip_is_a_skip_elsewhere(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, SKIPPING, ci=False)
    assert result.returncode == 0, result.stdout
    assert "4 skipped, 2 xfailed" in result.stdout, result.stdout


def test_a_module_that_skips_while_collected_fails_under_ci(tmp_path: Path) -> None:
    body = """
        import pytest

        pytest.importorskip("wsroute_sync_no_such_module")

        def test_never_collected():
            pass
    """
    result = run_pytest(tmp_path, body, ci=True)
    assert result.returncode != 0, result.stdout
    assert ("CI=true: this test would skip: could not import 'wsroute_sync_no_such_module'"
            in result.stdout), result.stdout
    assert "1 error" in result.stdout, result.stdout
    (tmp_path / "conftest.py").unlink()
    result = run_pytest(tmp_path, body, ci=False)
    assert result.returncode == 5, result.stdout  # nothing ran, nothing failed
    assert "1 skipped" in result.stdout, result.stdout


def test_a_thread_that_dies_fails_the_test(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, """
        import threading

        import pytest

        def test_dies():
            t = threading.Thread(target=lambda: 1 / 0, name="doomed")
            t.start()
            t.join()

        @pytest.fixture
        def late():
            # Dies after the test, while the leak check waits for it.
            release = threading.Event()

            def work():
                release.wait()
                raise KeyError("late")

            yield threading.Thread(target=work, name="late-dier")
            release.set()

        def test_dies_after_the_test(late):
            late.start()

        def test_lives():
            t = threading.Thread(target=lambda: None, name="fine")
            t.start()
            t.join()
    """, ci=False)
    assert result.returncode == 1, result.stdout
    assert "threads died: ['doomed: ZeroDivisionError: division by zero']" in result.stdout
    assert "threads died: [\"late-dier: KeyError: 'late'\"]" in result.stdout, result.stdout
    # The death fails the test's teardown: pytest counts the test passed and errored.
    assert "3 passed" in result.stdout and "2 errors" in result.stdout, result.stdout


def test_error_logs_collects_the_library_errors(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, """
        import logging

        def test_collects(error_logs):
            logging.getLogger("wsroute_sync.server").error("boom %d", 1)
            logging.getLogger("wsroute_sync").warning("only a warning")
            logging.getLogger("elsewhere").error("not ours")
            assert error_logs.messages() == ["boom 1"]

        def test_reports(error_logs):
            try:
                1 / 0
            except ZeroDivisionError:
                logging.getLogger("wsroute_sync.connection").error("failed", exc_info=True)
            error_logs.assert_none()

        def test_quiet(error_logs):
            error_logs.assert_none()

        def test_removed():
            assert logging.getLogger("wsroute_sync").handlers == []
    """, ci=False)
    assert result.returncode == 1, result.stdout
    for line in ("AssertionError: ERROR logs:", "wsroute_sync.connection: failed",
                 "ZeroDivisionError: division by zero"):
        assert line in result.stdout, result.stdout
    assert "not ours" not in result.stdout.partition("test_reports")[2], result.stdout
    assert "1 failed, 3 passed" in result.stdout, result.stdout
