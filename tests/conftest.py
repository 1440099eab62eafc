"""Shared pytest fixtures (real mosquitto brokers on free loopback ports, TLS certificates) and the
suite's marker rules: a test that uses a mosquitto fixture without the ``broker`` marker fails
collection (so ``-m "not broker"`` really leaves out every test needing mosquitto), and a test
over ``SLOW_S`` without the ``slow`` marker is named in the summary."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from tests.broker import Certs, MosquittoServer, make_certs, mosquitto_available

BROKER_FIXTURES = frozenset({"mosquitto"})  # fixtures that start a real mosquitto
SLOW_S = 20.0  # a test taking longer (call phase) belongs under the ``slow`` marker


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Refuse the run when a test needs mosquitto (directly or through another fixture) unmarked."""
    unmarked = [item.nodeid for item in items
                if BROKER_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("broker") is None]
    if unmarked:
        raise pytest.UsageError("these tests use a mosquitto fixture but lack @pytest.mark.broker: "
                                + ", ".join(unmarked))


_unmarked_slow: List[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.duration > SLOW_S and "slow" not in report.keywords:
        _unmarked_slow.append(f"{report.nodeid} ({report.duration:.0f} s)")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _unmarked_slow:
        terminalreporter.write_sep("-", f"took more than {SLOW_S:.0f} s without @pytest.mark.slow")
        for line in _unmarked_slow:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """CA, server (127.0.0.1/localhost) and client certificates, generated once per session."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Callable[..., MosquittoServer]]:
    """Factory: ``mosquitto(tls=certs, users={"u": "p"}, require_certificate=False, start=True,
    extra=["max_connections 1"], dynsec=("admin", "password"))`` (dynsec: the dynamic security
    plugin with a config file from ``mosquitto_ctrl dynsec init``).

    Each call returns a real mosquitto on its own free port; ``.stop()``, ``.start()`` and
    ``.restart()`` keep the port, so clients can reconnect.  All are stopped at teardown.
    """
    if not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    servers: List[MosquittoServer] = []
    counter = itertools.count()

    def factory(tls: Optional[Certs] = None, users: Optional[Dict[str, str]] = None,
                require_certificate: bool = False, start: bool = True,
                extra: Optional[List[str]] = None, dynsec: Optional[Tuple[str, str]] = None) -> MosquittoServer:
        workdir = tmp_path / f"mosquitto{next(counter)}"
        workdir.mkdir()
        server = MosquittoServer(workdir, certs=tls, users=users, require_certificate=require_certificate,
                                 extra=extra, dynsec=dynsec)
        servers.append(server)
        return server.start() if start else server

    yield factory
    for server in servers:
        server.close()
