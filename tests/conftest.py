"""Fixtures: the loopback Invoca-compatible server, started per test."""

from __future__ import annotations

import os
import typing as t

import pytest
from frontends import FRONTENDS, Frontend
from helpers import ENV_PREFIX
from invoca_server import Faults, InvocaServer


@pytest.fixture
def make_server() -> t.Iterator[t.Callable[..., InvocaServer]]:
    """Factory for started servers; all are stopped after the test."""
    servers: list[InvocaServer] = []

    def factory(count: int = 250, *, faults: Faults | None = None, **kwargs: t.Any) -> InvocaServer:
        server = InvocaServer(count, faults=faults, **kwargs).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: t.Callable[..., InvocaServer]) -> InvocaServer:
    """A started server with 250 destinations and no faults."""
    return make_server(250)


@pytest.fixture(autouse=True)
def _no_tap_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


@pytest.fixture(params=FRONTENDS, ids=str)
def frontend(request: pytest.FixtureRequest) -> Frontend:
    """Each front end of the engine in turn: the Singer tap, the Airbyte source."""
    return t.cast("Frontend", request.param)
