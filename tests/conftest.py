"""Fixtures: the loopback Invoca-compatible server, started per test; the tests' order."""

from __future__ import annotations

import compileall
import logging
import os
import subprocess
import typing as t

import pytest
from frontends import FRONTENDS, Frontend
from helpers import ENV_PREFIX, ROOT
from invoca_server import Faults, InvocaServer

from tap_invoca_destinations.tap import RedactSecret


def pytest_configure(config: pytest.Config) -> None:
    """Compile the package's bytecode once, before any worker starts.

    Where PYTHONDONTWRITEBYTECODE is set (as on CI's machines) nothing writes the
    bytecode of the package, which is installed editable from this checkout, so
    every CLI run of the tap (hundreds per run of the suite, Meltano's included)
    would compile it again. Files already compiled are skipped; each Python
    writes its own (cpython-3XX) files.
    """
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        compileall.compile_dir(ROOT / "tap_invoca_destinations", quiet=1)


@pytest.hookimpl(optionalhook=True)  # PyAirbyte's environment (nox -s pyairbyte) has no xdist
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:  # noqa: ARG001 - the hook's signature
    """`-n auto`: one worker more than the cores, unless PYTEST_XDIST_AUTO_NUM_WORKERS says.

    Most tests spend most of their time waiting (on the tap's sockets and clocks,
    on a grace period, on Meltano's subprocesses), so a worker per core leaves
    the cores idle a good part of the run; the extra worker fills those gaps.
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own hook reads it
    return len(os.sched_getaffinity(0)) + 1


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


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: (certfile, keyfile)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture
def tls_server(certificate: tuple[str, str]) -> t.Iterator[InvocaServer]:
    """The local server over HTTPS (so requests trusts the environment, ~/.netrc included)."""
    server = InvocaServer(60).use_tls(*certificate).start()
    yield server
    server.stop()


@pytest.fixture(params=FRONTENDS, ids=str)
def frontend(request: pytest.FixtureRequest) -> Frontend:
    """Each front end of the engine in turn: the Singer tap, the Airbyte source."""
    return t.cast("Frontend", request.param)


@pytest.fixture(autouse=True)
def _no_earlier_secrets_in_logs() -> t.Iterator[None]:
    """Drop the redaction filters a test's taps put on the root log handlers.

    pytest reuses its capture handlers for every test, so a filter for an
    earlier test's token would rewrite later tests' log lines (which test came
    earlier depends on how xdist shares out the tests).
    """
    yield
    for handler in logging.getLogger().handlers:
        for stale in [f for f in handler.filters if isinstance(f, RedactSecret)]:
            handler.removeFilter(stale)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first, so that xdist's workers share them and end together.

    Reversed: the later ones in their file run more Meltano commands, and the
    longest should start first.
    """
    e2e = [item for item in items if item.get_closest_marker("e2e")]
    items[:] = e2e[::-1] + [item for item in items if not item.get_closest_marker("e2e")]
