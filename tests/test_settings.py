"""Settings as a new user gives them: stray whitespace, env vars, .env, typos, files, bounds."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import socket
import subprocess
import sys
import typing as t
from pathlib import Path
from unittest import mock

import pytest
from helpers import ROOT, clean_env, config_for, full_table_catalog, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from singer_sdk.exceptions import ConfigValidationError

from tap_invoca_destinations.records import parse_instant
from tap_invoca_destinations.sdk_seam import environment_config
from tap_invoca_destinations.streams import DestinationsStream
from tap_invoca_destinations.tap import RedactSecret, TapInvocaDestinations

if t.TYPE_CHECKING:
    from invoca_server import InvocaServer

PREFIX = "TAP_INVOCA_DESTINATIONS_"


def env_for(server: InvocaServer) -> dict[str, str]:
    """The settings that reach the local server, as environment variables."""
    return {
        PREFIX + "API_TOKEN": server.token,
        PREFIX + "NETWORK_ID": server.network_id,
        PREFIX + "BASE_URL": server.url,
    }


BASE = {"api_token": "a-token-of-some-length", "network_id": "1234"}
# Each numeric setting: a value inside its bounds, and one outside.
NUMERIC = {
    "page_size": (40, 1001),
    "max_concurrency": (2, 17),
    "request_timeout": (30, 1e10),
    "max_tries": (3, 101),
    "max_retry_seconds": (30, 86401),
    "retry_initial_wait": (0.5, 121),
}
Factory = t.Callable[..., "InvocaServer"]


def errors_for(config: dict[str, t.Any]) -> list[str]:
    """The validation errors for ``config`` (empty when it is accepted)."""
    try:
        TapInvocaDestinations(config=config, parse_env_config=False)
    except ConfigValidationError as exc:
        return exc.errors
    return []


def accepted(config: dict[str, t.Any]) -> dict[str, t.Any]:
    """The config the tap works with, after its tidying."""
    return dict(TapInvocaDestinations(config=config, parse_env_config=False).config)


# --- string settings ---------------------------------------------------------------------

STRING_VALUES = {
    "network_id": "1234",
    "base_url": "https://acme.invoca.net",
    "api_version": "2022-08-01",
    "status": "tracked",
    "query": "202555",
    "user_agent": "etl/1.0",
    "api_token": "a-token-of-some-length",
}


@settings(max_examples=60, deadline=None)
@given(
    key=st.sampled_from(sorted(STRING_VALUES)),
    before=st.text(" \t\r\n", max_size=3),
    after=st.text(" \t\r\n", min_size=1, max_size=3),
)
def test_every_string_setting_is_stripped_of_surrounding_whitespace(
    key: str, before: str, after: str
) -> None:
    config = {**BASE, key: before + STRING_VALUES[key] + after}
    assert accepted(config)[key] == STRING_VALUES[key]


def test_a_network_id_with_a_final_newline_is_the_network(
    tmp_path: Path, server: InvocaServer
) -> None:
    run = run_cli(tmp_path, config_for(server, network_id=server.network_id + "\n"))
    assert run.returncode == 0, run.stderr
    assert {record["network_id"] for record in run.records} == {server.network_id}
    assert all(f"/{server.network_id}/customer_phone_numbers" in p for p in server.stats.paths)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("api_version", "\uff12\uff10\uff12\uff12-\uff10\uff18-\uff10\uff11"),  # fullwidth digits
        (
            "api_version",
            "\u0662\u0660\u0662\u0662-\u0660\u0668-\u0660\u0661",
        ),  # Arabic-Indic digits
        ("api_version", "2022-08-01x"),
        ("network_id", "\u0661\u0662\u0663\u0664"),
        ("network_id", "12 34"),
    ],
)
def test_non_ascii_digits_are_refused(key: str, value: str) -> None:
    errors = errors_for({**BASE, key: value})
    assert [e for e in errors if e.startswith(f"{key}:")], errors


# --- base_url ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://user:hunter22@acme.invoca.net", "user name or password"),
        ("https://user@acme.invoca.net", "user name or password"),
        ("https://acme.invoca.net/?oauth_token=abc", "query string"),
        ("https://acme.invoca.net?", "query string"),
        ("https://acme.invoca.net/#top", "fragment"),
        ("https://[::1", "not a URL"),
    ],
)
def test_base_url_with_credentials_query_or_fragment_is_refused(url: str, words: str) -> None:
    errors = errors_for({**BASE, "base_url": url})
    assert any(e.startswith("base_url:") and words in e for e in errors), errors
    assert "hunter22" not in " ".join(errors)


# --- numeric settings: bounds, strings, env vars ------------------------------------------


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_every_numeric_setting_is_bounded_and_named(key: str) -> None:
    good, bad = NUMERIC[key]
    assert errors_for({**BASE, key: good}) == []
    errors = errors_for({**BASE, key: bad})
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{key}: must be at most"), errors


@settings(max_examples=50, deadline=None)
@given(key=st.sampled_from(sorted(NUMERIC)), value=st.floats(allow_nan=True))
def test_numeric_settings_take_finite_values_within_bounds_only(key: str, value: float) -> None:
    prop = TapInvocaDestinations.settings_schema()["properties"][key]
    if "integer" in prop["type"] and math.isfinite(value):
        value = int(value)
    inside = (
        math.isfinite(value)
        and value <= prop["maximum"]
        and value >= prop.get("minimum", -math.inf)
        and value > prop.get("exclusiveMinimum", -math.inf)
    )
    errors = errors_for({**BASE, key: value})
    if inside:
        assert errors == []
    else:
        assert errors, value
        assert all(e.startswith(f"{key}:") for e in errors), errors


def test_request_timeout_of_1e10_is_refused_in_one_line(
    tmp_path: Path, server: InvocaServer
) -> None:
    run = run_cli(tmp_path, config_for(server, request_timeout=1e10))
    assert run.returncode == 1
    assert "request_timeout: must be at most 3600" in run.stderr
    assert "Traceback" not in run.stderr
    assert server.stats.requests == 0


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_numeric_settings_from_a_json_file_and_from_env(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, _ = NUMERIC[key]
    assert accepted({**BASE, key: good})[key] == good
    assert accepted({**BASE, key: str(good)})[key] == good  # how Meltano passes decimals
    for name, value in {**BASE, key: str(good)}.items():
        monkeypatch.setenv(PREFIX + name.upper(), value)
    tap = TapInvocaDestinations(config={}, parse_env_config=True)
    assert tap.config[key] == good


def test_every_numeric_setting_from_env_runs_a_sync(tmp_path: Path, server: InvocaServer) -> None:
    env = {
        **env_for(server),
        **{PREFIX + key.upper(): str(good) for key, (good, _) in NUMERIC.items()},
    }
    run = run_cli(tmp_path, None, "--config", "ENV", env=env)
    assert run.returncode == 0, run.stderr
    assert len(run.records) == 250
    assert any("limit=41" in p for p in server.stats.paths)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), key=st.sampled_from(sorted(NUMERIC)))
def test_a_number_reads_the_same_from_env_as_from_json(data: st.DataObject, key: str) -> None:
    schema = TapInvocaDestinations.settings_schema()
    integers = st.integers(-(10**12), 10**12)
    if "integer" in schema["properties"][key]["type"]:
        value: float = data.draw(integers)
    else:
        value = data.draw(st.one_of(integers, st.floats(allow_nan=False, allow_infinity=False)))
    with mock.patch.dict(os.environ, {PREFIX + key.upper(): f" {value!r}\n"}):
        config, errors = environment_config(schema, PREFIX, Path("/nonexistent"))
    assert errors == []
    assert config[key] == value
    assert json.loads(json.dumps(config))[key] == value  # plain JSON types, no Decimal


@pytest.mark.parametrize("value", ["abc", "1e999", "nan", "30s", "\uff13\uff10"])
def test_a_bad_number_in_env_names_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(PREFIX + "REQUEST_TIMEOUT", value)
    schema = TapInvocaDestinations.settings_schema()
    config, errors = environment_config(schema, PREFIX, tmp_path)
    assert "request_timeout" not in config
    assert errors == [f"{PREFIX}REQUEST_TIMEOUT must be a number"]


# --- .env ------------------------------------------------------------------------------------


def test_the_shell_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(f"{PREFIX}API_TOKEN=from-the-file\n{PREFIX}QUERY=202\n")
    shell_token = "from-the-shell"  # noqa: S105
    monkeypatch.setenv(PREFIX + "API_TOKEN", shell_token)
    config, errors = environment_config(TapInvocaDestinations.settings_schema(), PREFIX, tmp_path)
    assert errors == []
    assert config["api_token"] == shell_token
    assert config["query"] == "202"  # the file fills in what the shell lacks
    assert os.environ.get(PREFIX + "QUERY") is None  # read, not exported


def test_dotenv_is_read_from_the_working_directory(tmp_path: Path, server: InvocaServer) -> None:
    (tmp_path / ".env").write_text(f"{PREFIX}API_TOKEN={server.token}\n")
    env = {PREFIX + "NETWORK_ID": server.network_id, PREFIX + "BASE_URL": server.url}
    run = run_cli(tmp_path, None, "--config", "ENV", env=env)
    assert run.returncode == 0, run.stderr
    assert len(run.records) == 250


def test_a_wrong_token_in_dotenv_does_not_override_the_shell(
    tmp_path: Path, server: InvocaServer
) -> None:
    (tmp_path / ".env").write_text(f"{PREFIX}API_TOKEN=stale-token-from-a-file\n")
    env = env_for(server)
    run = run_cli(tmp_path, None, "--config", "ENV", env=env)
    assert run.returncode == 0, run.stderr


# --- files -----------------------------------------------------------------------------------


def tap_command() -> list[str]:
    return [str(Path(sys.executable).parent / "tap-invoca-destinations")]


def test_config_from_a_pipe(tmp_path: Path, server: InvocaServer) -> None:
    """`--config <(vault read ...)`: a pipe can be read only once."""
    read_end, write_end = os.pipe()
    os.write(write_end, json.dumps(config_for(server)).encode())
    os.close(write_end)
    try:
        result = subprocess.run(
            [*tap_command(), "--config", f"/dev/fd/{read_end}"],
            capture_output=True, text=True, timeout=120, env=clean_env(), cwd=tmp_path,
            pass_fds=(read_end,), check=False,
        )  # fmt: skip
    finally:
        os.close(read_end)
    assert result.returncode == 0, result.stderr
    assert (
        sum('"type":"RECORD"' in line.replace(" ", "") for line in result.stdout.splitlines())
        == 250
    )


@pytest.mark.parametrize("option", ["--config", "--state", "--catalog"])
@pytest.mark.parametrize("problem", ["missing", "folder"])
def test_a_file_option_that_cannot_be_read_is_one_line(
    tmp_path: Path, server: InvocaServer, option: str, problem: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(config_for(server)))
    bad = tmp_path / "nope.json"
    if problem == "folder":
        bad.mkdir()
    args = ["--config", str(config)] if option != "--config" else []
    result = subprocess.run(
        [*tap_command(), *args, option, str(bad)],
        capture_output=True, text=True, timeout=120, env=clean_env(), cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{option} {bad}" in lines[0]
    assert server.stats.requests == 0


# --- catalog ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["id", "phone_number", "created_at"])
def test_a_replication_key_other_than_updated_at_is_refused(
    tmp_path: Path, server: InvocaServer, key: str
) -> None:
    config = config_for(server)
    catalog = full_table_catalog(config)
    entry = catalog["streams"][0]
    entry["replication_key"] = key
    entry["replication_method"] = "INCREMENTAL"
    for item in entry["metadata"]:
        if item["breadcrumb"] == []:
            item["metadata"]["replication-key"] = key
            item["metadata"]["forced-replication-method"] = "INCREMENTAL"
    run = run_cli(tmp_path, config, catalog=catalog)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, run.stderr
    assert "replication-key 'updated_at'" in errors[0]
    assert repr(key) in errors[0]
    assert server.stats.requests == 0
    assert run.stdout == ""


def test_the_key_columns_are_required_and_never_null() -> None:
    schema = DestinationsStream.schema
    assert set(schema["required"]) == {"network_id", "id"}
    assert schema["properties"]["network_id"]["type"] == ["string"]
    assert schema["properties"]["id"]["type"] == ["integer"]


# --- start_date --------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    moment=st.datetimes(
        min_value=dt.datetime(1971, 1, 1),  # noqa: DTZ001 - made aware below
        max_value=dt.datetime(2999, 12, 31),  # noqa: DTZ001
        timezones=st.just(dt.UTC),
    ).map(lambda m: m.replace(microsecond=0)),
    offset_minutes=st.integers(-23 * 60, 23 * 60),
)
def test_iso_basic_and_extended_forms_are_the_same_instant(
    moment: dt.datetime, offset_minutes: int
) -> None:
    local = moment.astimezone(dt.timezone(dt.timedelta(minutes=offset_minutes)))
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    extended = local.strftime("%Y-%m-%dT%H:%M:%S") + f"{sign}{hours:02d}:{minutes:02d}"
    basic = local.strftime("%Y%m%dT%H%M%S") + f"{sign}{hours:02d}{minutes:02d}"
    assert parse_instant(extended) == parse_instant(basic) == moment


@pytest.mark.parametrize(
    "value",
    [
        "20240101T000000Z",
        "20240101",
        "20240101T0000Z",
        "20240101T000000.5+0100",
        "2024-01-01T00:00:00+01",
    ],
)
def test_start_date_in_iso_basic_form_is_accepted(value: str) -> None:
    assert errors_for({**BASE, "start_date": value}) == []


@pytest.mark.parametrize(
    "value", ["\uff12\uff10\uff12\uff14-01-01", "2024-W01-1", "20240101T00:00:00Z", "2024011"]
)
def test_start_date_in_other_forms_is_refused(value: str) -> None:
    errors = errors_for({**BASE, "start_date": value})
    assert [e for e in errors if e.startswith("start_date:")], errors


# --- typos, placeholders, warnings --------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("page_sise", "page_size"), ("netwrok_id", "network_id"), ("api_tokn", "api_token")],
)
def test_a_misspelt_setting_is_warned_about_with_the_closest_name(
    typo: str, meant: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        TapInvocaDestinations(config={**BASE, typo: 5}, parse_env_config=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(typo in w and f"did you mean '{meant}'" in w for w in warnings), warnings


def test_sample_config_as_shipped_is_refused_up_front(tmp_path: Path) -> None:
    config = json.loads((ROOT / "sample_config.json").read_text())
    run = run_cli(tmp_path, config)
    assert run.returncode == 1
    assert "api_token: still the placeholder from sample_config.json" in run.stderr
    assert "network_id: still the placeholder from sample_config.json" in run.stderr
    assert "ConnectionError" not in run.stderr
    assert "Traceback" not in run.stderr


def start_demo_server(*args: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "invoca_server.py"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    return process, line.split(" on ", 1)[1].split(" ", 1)[0]


def test_a_clean_run_against_the_demo_server_logs_no_warning(tmp_path: Path) -> None:
    """As Meltano runs it: a config file, TAP_* variables set, an incremental catalog."""
    process, url = start_demo_server("--port", "0", "--count", "300", "--no-drift")
    try:
        config = {"api_token": "local-test-token", "network_id": "1234", "base_url": url}
        catalog = full_table_catalog(config)
        entry = catalog["streams"][0]
        entry["replication_method"] = "INCREMENTAL"
        for item in entry["metadata"]:
            if item["breadcrumb"] == []:
                item["metadata"]["forced-replication-method"] = "INCREMENTAL"
        env = {PREFIX + "API_TOKEN": "local-test-token", PREFIX + "BASE_URL": url}
        run = run_cli(tmp_path, config, catalog=catalog, env=env)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert run.returncode == 0, run.stderr
    assert len(run.records) == 300
    assert run.states[-1]["bookmarks"]["destinations"]["replication_key_value"]
    assert "WARNING" not in run.stderr, run.stderr


def test_the_demo_server_on_a_taken_port_fails_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "invoca_server.py"), "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        demo = subprocess.run(
            ["bash", str(ROOT / "scripts" / "demo")],
            capture_output=True, text=True, timeout=60, check=False,
            env={**clean_env(), "DEMO_PORT": str(port)},
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"invoca_server: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert demo.returncode == 1
    assert demo.stderr.strip().splitlines() == [
        f"scripts/demo: port {port} is taken by another program; free it or set DEMO_PORT"
    ]


# --- short tokens ---------------------------------------------------------------------------------


def test_a_short_token_is_redacted_as_a_whole_word_only() -> None:
    redact = RedactSecret("x").redact
    text = "HTTP 401 for GET /api/x.json: token 'x' rejected (Authorization: x); next"
    assert redact(text) == (
        "HTTP 401 for GET /api/<redacted>.json: token '<redacted>' rejected "
        "(Authorization: <redacted>); next"
    )
    assert redact("extra text, max, xx, ax") == "extra text, max, xx, ax"


WORD = st.text("abcXYZ019", min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(secret=st.text("abc019-_.'\"\\", min_size=1, max_size=7), words=st.lists(WORD, max_size=8))
def test_short_secrets_never_survive_alone_and_leave_other_words(
    secret: str, words: list[str]
) -> None:
    redact = RedactSecret(secret).redact
    line = " ".join([*words, secret, repr(secret), json.dumps(secret)])
    out = redact(line)
    assert f" {secret} " not in f" {out} "
    assert repr(secret) not in out
    kept = [w for w in words if secret not in w]
    assert all(w in out for w in kept)
