"""Mirror mode: ACTIVATE_VERSION goes out only after the whole list was read."""

from __future__ import annotations

import json
import typing as t

import pytest
from helpers import config_for, full_table_catalog, run_cli
from invoca_server import Faults

if t.TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from invoca_server import InvocaServer


def messages_of(stdout: str) -> list[dict[str, t.Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_activate_version_follows_every_record(tmp_path: Path, server: InvocaServer) -> None:
    config = config_for(server, page_size=60, emit_activate_version_messages=True)
    run = run_cli(tmp_path, config, catalog=full_table_catalog(config))
    assert run.returncode == 0, run.stderr
    types = [m["type"] for m in run.messages]
    assert types.count("ACTIVATE_VERSION") == 1
    activate = types.index("ACTIVATE_VERSION")
    assert activate > max(i for i, kind in enumerate(types) if kind == "RECORD")
    version = run.messages[activate]["version"]
    assert all(m["version"] == version for m in run.messages if m["type"] == "RECORD")
    assert len(run.records) == 250


@pytest.mark.parametrize("failing_request", [1, 3, 5])
def test_a_failed_run_sends_no_activate_version(
    tmp_path: Path, make_server: Callable[..., InvocaServer], failing_request: int
) -> None:
    server = make_server(250, faults=Faults(status_every={failing_request: 403}))
    config = config_for(
        server, page_size=60, max_concurrency=1, emit_activate_version_messages=True
    )
    run = run_cli(tmp_path, config, catalog=full_table_catalog(config))
    assert run.returncode == 1
    assert "ACTIVATE_VERSION" not in run.stdout
    assert len(messages_of(run.stdout)) > 0  # the SCHEMA (and any records) went out


def test_without_the_setting_there_is_no_activate_version(
    tmp_path: Path, server: InvocaServer
) -> None:
    config = config_for(server)
    run = run_cli(tmp_path, config, catalog=full_table_catalog(config))
    assert run.returncode == 0, run.stderr
    assert all(m["type"] != "ACTIVATE_VERSION" for m in run.messages)
    assert all("version" not in m for m in run.messages)


@pytest.mark.parametrize(("value", "expected"), [("false", 0), ("true", 1)])
def test_the_setting_from_the_environment_is_a_boolean(
    tmp_path: Path, server: InvocaServer, value: str, expected: int
) -> None:
    env = {
        "TAP_INVOCA_DESTINATIONS_API_TOKEN": server.token,
        "TAP_INVOCA_DESTINATIONS_NETWORK_ID": server.network_id,
        "TAP_INVOCA_DESTINATIONS_BASE_URL": server.url,
        "TAP_INVOCA_DESTINATIONS_EMIT_ACTIVATE_VERSION_MESSAGES": value,
    }
    catalog = full_table_catalog(config_for(server))
    run = run_cli(tmp_path, None, "--config", "ENV", catalog=catalog, env=env)
    assert run.returncode == 0, run.stderr
    assert [m["type"] for m in run.messages].count("ACTIVATE_VERSION") == expected
