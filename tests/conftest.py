"""Shared pytest fixtures: real mosquitto brokers on free loopback ports, TLS certificates."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from tests.broker import Certs, MosquittoServer, make_certs, mosquitto_available


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """CA, server (127.0.0.1/localhost) and client certificates, generated once per session."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Callable[..., MosquittoServer]]:
    """Factory: ``mosquitto(tls=certs, users={"u": "p"}, require_certificate=False, start=True)``.

    Each call returns a real mosquitto on its own free port; ``.stop()``, ``.start()`` and
    ``.restart()`` keep the port, so clients can reconnect.  All are stopped at teardown.
    """
    if not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    servers: List[MosquittoServer] = []
    counter = itertools.count()

    def factory(tls: Optional[Certs] = None, users: Optional[Dict[str, str]] = None,
                require_certificate: bool = False, start: bool = True) -> MosquittoServer:
        workdir = tmp_path / f"mosquitto{next(counter)}"
        workdir.mkdir()
        server = MosquittoServer(workdir, certs=tls, users=users, require_certificate=require_certificate)
        servers.append(server)
        return server.start() if start else server

    yield factory
    for server in servers:
        server.close()
