"""Rules of the test suite itself, enforced: markers that select tests are complete, and test
modules share helpers through tests/helpers.py, never by importing each other."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def run_pytest(tmp_path: Path, source: str, *args: str, conftest: str = "") -> subprocess.CompletedProcess:
    """pytest on one test module, under this suite's conftest hooks and fixtures."""
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import mosquitto, pytest_collection_modifyitems  # noqa: F401\n"
        "from tests.conftest import pytest_runtest_logreport, pytest_terminal_summary  # noqa: F401\n"
        + conftest)
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore", *args, str(tmp_path)],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)


def collect(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    return run_pytest(tmp_path, source, "--collect-only")


def test_a_test_using_mosquitto_without_the_broker_marker_fails_collection(tmp_path):
    proc = collect(tmp_path, """
        import pytest

        @pytest.fixture
        def env(mosquitto):
            return mosquitto

        def test_direct(mosquitto):
            pass

        def test_through_a_fixture(env):
            pass

        @pytest.mark.broker
        def test_marked(mosquitto):
            pass

        def test_no_broker():
            pass
        """)
    assert proc.returncode != 0, proc.stdout
    out = proc.stdout + proc.stderr
    error = next((line for line in out.splitlines() if "lack @pytest.mark.broker" in line), None)
    assert error is not None, out
    assert "test_sample.py::test_direct" in error and "test_sample.py::test_through_a_fixture" in error
    assert "test_marked" not in error and "test_no_broker" not in error


def test_marked_broker_tests_collect(tmp_path):
    proc = collect(tmp_path, """
        import pytest

        pytestmark = pytest.mark.broker

        def test_direct(mosquitto):
            pass
        """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 test collected" in proc.stdout


def test_a_long_test_without_the_slow_marker_is_named(tmp_path):
    proc = run_pytest(tmp_path, """
        import time
        import pytest

        def test_long_unmarked():
            time.sleep(0.3)  # the duration under test, not a wait

        @pytest.mark.slow
        def test_long_marked():
            time.sleep(0.3)

        def test_short():
            pass
        """, conftest="import tests.conftest\ntests.conftest.SLOW_S = 0.2\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout[proc.stdout.index("without @pytest.mark.slow"):]
    assert "test_sample.py::test_long_unmarked" in summary
    assert "test_long_marked" not in summary and "test_short" not in summary


def test_test_modules_do_not_import_each_other():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.startswith("tests.") and n.rsplit(".", 1)[-1].startswith("test_")]
    assert offenders == []
