"""CLI tests: the installed executable's --about, --discover, --version and config errors."""

from __future__ import annotations

import json
import subprocess
import sys
import typing as t

import pytest
from helpers import ROOT, clean_env, config_for, run_cli

from tap_invoca_destinations.records import COLUMNS

if t.TYPE_CHECKING:
    from pathlib import Path

    from invoca_server import InvocaServer

CONTRACT_SETTINGS = [
    "api_token", "network_id", "base_url", "api_version", "status",
    "include_inactive", "query", "page_size", "start_date",
]  # fmt: skip


def test_about_json_lists_every_setting(tmp_path: Path) -> None:
    run = run_cli(tmp_path, None, "--about", "--format=json")
    assert run.returncode == 0, run.stderr
    about = json.loads(run.stdout)
    properties = about["settings"]["properties"]
    for key in CONTRACT_SETTINGS:
        assert key in properties, key
        assert properties[key].get("description"), key
    assert properties["api_token"]["secret"] is True
    assert set(about["settings"]["required"]) == {"api_token", "network_id"}
    assert properties["base_url"]["default"] == "https://invoca.net"
    assert properties["api_version"]["default"] == "2022-08-01"
    assert properties["page_size"]["default"] == 100
    assert properties["include_inactive"]["default"] is True
    assert properties["status"]["enum"] == ["ignored", "tracked", "discovered"]


def test_about_markdown_lists_every_setting(tmp_path: Path) -> None:
    run = run_cli(tmp_path, None, "--about", "--format=markdown")
    assert run.returncode == 0, run.stderr
    for key in CONTRACT_SETTINGS:
        assert f"| {key}" in run.stdout, key


def test_discover_with_sample_config_prints_the_contract_schema(tmp_path: Path) -> None:
    config = json.loads((ROOT / "sample_config.json").read_text())
    run = run_cli(tmp_path, config, "--discover")
    assert run.returncode == 0, run.stderr
    catalog = json.loads(run.stdout)
    (stream,) = catalog["streams"]
    assert stream["tap_stream_id"] == "destinations"
    assert stream["key_properties"] == ["network_id", "id"]
    assert stream["replication_key"] == "updated_at"
    props = stream["schema"]["properties"]
    assert list(props) == list(COLUMNS)
    assert props["id"]["type"] == ["integer"]
    assert props["network_id"]["type"] == ["string"]  # half of the key: never null
    assert set(stream["schema"]["required"]) == {"network_id", "id"}
    assert props["created_at"] == {"format": "date-time", "type": ["string", "null"]}
    assert props["dynamic_number_pool_id"]["type"] == ["integer", "null"]
    assert props["dynamic_number_pool_preferred"]["type"] == ["boolean", "null"]
    assert props["dynamic_number_pool_max_pool_size"]["type"] == ["integer", "null"]


def test_discover_without_config(tmp_path: Path) -> None:
    run = run_cli(tmp_path, None, "--discover")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["streams"][0]["tap_stream_id"] == "destinations"


def test_version(tmp_path: Path) -> None:
    run = run_cli(tmp_path, None, "--version")
    assert run.returncode == 0
    assert "tap-invoca-destinations" in run.stdout
    assert "could not be detected" not in run.stdout


def test_python_dash_m_runs_the_tap(tmp_path: Path, server: InvocaServer) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_for(server)))
    result = subprocess.run(
        [sys.executable, "-m", "tap_invoca_destinations", "--config", str(config_path)],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(x) for x in result.stdout.splitlines() if '"RECORD"' in x]
    assert len(records) == 250


def test_cli_sync_writes_schema_records_state_in_order(
    tmp_path: Path, server: InvocaServer
) -> None:
    run = run_cli(tmp_path, config_for(server))
    assert run.returncode == 0, run.stderr
    types = [m["type"] for m in run.messages]
    assert types[0] == "SCHEMA"
    assert types[-1] == "STATE"
    assert types.count("RECORD") == 250
    assert run.records == server.expected_records()
    # Logs go to stderr only: stdout is pure Singer.
    assert all(line.startswith("{") for line in run.stdout.splitlines())


def test_network_id_as_integer_is_accepted(tmp_path: Path, server: InvocaServer) -> None:
    run = run_cli(tmp_path, config_for(server, network_id=int(server.network_id)))
    assert run.returncode == 0, run.stderr
    assert run.records[0]["network_id"] == server.network_id


BAD_CONFIGS: list[tuple[dict[str, t.Any], list[str]]] = [
    ({"network_id": "1234"}, ["api_token"]),
    ({"api_token": "x"}, ["network_id"]),
    ({}, ["api_token", "network_id"]),
    ({"api_token": "x", "network_id": "acme"}, ["network_id"]),
    ({"api_token": "x", "network_id": "1", "base_url": "http://invoca.net"}, ["base_url"]),
    ({"api_token": "x", "network_id": "1", "base_url": "http://10.1.2.3:80"}, ["base_url"]),
    ({"api_token": "x", "network_id": "1", "base_url": "ftp://invoca.net"}, ["base_url"]),
    (
        {"api_token": "x", "network_id": "1", "include_inactive": False, "status": "ignored"},
        ["include_inactive"],
    ),
    (
        {"api_token": "x", "network_id": "1", "include_inactive": False, "status": "discovered"},
        ["include_inactive"],
    ),
    ({"api_token": "x", "network_id": "1", "status": "active"}, ["status"]),
    ({"api_token": "x", "network_id": "1", "page_size": 0}, ["page_size"]),
    ({"api_token": "x", "network_id": "1", "start_date": "last tuesday"}, ["start_date"]),
    ({"api_token": "x", "network_id": "1", "start_date": "2023/10/19"}, ["start_date"]),
    ({"api_token": "x", "network_id": "1", "start_date": "2023-10-19T25:00:00Z"}, ["start_date"]),
    ({"api_token": "x", "network_id": "1", "emit_activate_version_messages": "false"}, ["emit"]),
]


@pytest.mark.parametrize(("config", "keys"), BAD_CONFIGS)
def test_bad_config_is_refused_before_any_request(
    tmp_path: Path, server: InvocaServer, config: dict[str, t.Any], keys: list[str]
) -> None:
    if "base_url" not in config:
        config = {**config, "base_url": server.url}
    run = run_cli(tmp_path, config)
    assert run.returncode != 0
    for key in keys:
        assert key in run.stderr, (key, run.stderr)
    assert "Traceback" not in run.stderr
    assert server.stats.requests == 0


def test_loopback_http_is_allowed(tmp_path: Path, server: InvocaServer) -> None:
    for host in ("localhost", "127.0.0.1"):
        url = server.url.replace("127.0.0.1", host)
        run = run_cli(tmp_path, config_for(server, base_url=url + "/"))
        assert run.returncode == 0, run.stderr
        assert len(run.records) == 250


def test_mistyped_token_is_never_printed(tmp_path: Path, server: InvocaServer) -> None:
    run = run_cli(tmp_path, {"api_token": 987654321, "network_id": "1", "base_url": server.url})
    assert run.returncode != 0
    assert "api_token" in run.stderr
    assert "987654321" not in run.stderr + run.stdout


def test_env_config_bad_integer_names_the_variable(tmp_path: Path) -> None:
    run = run_cli(
        tmp_path, None, "--config", "ENV",
        env={
            "TAP_INVOCA_DESTINATIONS_API_TOKEN": "x",
            "TAP_INVOCA_DESTINATIONS_NETWORK_ID": "1",
            "TAP_INVOCA_DESTINATIONS_PAGE_SIZE": "lots",
        },
    )  # fmt: skip
    assert run.returncode != 0
    assert "TAP_INVOCA_DESTINATIONS_PAGE_SIZE" in run.stderr
    assert "Traceback" not in run.stderr


def test_env_config_runs_a_sync(tmp_path: Path, server: InvocaServer) -> None:
    env = {
        "TAP_INVOCA_DESTINATIONS_API_TOKEN": server.token,
        "TAP_INVOCA_DESTINATIONS_NETWORK_ID": server.network_id,
        "TAP_INVOCA_DESTINATIONS_BASE_URL": server.url,
        "TAP_INVOCA_DESTINATIONS_PAGE_SIZE": "40",
    }
    run = run_cli(tmp_path, None, "--config", "ENV", env=env)
    assert run.returncode == 0, run.stderr
    assert len(run.records) == 250
    assert any("limit=41" in p for p in server.stats.paths)
