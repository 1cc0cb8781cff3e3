"""The Airbyte source: every command over real HTTP, every line validated with the models.

Scenarios both front ends share (hostile servers, stalls, signals, a closed pipe,
the bookmark rules) run through the ``frontend`` fixture in their own modules;
this module covers what is Airbyte's own: the commands, messages, state forms and
failure types, and the Dockerfile's contract.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import time
import tomllib
import typing as t

import pytest
from frontends import (
    AIRBYTE,
    BIN,
    Frontend,
    airbyte_catalog,
    check_airbyte_run,
    validate_airbyte_lines,
)
from helpers import ROOT, clean_env, config_for, run_cli, sigterm_once_asked
from hypothesis import given, settings
from hypothesis import strategies as st
from invoca_server import Faults, InvocaServer
from jsonschema import Draft7Validator

from tap_invoca_destinations.airbyte import STATE_EVERY_RECORDS, SourceError, bookmark_from_state
from tap_invoca_destinations.tap import TapInvocaDestinations

if t.TYPE_CHECKING:
    from pathlib import Path

Factory = t.Callable[..., InvocaServer]
SOURCE = str(BIN / "source-invoca-destinations")
DESCRIPTOR = {"stream_descriptor": {"name": "destinations"}}
TOKEN = "SECRET-ab-9c2e'\"\\x"  # noqa: S105 - a marker to search for, with quotes and a backslash


def source(
    tmp_path: Path,
    *args: str,
    config: dict[str, t.Any] | None = None,
    catalog: dict[str, t.Any] | None = None,
    state: object = None,
    timeout: float = 60,
) -> tuple[int, list[dict[str, t.Any]], str]:
    """Run one command; return its exit code, its validated messages and stderr."""
    command = [SOURCE, *args]
    for option, value in (("--config", config), ("--catalog", catalog), ("--state", state)):
        if value is not None:
            path = tmp_path / f"{option[2:]}.json"
            path.write_text(json.dumps(value))
            command += [option, str(path)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        cwd=tmp_path,
        check=False,
    )
    messages = validate_airbyte_lines(result.stdout)
    assert TOKEN not in result.stdout + result.stderr
    return result.returncode, messages, result.stderr


def only(messages: list[dict[str, t.Any]], kind: str) -> dict[str, t.Any]:
    assert [m["type"] for m in messages] == [kind], messages
    return messages[0]


def trace_error(messages: list[dict[str, t.Any]]) -> dict[str, t.Any]:
    check_airbyte_run(1, messages)
    traces = [m["trace"] for m in messages if m["type"] == "TRACE"]
    errors = [trace["error"] for trace in traces if trace["type"] == "ERROR"]
    assert len(errors) == 1, messages
    return errors[0]


# --- spec -------------------------------------------------------------------------


def test_spec_is_the_taps_own_settings_as_a_valid_json_schema(tmp_path: Path) -> None:
    code, messages, _ = source(tmp_path, "spec")
    assert code == 0
    spec = only(messages, "SPEC")["spec"]
    schema = spec["connectionSpecification"]
    Draft7Validator.check_schema(schema)
    assert schema["required"] == ["api_token", "network_id"]
    assert schema["properties"]["api_token"]["airbyte_secret"] is True
    own = dict(TapInvocaDestinations.config_jsonschema["properties"])
    for builtin in ("stream_maps", "stream_map_config", "faker_config", "flattening_enabled"):
        assert builtin in TapInvocaDestinations.settings_schema()["properties"]
        assert builtin not in schema["properties"]
    assert "emit_activate_version_messages" not in schema["properties"]  # Singer-only
    for key, prop in schema["properties"].items():
        assert prop.get("default") == own[key].get("default"), key
        assert prop["type"] == own[key]["type"], key
        assert prop["title"]
        assert prop["description"]
    assert spec["supportsIncremental"] is True


def test_a_config_valid_for_the_spec_is_valid_for_the_tap(
    tmp_path: Path, server: InvocaServer
) -> None:
    _, messages, _ = source(tmp_path, "spec")
    schema = messages[0]["spec"]["connectionSpecification"]
    config = config_for(server, page_size=10, status="tracked")
    assert not list(Draft7Validator(schema).iter_errors(config))
    assert list(Draft7Validator(schema).iter_errors({"network_id": "1"}))  # no token


# --- check ------------------------------------------------------------------------


def test_check_succeeds_with_one_request(tmp_path: Path, make_server: Factory) -> None:
    server = make_server(250, token=TOKEN)
    code, messages, _ = source(tmp_path, "check", config=config_for(server))
    assert code == 0
    assert only(messages, "CONNECTION_STATUS")["connectionStatus"] == {"status": "SUCCEEDED"}
    assert server.stats.requests == 1


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"api_token": "wrong"}, "the token was rejected"),
        ({"network_id": "999"}, "HTTP 404"),
        ({"base_url": "http://example.com"}, "base_url: plain http is refused"),
        ({"page_size": 0}, "page_size"),
    ],
)
def test_check_fails_with_the_taps_one_line_reason(
    tmp_path: Path, make_server: Factory, change: dict[str, t.Any], needle: str
) -> None:
    server = make_server(10, token=TOKEN)
    code, messages, _ = source(tmp_path, "check", config={**config_for(server), **change})
    assert code == 0  # the check ran; its answer is FAILED
    status = only(messages, "CONNECTION_STATUS")["connectionStatus"]
    assert status["status"] == "FAILED"
    assert needle in status["message"]
    assert "\n" not in status["message"]


def test_a_signal_during_check_is_one_line_about_the_check(
    tmp_path: Path, make_server: Factory
) -> None:
    server = make_server(10, token=TOKEN, faults=Faults(slow_every=1, slow_seconds=20))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_for(server)))
    run = sigterm_once_asked([SOURCE, "check", "--config", str(config_path)], server, tmp_path)
    stderr = run.stderr.decode()
    assert run.returncode == 143, stderr
    assert [line for line in stderr.splitlines() if "ERROR" in line][-1].endswith(
        "Check stopped by SIGTERM"
    )
    assert "STATE" not in stderr
    assert run.stdout == b""


def test_check_of_an_unreachable_host_fails_within_the_request_timeout(tmp_path: Path) -> None:
    config = {"api_token": TOKEN, "network_id": "1", "base_url": "http://127.0.0.1:9"}
    began = time.monotonic()
    code, messages, _ = source(tmp_path, "check", config={**config, "request_timeout": 2})
    assert time.monotonic() - began < 15  # one try; the Singer sync would retry for minutes
    status = only(messages, "CONNECTION_STATUS")["connectionStatus"]
    assert code == 0
    assert status["status"] == "FAILED"
    assert "ConnectionError" in status["message"]


# --- discover ---------------------------------------------------------------------


def test_discover_declares_the_singer_streams_columns_keys_and_cursor(
    tmp_path: Path, server: InvocaServer
) -> None:
    code, messages, _ = source(tmp_path, "discover", config=config_for(server))
    assert code == 0
    (stream,) = only(messages, "CATALOG")["catalog"]["streams"]
    singer = run_cli(tmp_path, config_for(server), "--discover")
    singer_schema = json.loads(singer.stdout)["streams"][0]["schema"]
    assert stream["json_schema"] == singer_schema
    assert stream["name"] == "destinations"
    assert stream["supported_sync_modes"] == ["full_refresh", "incremental"]
    assert stream["source_defined_cursor"] is True
    assert stream["default_cursor_field"] == ["updated_at"]
    assert stream["source_defined_primary_key"] == [["network_id"], ["id"]]
    assert server.stats.requests == 0


def test_bad_settings_are_a_config_error_with_the_taps_messages(tmp_path: Path) -> None:
    config = {"api_token": TOKEN, "network_id": "acme", "page_size": 0}
    code, messages, stderr = source(tmp_path, "discover", config=config)
    assert code == 1
    error = trace_error(messages)
    assert error["failure_type"] == "config_error"
    singer = run_cli(tmp_path, config, "--discover")
    for key in ("network_id", "page_size"):
        assert key in error["message"]
        singer_line = next(line for line in singer.stderr.splitlines() if key in line)
        assert singer_line.strip().lstrip("- ").split(": ", 1)[-1] in error["message"]
    assert "Traceback" not in stderr


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    code, messages, _ = source(tmp_path, "discover", "--config", missing)
    assert code == 1
    error = trace_error(messages)
    assert error["failure_type"] == "config_error"
    assert "nope.json" in error["message"]


# --- read -------------------------------------------------------------------------


def test_full_refresh_reads_the_list_as_the_singer_tap_does(
    tmp_path: Path, server: InvocaServer
) -> None:
    code, messages, _ = source(
        tmp_path, "read", config=config_for(server), catalog=airbyte_catalog("full_refresh")
    )
    assert code == 0
    check_airbyte_run(code, messages)
    records = [m["record"] for m in messages if m["type"] == "RECORD"]
    assert {r["stream"] for r in records} == {"destinations"}
    singer = run_cli(tmp_path, config_for(server))
    assert [r["data"] for r in records] == singer.records
    assert [r["id"] for r in singer.records] == server.ids()
    statuses = [
        m["trace"]["stream_status"]["status"]
        for m in messages
        if m["type"] == "TRACE" and m["trace"]["type"] == "STREAM_STATUS"
    ]
    assert statuses == ["STARTED", "RUNNING", "COMPLETE"]
    (state,) = [m["state"] for m in messages if m["type"] == "STATE"]
    assert state["type"] == "STREAM"
    assert state["stream"] == {"stream_descriptor": {"name": "destinations"}, "stream_state": {}}
    assert state["sourceStats"]["recordCount"] == len(records)
    assert messages.index(messages[-2]) == len(messages) - 2  # STATE, then COMPLETE
    emitted = [r["emitted_at"] for r in records]
    assert all(isinstance(e, int) and e > 1_600_000_000_000 for e in emitted)


def pyairbyte_dump(state: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    """The state as PyAirbyte hands it back: a pydantic dump with nulls and stats."""
    descriptor = {**state["stream"]["stream_descriptor"], "namespace": None}
    stream = {"stream_descriptor": descriptor, "stream_state": state["stream"]["stream_state"]}
    return [
        {
            "type": "STREAM",
            "stream": stream,
            "global_": None,
            "data": None,
            "sourceStats": state["sourceStats"],
            "destinationStats": None,
        }
    ]


def test_incremental_round_trip_with_pyairbyte_state(tmp_path: Path, server: InvocaServer) -> None:
    catalog = airbyte_catalog("incremental")
    code, messages, _ = source(tmp_path, "read", config=config_for(server), catalog=catalog)
    assert code == 0
    state = [m["state"] for m in messages if m["type"] == "STATE"][-1]
    bookmark = state["stream"]["stream_state"]["updated_at"]
    greatest = max(r["updated_at"] for r in server.expected_records() if r["updated_at"])
    assert bookmark == greatest
    changed = server.ids()[3]
    server.touch([changed], dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1))
    code, again, _ = source(
        tmp_path, "read", config=config_for(server), catalog=catalog, state=pyairbyte_dump(state)
    )
    assert code == 0
    check_airbyte_run(code, again)
    data = [m["record"]["data"] for m in again if m["type"] == "RECORD"]
    assert changed in {r["id"] for r in data}
    assert all(r["updated_at"] is None or r["updated_at"] >= bookmark for r in data)
    assert any(r["updated_at"] is None for r in data)  # null updated_at: always sent
    assert len(data) < 250


def test_checkpoints_count_exactly_and_never_move_the_bookmark(
    tmp_path: Path, make_server: Factory
) -> None:
    count = 2 * STATE_EVERY_RECORDS + 500
    server = make_server(count)
    old = "2020-01-01T00:00:00+00:00"  # older than every record: all are read
    start = AIRBYTE.state_with(old)
    code, messages, _ = source(
        tmp_path, "read", config=config_for(server), catalog=airbyte_catalog(), state=[start]
    )
    assert code == 0
    states = [m["state"] for m in messages if m["type"] == "STATE"]
    assert [s["sourceStats"]["recordCount"] for s in states] == [
        STATE_EVERY_RECORDS,
        STATE_EVERY_RECORDS,
        500,
    ]
    assert [s["stream"]["stream_state"] for s in states[:2]] == [{"updated_at": old}] * 2
    assert states[-1]["stream"]["stream_state"]["updated_at"] > old
    # Each count is exactly the records between it and the STATE before it.
    seen = 0
    for message in messages:
        if message["type"] == "RECORD":
            seen += 1
        elif message["type"] == "STATE":
            assert message["state"]["sourceStats"]["recordCount"] == seen
            seen = 0


@pytest.mark.parametrize(
    ("faults", "config", "failure_type", "needle"),
    [
        (Faults(), {"api_token": "wrong"}, "config_error", "HTTP 401"),
        (Faults(), {"network_id": "999"}, "config_error", "HTTP 404"),
        (Faults(status_every={2: 403}), {}, "config_error", "HTTP 403"),
        (Faults(fail_every=1, fail_status=503), {"max_tries": 2}, "transient_error", "gave up"),
        (Faults(ignore_start=True), {}, "system_error", "ignores 'start'"),
        (Faults(non_utf8_every=2), {}, "system_error", "not UTF-8"),
        (Faults(total_form="plus_one"), {}, "transient_error", "recordsTotal says 301"),
    ],
)
def test_failures_are_one_trace_error_of_the_right_type(  # noqa: PLR0913, PLR0917
    tmp_path: Path,
    make_server: Factory,
    faults: Faults,
    config: dict[str, t.Any],
    failure_type: str,
    needle: str,
) -> None:
    server = make_server(300, faults=faults, token=TOKEN)
    code, messages, stderr = source(
        tmp_path, "read", config={**config_for(server), **config}, catalog=airbyte_catalog()
    )
    assert code == 1
    error = trace_error(messages)
    assert error["failure_type"] == failure_type
    assert needle in error["message"]
    assert "\n" not in error["message"]
    assert "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if "Sync failed" in line]) == 1
    assert not [m for m in messages if m["type"] == "STATE"]


@pytest.mark.parametrize("bad", [0, 30])
def test_running_is_reported_only_once_a_record_is_out(
    tmp_path: Path, make_server: Factory, bad: int
) -> None:
    server = make_server(250)
    victim = server.ids()[bad]
    wire = server.wire_record(victim)
    wire["dynamic_number_pool"] = {"max_pool_size": "twelve"}
    server.set_wire(victim, wire)
    run = AIRBYTE.run(tmp_path, config_for(server, page_size=50, max_concurrency=1))
    statuses = [
        m["trace"]["stream_status"]["status"]
        for m in run.messages
        if m["type"] == "TRACE" and m["trace"]["type"] == "STREAM_STATUS"
    ]
    assert run.returncode == 1
    assert sum(m["type"] == "RECORD" for m in run.messages) == bad  # those before the bad one
    running = ["RUNNING"] if bad else []
    assert statuses == ["STARTED", *running, "INCOMPLETE"]


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        ([AIRBYTE.state_with("last tuesday")], "not a timestamp"),
        ([AIRBYTE.state_with(1697687361)], "not a timestamp"),
        ([{"type": "STREAM", "stream": {"stream_state": {}}}], "stream_descriptor"),
        (
            [
                {
                    "type": "STREAM",
                    "stream": {
                        "stream_descriptor": {"name": "destinations"},
                        "stream_state": {"cursor": "x"},
                    },
                }
            ],
            "has no 'updated_at'",
        ),
        ([AIRBYTE.state_with("2023-01-01"), AIRBYTE.state_with("2023-02-01")], "2 states"),
        (["not a message"], "expected state messages"),
        ([{"type": "PER_PARTITION"}], "unknown state type"),
    ],
)
def test_an_unusable_state_is_a_config_error_before_any_request(
    tmp_path: Path, server: InvocaServer, state: object, needle: str
) -> None:
    code, messages, _ = source(
        tmp_path, "read", config=config_for(server), catalog=airbyte_catalog(), state=state
    )
    assert code == 1
    error = trace_error(messages)
    assert error["failure_type"] == "config_error"
    assert needle in error["message"]
    assert "state.json" in error["message"]
    assert server.stats.requests == 0


def test_a_catalog_naming_another_stream_is_a_config_error(
    tmp_path: Path, server: InvocaServer
) -> None:
    catalog = airbyte_catalog()
    catalog["streams"][0]["stream"]["name"] = "calls"
    code, messages, _ = source(tmp_path, "read", config=config_for(server), catalog=catalog)
    assert code == 1
    assert trace_error(messages)["failure_type"] == "config_error"
    assert server.stats.requests == 0


def test_both_front_ends_emit_the_same_records(
    tmp_path: Path, make_server: Factory, frontend: Frontend
) -> None:
    server = make_server(450, faults=Faults(page_cap=30))
    run = frontend.run(tmp_path, config_for(server, page_size=50))
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert run.records == [
        {**r, "network_id": server.network_id} for r in server.expected_records()
    ]


# --- state forms (no HTTP) --------------------------------------------------------

instants = st.datetimes(
    min_value=dt.datetime(2000, 1, 1),  # noqa: DTZ001 - hypothesis wants naive bounds
    max_value=dt.datetime(2040, 1, 1),  # noqa: DTZ001
    timezones=st.just(dt.UTC),
).map(lambda moment: moment.replace(microsecond=0).isoformat())


def state_forms(value: str) -> list[object]:
    """Every form of one bookmark that ``--state`` accepts."""
    message = AIRBYTE.state_with(value)
    global_entry = {**DESCRIPTOR, "stream_state": {"updated_at": value}}
    other = {"type": "STREAM", "stream": {"stream_descriptor": {"name": "calls"}}}
    return [
        [message],
        message,
        [other, message],
        pyairbyte_dump({**message, "sourceStats": {"recordCount": 3.0}}),
        [{"type": "GLOBAL", "global": {"stream_states": [global_entry]}}],
        [{"type": "LEGACY", "data": {"destinations": {"updated_at": value}}}],
        {"destinations": {"updated_at": value}},
    ]


@settings(max_examples=50, deadline=None)
@given(value=instants)
def test_every_accepted_state_form_yields_the_same_bookmark(value: str) -> None:
    for form in state_forms(value):
        assert bookmark_from_state(form, "state.json") == value, form


@pytest.mark.parametrize("empty", [[], {}, [{"type": "STREAM", "stream": {
    "stream_descriptor": {"name": "destinations"}, "stream_state": {}}}]])  # fmt: skip
def test_an_empty_state_means_no_bookmark(empty: object) -> None:
    assert bookmark_from_state(empty, "state.json") is None


@settings(max_examples=50, deadline=None)
@given(junk=st.text(max_size=20).filter(lambda s: not re.match(r"^\s*\d", s)))
def test_a_bookmark_that_is_not_a_timestamp_is_refused(junk: str) -> None:
    with pytest.raises(SourceError, match="not a timestamp") as info:
        bookmark_from_state([AIRBYTE.state_with(junk)], "state.json")
    assert info.value.failure_type == "config_error"


# --- the Dockerfile ---------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_dockerfile_follows_airbytes_connector_conventions() -> None:
    instructions = dockerfile_instructions()
    values = dict(instructions)  # the last of each kind
    entrypoint = json.loads(values["ENTRYPOINT"])
    env = dict(re.findall(r'(\w+)="([^"]*)"', " ".join(v for k, v in instructions if k == "ENV")))
    assert env["AIRBYTE_ENTRYPOINT"] == " ".join(entrypoint)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["source-invoca-destinations"]
    assert entrypoint[0] in scripts
    assert values["USER"] == "airbyte"  # the last USER: the image runs as airbyte
    run = " ".join(v for k, v in instructions if k == "RUN")
    assert "useradd" in run
    assert "airbyte" in run
    assert "chown -R airbyte:airbyte /airbyte" in run
    assert values["WORKDIR"].startswith("/airbyte/")
    base = re.match(r"python:(3\.\d+)", values["FROM"])
    assert base is not None
    assert base.group(1) in {"3.11", "3.12", "3.13"}
    for _, copied in (i for i in instructions if i[0] == "COPY"):
        for name in copied.split()[:-1]:
            assert (ROOT / name).exists(), name


def test_the_docker_context_holds_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {
        name.rstrip("/")
        for kind, value in dockerfile_instructions()
        if kind == "COPY"
        for name in value.split()[:-1]
    }
    assert copied <= kept
