"""End to end: real `meltano run` of the tap into real loaders, read back with their own clients.

CSV and JSONL files, DuckDB (embedded), and a real PostgreSQL server started on
127.0.0.1 in a temporary data directory. Each run uses its own Meltano system
database, so state never leaks between tests or into the demo.

Safe under pytest-xdist: the plugins are installed once per session (a lock and
a marker shared by the workers), each worker has its own PostgreSQL server and
its own `.meltano/run` folder (Meltano writes each plugin's catalog and state
there), and the demo, which reinstalls the extractor, runs while no other
Meltano command does.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import typing as t
from pathlib import Path

import pytest
import yaml  # PyYAML comes with meltano; no stubs locked
from helpers import ROOT, clean_env, file_lock
from invoca_server import Faults, InvocaServer

from tap_invoca_destinations.records import BOOLEAN, COLUMNS, INTEGER, TIMESTAMP

pytestmark = pytest.mark.e2e

MELTANO = str(Path(sys.executable).parent / "meltano")
INCREMENTAL = "tap-invoca-destinations--incremental"
MIRROR = "tap-invoca-destinations--mirror"
KEY = ["network_id", "id"]


# Held shared by every Meltano command of the tests, exclusively while plugins are
# (re)installed: a reinstall rewrites the extractor's venv under a running command.
PLUGINS_LOCK = ROOT / ".meltano" / "tests.lock"


def meltano(
    env: dict[str, str],
    *args: str,
    timeout: float = 600,
    cwd: Path = ROOT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    with file_lock(PLUGINS_LOCK, shared=True):
        result = subprocess.run(
            [MELTANO, *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if check:
        assert result.returncode == 0, f"meltano {' '.join(args)} failed:\n{result.stderr[-4000:]}"
    return result


# The README's install command; test_readme_meltano_commands_run checks it is this one.
INSTALL = ("install",)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Install every plugin once per session, as the README says, whatever the workers."""
    # Under xdist the base temp's parent is this run's, shared by its workers.
    done = tmp_path_factory.getbasetemp().parent / "meltano-installed"
    workers = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    with file_lock(PLUGINS_LOCK):
        if workers and done.exists():
            return
        result = subprocess.run(
            [MELTANO, *INSTALL],
            cwd=ROOT,
            env={**clean_env(), "MELTANO_SEND_ANONYMOUS_USAGE_STATS": "false"},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"meltano install failed:\n{result.stderr[-4000:]}"
        compile_plugins()
        if workers:
            done.touch()


def compile_plugins() -> None:
    """Compile the plugins' bytecode, which uv (through Meltano) does not write.

    Under PYTHONDONTWRITEBYTECODE nothing else does, and every tap and target
    started by `meltano run` would compile its libraries again: about twice the
    CPU time of a run. Files already compiled are skipped.
    """
    for python in sorted((ROOT / ".meltano").glob("*/*/venv/bin/python")):
        venv = python.parent.parent
        # Not checked: a library may ship a file that does not compile (a template).
        subprocess.run(
            [str(python), "-m", "compileall", "-q", "-j", "0", str(venv / "lib")],
            capture_output=True,
            timeout=600,
            check=False,
        )


@pytest.fixture(scope="session")
def sys_dir(installed: None, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ARG001 - installs first
    """This worker's `.meltano`: the installed plugins linked in, its own `run` and logs."""
    root = tmp_path_factory.mktemp("meltano-sys")
    for entry in (ROOT / ".meltano").iterdir():
        if entry.is_dir() and entry.name not in {"run", "logs"}:
            (root / entry.name).symlink_to(entry)
    return root


@pytest.fixture
def pipeline(sys_dir: Path, server: InvocaServer, tmp_path: Path) -> dict[str, str]:
    """Environment for `meltano run` against this test's server, writing under tmp_path."""
    return {
        **clean_env(),
        "MELTANO_SEND_ANONYMOUS_USAGE_STATS": "false",
        "MELTANO_SYS_DIR_ROOT": str(sys_dir),
        "MELTANO_DATABASE_URI": f"sqlite:///{tmp_path}/meltano.db",
        "MELTANO_ENVIRONMENT": "local",
        "TAP_INVOCA_DESTINATIONS_API_TOKEN": server.token,
        "TAP_INVOCA_DESTINATIONS_BASE_URL": server.url,
        "TARGET_CSV_OUTPUT_PATH": str(tmp_path / "csv"),
        "TARGET_JSONL_DESTINATION_PATH": str(tmp_path),
        "TARGET_DUCKDB_FILEPATH": str(tmp_path / "warehouse.duckdb"),
    }


def emitted_count(result: subprocess.CompletedProcess[str]) -> int:
    """The tap's own record_count metric, as Meltano relays it."""
    tap_lines = "\n".join(
        line
        for line in result.stderr.splitlines()
        if re.search(r"tap-invoca-destinations(--\S+)? +METRIC", line)
    )
    # Meltano relays the metric as JSON, or parsed into fields when the tap logs structured lines.
    counts = re.findall(r'"metric":\s*"record_count",\s*"value":\s*(\d+)', tap_lines) + re.findall(
        r"metric_name=record_count metric_value=(\d+)", tap_lines
    )
    assert counts, "no record_count metric in Meltano's output"
    return sum(int(c) for c in counts)


def utc(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value).astimezone(dt.UTC)


def naive_utc(value: str | None) -> dt.datetime | None:
    moment = utc(value)
    return None if moment is None else moment.replace(tzinfo=None)


# --- files -----------------------------------------------------------------------------


def from_csv(column: str, text: str) -> object:
    """Read back one CSV cell by the column's type (CSV cannot tell "" from null)."""
    kind = COLUMNS[column]
    if text == "":
        return None
    if kind == INTEGER:
        return int(text)
    if kind == BOOLEAN:
        return {"True": True, "False": False, "true": True, "false": False}[text]
    if kind == TIMESTAMP:
        return utc(text)
    return text


def assert_csv_matches(path: Path, expected: list[dict[str, t.Any]]) -> None:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(expected)
    assert list(rows[0]) == list(COLUMNS)
    for row, want in zip(sorted(rows, key=lambda r: int(r["id"])), expected, strict=True):
        got = {column: from_csv(column, text) for column, text in row.items()}
        for column, value in want.items():
            if COLUMNS[column] == TIMESTAMP:
                value = utc(value)  # noqa: PLW2901
            elif value == "":
                value = None  # noqa: PLW2901
            assert got[column] == value, (want["id"], column)


def test_csv_rows_equal_the_servers_destinations(
    pipeline: dict[str, str], server: InvocaServer, tmp_path: Path
) -> None:
    meltano(pipeline, "run", "tap-invoca-destinations", "target-csv")
    assert_csv_matches(tmp_path / "csv" / "destinations.csv", server.expected_records())


@pytest.mark.usefixtures("installed")
def test_readme_demo_command_leaves_the_servers_destinations_in_csv_and_duckdb() -> None:
    import duckdb  # noqa: PLC0415

    env = {**clean_env(), "DEMO_PORT": str(_free_port()), "DEMO_DESTINATIONS": "300"}
    with file_lock(PLUGINS_LOCK):  # the demo reinstalls the extractor
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "demo")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "output/csv/destinations.csv (300 destinations)" in result.stdout
    # The demo's server is the same deterministic data set as this one (not started).
    generator = InvocaServer(300)
    expected = generator.expected_records()
    generator.stop()
    assert_csv_matches(ROOT / "output" / "csv" / "destinations.csv", expected)
    with duckdb.connect(str(ROOT / "output" / "warehouse.duckdb"), read_only=True) as db:
        ids = [
            row[0]
            for row in db.execute("SELECT id FROM invoca.destinations ORDER BY id").fetchall()
        ]
    assert ids == [r["id"] for r in expected]
    assert re.search(r"^total\s+300$", result.stdout, re.MULTILINE)


def test_jsonl_records_equal_the_servers_destinations(
    pipeline: dict[str, str], server: InvocaServer, tmp_path: Path
) -> None:
    meltano(pipeline, "run", "tap-invoca-destinations", "target-jsonl")
    lines = (tmp_path / "destinations.jsonl").read_text(encoding="utf-8").splitlines()
    records = sorted((json.loads(line) for line in lines), key=lambda r: r["id"])
    assert records == server.expected_records()


# --- warehouses ------------------------------------------------------------------------


def touch_some(server: InvocaServer) -> tuple[set[int], dt.datetime]:
    changed = set(server.ids()[5:12])
    when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    server.touch(changed, when)
    return changed, when


def expected_second_run(server: InvocaServer, first_bookmark: str) -> set[int]:
    """Changed rows, plus what the contract always re-sends: the boundary and null updated_at."""
    return {
        r["id"]
        for r in server.expected_records()
        if r["updated_at"] is None or r["updated_at"] >= first_bookmark
    }


def test_duckdb_types_values_and_incremental_upsert(
    pipeline: dict[str, str], server: InvocaServer, tmp_path: Path
) -> None:
    import duckdb  # noqa: PLC0415

    bookmark = max(r["updated_at"] for r in server.expected_records() if r["updated_at"])
    first = meltano(pipeline, "run", INCREMENTAL, "target-duckdb")
    assert emitted_count(first) == 250
    path = str(tmp_path / "warehouse.duckdb")
    with duckdb.connect(path, read_only=True) as db:
        types = dict(
            db.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema='invoca' AND table_name='destinations'"
            ).fetchall()
        )
        keys = db.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() "
            "WHERE table_name='destinations' AND constraint_type='PRIMARY KEY'"
        ).fetchall()
        rows = db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM invoca.destinations ORDER BY id"  # noqa: S608 - our columns
        ).fetchall()
    assert set(COLUMNS) <= set(types)
    assert types["id"] in {"BIGINT", "HUGEINT", "INTEGER"}
    assert [sorted(k[0]) for k in keys] == [sorted(KEY)]
    for column, kind in COLUMNS.items():
        if kind == TIMESTAMP:
            assert types[column].startswith("TIMESTAMP"), column
        elif kind == BOOLEAN:
            assert types[column] == "BOOLEAN", column
        elif kind == INTEGER:
            assert types[column] in {"BIGINT", "HUGEINT", "INTEGER"}, column
        else:
            assert types[column] == "VARCHAR", column
    assert len(rows) == 250  # the duckdb >= 1.3 CSV-header bug loses exactly one row here
    for row, want in zip(rows, server.expected_records(), strict=True):
        got = dict(zip(COLUMNS, row, strict=True))
        for column, value in want.items():
            expected = naive_utc(value) if COLUMNS[column] == TIMESTAMP else value
            if expected == "":
                expected = None  # target-duckdb loads through CSV, where "" becomes NULL
            assert got[column] == expected, (want["id"], column)

    changed, when = touch_some(server)
    second = meltano(pipeline, "run", INCREMENTAL, "target-duckdb")
    assert emitted_count(second) == len(expected_second_run(server, bookmark))
    assert changed <= expected_second_run(server, bookmark)
    with duckdb.connect(path, read_only=True) as db:
        count, renamed = db.execute(  # type: ignore[misc]
            "SELECT count(*), count(*) FILTER "
            "(WHERE requested_destination_name LIKE 'Renamed %') FROM invoca.destinations"
        ).fetchone()
        latest = db.execute(  # type: ignore[index]
            "SELECT max(updated_at) FROM invoca.destinations"
        ).fetchone()[0]
    assert (count, renamed) == (250, len(changed))
    assert latest == when.replace(tzinfo=None)


# --- PostgreSQL ------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres() -> t.Iterator[int]:
    """A throwaway PostgreSQL server on 127.0.0.1, one per xdist worker; yields its port."""
    bindir = _pg_bin()
    if bindir is None:
        message = (
            "PostgreSQL is not installed: run `bash scripts/test` as root (it installs "
            "Debian's postgresql), or `apt-get install postgresql`, to enable these tests"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    # Not under pytest's tmp dir: that is root-only, and the server runs as postgres.
    data = Path(tempfile.mkdtemp(prefix="invoca-pg-"))
    port = _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        options,
        "-w",
        "-l",
        str(data / "log"),
        "start",
    )
    try:
        psql(port, "CREATE DATABASE warehouse", database="postgres")
        yield port
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


def psql(port: int, sql: str, *, database: str = "warehouse") -> list[list[str]]:
    """Run SQL with PostgreSQL's own client; rows of text fields."""
    result = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", database,
         "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return [line.split("\t") for line in result.stdout.splitlines()]


def epoch_sql(column: str, pg_type: str) -> str:
    """SQL for a timestamp column as UTC epoch seconds, whatever its time zone handling."""
    if pg_type == "timestamp without time zone":
        return f"extract(epoch from {column} AT TIME ZONE 'UTC')::bigint"
    return f"extract(epoch from {column})::bigint"


def test_postgres_types_values_and_incremental_upsert(
    pipeline: dict[str, str], server: InvocaServer, postgres: int
) -> None:
    # The throwaway server trusts local connections; the loader insists on a password.
    env = {**pipeline, "TARGET_POSTGRES_PORT": str(postgres), "TARGET_POSTGRES_PASSWORD": "unused"}
    bookmark = max(r["updated_at"] for r in server.expected_records() if r["updated_at"])
    first = meltano(env, "run", INCREMENTAL, "target-postgres")
    assert emitted_count(first) == 250
    types = dict(
        psql(postgres, "SELECT column_name, data_type FROM information_schema.columns "
             "WHERE table_schema='invoca' AND table_name='destinations'")
    )  # fmt: skip
    keys = psql(
        postgres,
        "SELECT kcu.column_name FROM information_schema.table_constraints tc "
        "JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name) "
        "WHERE tc.table_schema='invoca' AND tc.table_name='destinations' "
        "AND tc.constraint_type='PRIMARY KEY'",
    )
    assert sorted(k[0] for k in keys) == sorted(KEY)
    for column, kind in COLUMNS.items():
        if kind == TIMESTAMP:
            assert types[column].startswith("timestamp"), (column, types[column])
        elif kind == BOOLEAN:
            assert types[column] == "boolean", column
        elif kind == INTEGER:
            assert types[column] == "bigint", (column, types[column])
        else:
            assert types[column] in {"text", "character varying"}, (column, types[column])

    # Instants are compared as UTC epoch seconds.
    select = ", ".join(
        epoch_sql(c, types[c]) if COLUMNS[c] == TIMESTAMP else f"{c}::text" for c in COLUMNS
    )
    rows = psql(postgres, f"SELECT {select} FROM invoca.destinations ORDER BY id")  # noqa: S608
    assert len(rows) == 250
    for row, want in zip(rows, server.expected_records(), strict=True):
        for column, text in zip(COLUMNS, row, strict=True):
            value = want[column]
            kind = COLUMNS[column]
            if value is None:
                assert text == "", (want["id"], column)
            elif kind == TIMESTAMP:
                assert int(text) == int(dt.datetime.fromisoformat(value).timestamp()), (
                    want["id"],
                    column,
                )
            elif kind == BOOLEAN:
                assert text == ("true" if value else "false"), (want["id"], column)
            else:
                assert text == str(value), (want["id"], column)

    changed, when = touch_some(server)
    second = meltano(env, "run", INCREMENTAL, "target-postgres")
    assert emitted_count(second) == len(expected_second_run(server, bookmark))
    latest_sql = epoch_sql("updated_at", types["updated_at"])
    [[count, renamed, latest]] = psql(
        postgres,
        "SELECT count(*), count(*) FILTER (WHERE requested_destination_name LIKE 'Renamed %'), "  # noqa: S608
        f"max({latest_sql}) FROM invoca.destinations",
    )
    assert (int(count), int(renamed)) == (250, len(changed))
    assert int(latest) == int(when.timestamp())


# --- the canonical CSV pipeline, run after run -------------------------------------------


def test_csv_pipeline_holds_every_current_destination_run_after_run(
    pipeline: dict[str, str], server: InvocaServer, tmp_path: Path
) -> None:
    """`meltano run tap-invoca-destinations target-csv` never shrinks the file to a delta."""
    meltano(pipeline, "run", "tap-invoca-destinations", "target-csv")
    assert_csv_matches(tmp_path / "csv" / "destinations.csv", server.expected_records())
    touch_some(server)
    server.delete(server.ids()[20:30])
    server.insert(5)
    second = meltano(pipeline, "run", "tap-invoca-destinations", "target-csv")
    assert emitted_count(second) == 245
    assert_csv_matches(tmp_path / "csv" / "destinations.csv", server.expected_records())


# --- a copy of the project, for commands that change meltano.yml ---------------------------


@pytest.fixture
def project(sys_dir: Path, tmp_path: Path) -> Path:
    """A copy of this Meltano project that shares the installed plugins."""
    root = tmp_path / "project"
    (root / "output" / "csv").mkdir(parents=True)
    shutil.copy(ROOT / "meltano.yml", root / "meltano.yml")
    (root / ".meltano").symlink_to(sys_dir)
    return root


def project_env(project: Path, server: InvocaServer) -> dict[str, str]:
    return {
        **clean_env(),
        "MELTANO_SEND_ANONYMOUS_USAGE_STATS": "false",
        "MELTANO_SYS_DIR_ROOT": str(project / ".meltano"),  # the plugins installed once
        "MELTANO_DATABASE_URI": f"sqlite:///{project}/meltano.db",
        "MELTANO_ENVIRONMENT": "local",
        "TAP_INVOCA_DESTINATIONS_API_TOKEN": server.token,
        "TAP_INVOCA_DESTINATIONS_BASE_URL": server.url,
    }


def stored_config(project: Path, name: str, environment: str = "local") -> dict[str, t.Any]:
    """The extractor's config as `meltano config set` stored it in the environment's entry."""
    loaded = yaml.safe_load((project / "meltano.yml").read_text(encoding="utf-8"))
    [env] = [e for e in loaded["environments"] if e["name"] == environment]
    extractors = env["config"]["plugins"]["extractors"]
    return next(p for p in extractors if p["name"] == name)["config"]


def test_config_set_stream_maps_stores_an_object_and_the_tap_applies_it(
    project: Path, server: InvocaServer
) -> None:
    env = project_env(project, server)
    maps = {"destinations": {"__filter__": "country_code == '44'", "primary_url": "__NULL__"}}
    meltano(
        env, "config", "set", "tap-invoca-destinations", "stream_maps", json.dumps(maps),
        cwd=project,
    )  # fmt: skip
    assert stored_config(project, "tap-invoca-destinations")["stream_maps"] == maps
    printed = meltano(env, "config", "print", "tap-invoca-destinations", cwd=project)
    assert "Unknown setting" not in printed.stderr
    meltano(env, "run", "tap-invoca-destinations", "target-jsonl", cwd=project)
    lines = (project / "output" / "destinations.jsonl").read_text(encoding="utf-8").splitlines()
    records = sorted((json.loads(line) for line in lines), key=lambda r: r["id"])
    want = [
        {k: v for k, v in r.items() if k != "primary_url"}
        for r in server.expected_records()
        if r["country_code"] == "44"
    ]
    assert want
    assert records == want


def test_config_set_stores_each_kind_as_the_tap_expects(
    project: Path, server: InvocaServer
) -> None:
    """One setting of each kind through `meltano config set`, then the config the tap gets."""
    env = project_env(project, server)
    values = {
        "include_inactive": ("false", False),
        "flattening_enabled": ("false", False),
        "page_size": ("50", 50),
        "flattening_max_depth": ("2", 2),
        "status": ("tracked", "tracked"),
        "start_date": ("2023-01-05T00:00:00Z", "2023-01-05T00:00:00Z"),
        "faker_config": ('{"seed": 1}', {"seed": 1}),
        "stream_map_config": ('{"region": "EU"}', {"region": "EU"}),
        "batch_config": (
            '{"encoding": {"format": "jsonl", "compression": "gzip"}}',
            {"encoding": {"format": "jsonl", "compression": "gzip"}},
        ),
        "emit_activate_version_messages": ("true", True),
    }
    for name, (text, _) in values.items():
        result = meltano(env, "config", "set", "tap-invoca-destinations", name, text, cwd=project)
        assert "Unknown setting" not in result.stderr, name
    dumped = meltano(env, "invoke", "--dump=config", "tap-invoca-destinations", cwd=project).stdout
    config = json.loads(dumped)
    for name, (_, want) in values.items():
        assert config[name] == want, name
        assert type(config[name]) is type(want), name


def test_config_set_api_token_goes_to_dotenv_and_the_tap_uses_it(
    project: Path, server: InvocaServer
) -> None:
    """`meltano config set` keeps the sensitive token out of meltano.yml."""
    env = project_env(project, server)
    del env["TAP_INVOCA_DESTINATIONS_API_TOKEN"]
    token = server.token
    meltano(env, "config", "set", "tap-invoca-destinations", "api_token", token, cwd=project)
    assert token not in (project / "meltano.yml").read_text(encoding="utf-8")
    lines = (project / ".env").read_text(encoding="utf-8").splitlines()
    dotenv = dict(line.split("=", 1) for line in lines if "=" in line)
    assert dotenv["TAP_INVOCA_DESTINATIONS_API_TOKEN"].strip("'\"") == token
    result = meltano(env, "run", "tap-invoca-destinations", "target-csv", cwd=project)
    assert emitted_count(result) == 250
    assert token not in result.stderr


# --- mirror mode into PostgreSQL ---------------------------------------------------------


@pytest.fixture
def mirror_server(make_server: t.Callable[..., InvocaServer]) -> InvocaServer:
    return make_server(500)


def pg_env(base: dict[str, str], port: int, schema: str, **settings: str) -> dict[str, str]:
    """`base` loading into its own PostgreSQL schema (tests share one database)."""
    env = {
        **base,
        "TARGET_POSTGRES_PORT": str(port),
        # The throwaway server trusts local connections; the loader insists on a password.
        "TARGET_POSTGRES_PASSWORD": "unused",
        "TARGET_POSTGRES_DEFAULT_TARGET_SCHEMA": schema,
        "TAP_INVOCA_DESTINATIONS_PAGE_SIZE": "100",
    }
    env.update({f"TARGET_POSTGRES_{k.upper()}": v for k, v in settings.items()})
    return env


def pg_rows(port: int, schema: str) -> dict[tuple[str, int], bool]:
    """(network_id, id) -> whether the row is flagged deleted."""
    rows = psql(
        port,
        f"SELECT network_id, id, _sdc_deleted_at IS NOT NULL FROM {schema}.destinations",  # noqa: S608
    )
    return {(n, int(i)): flagged == "t" for n, i, flagged in rows}


def live_keys(server: InvocaServer) -> set[tuple[str, int]]:
    return {(server.network_id, i) for i in server.ids()}


def test_mirror_with_hard_delete_leaves_exactly_the_servers_list(
    pipeline: dict[str, str], mirror_server: InvocaServer, postgres: int
) -> None:
    env = pg_env(
        {**pipeline, "TAP_INVOCA_DESTINATIONS_BASE_URL": mirror_server.url},
        postgres, "mirror_hard", hard_delete="true",
    )  # fmt: skip
    first = meltano(env, "run", MIRROR, "target-postgres")
    assert emitted_count(first) == 500
    assert pg_rows(postgres, "mirror_hard") == dict.fromkeys(live_keys(mirror_server), False)
    deleted = set(mirror_server.ids()[::16][:30])
    mirror_server.delete(deleted)
    inserted = mirror_server.insert(3)
    second = meltano(env, "run", MIRROR, "target-postgres")
    assert emitted_count(second) == 473
    rows = pg_rows(postgres, "mirror_hard")
    assert len(rows) == 473
    assert rows == dict.fromkeys(live_keys(mirror_server), False)
    assert not {(mirror_server.network_id, i) for i in deleted} & set(rows)
    assert {(mirror_server.network_id, i) for i in inserted} <= set(rows)


def test_mirror_with_soft_delete_flags_exactly_the_deleted_rows(
    pipeline: dict[str, str], mirror_server: InvocaServer, postgres: int
) -> None:
    env = pg_env(
        {**pipeline, "TAP_INVOCA_DESTINATIONS_BASE_URL": mirror_server.url},
        postgres, "mirror_soft",
    )  # fmt: skip
    meltano(env, "run", MIRROR, "target-postgres")
    before = live_keys(mirror_server)
    deleted = set(mirror_server.ids()[::16][:30])
    mirror_server.delete(deleted)
    meltano(env, "run", MIRROR, "target-postgres")
    rows = pg_rows(postgres, "mirror_soft")
    assert set(rows) == before
    flagged = {key for key, gone in rows.items() if gone}
    assert flagged == {(mirror_server.network_id, i) for i in deleted}
    # Live rows: WHERE _sdc_deleted_at IS NULL is the server's list.
    assert {key for key, gone in rows.items() if not gone} == live_keys(mirror_server)


@pytest.mark.parametrize("hard_delete", ["false", "true"])
def test_mirror_run_that_fails_midway_deletes_and_flags_nothing(
    pipeline: dict[str, str],
    mirror_server: InvocaServer,
    postgres: int,
    hard_delete: str,
) -> None:
    schema = f"mirror_fail_{'hard' if hard_delete == 'true' else 'soft'}"
    env = pg_env(
        {
            **pipeline,
            "TAP_INVOCA_DESTINATIONS_BASE_URL": mirror_server.url,
            "TAP_INVOCA_DESTINATIONS_MAX_CONCURRENCY": "1",  # one page after another
        },
        postgres, schema, hard_delete=hard_delete,
    )  # fmt: skip
    meltano(env, "run", MIRROR, "target-postgres")
    loaded = pg_rows(postgres, schema)
    assert loaded == dict.fromkeys(live_keys(mirror_server), False)
    mirror_server.delete(mirror_server.ids()[::16][:30])
    with mirror_server.lock:  # the 4th request of the next run is refused
        mirror_server.stats.requests = 0
    mirror_server.faults = Faults(status_every={4: 403})
    failed = meltano(env, "run", MIRROR, "target-postgres", check=False)
    assert failed.returncode != 0
    assert "403" in failed.stderr
    assert emitted_count(failed) >= 200  # three pages went to the loader first
    assert pg_rows(postgres, schema) == loaded  # nothing deleted, nothing flagged
    # The next successful run brings the table back to the server's list.
    mirror_server.faults = Faults()
    meltano(env, "run", MIRROR, "target-postgres")
    rows = pg_rows(postgres, schema)
    if hard_delete == "true":
        assert rows == dict.fromkeys(live_keys(mirror_server), False)
    else:
        assert {key for key, gone in rows.items() if not gone} == live_keys(mirror_server)


def test_mirror_into_the_other_loaders(
    pipeline: dict[str, str], server: InvocaServer, tmp_path: Path
) -> None:
    """target-csv rewrites its file; target-duckdb and target-jsonl ignore ACTIVATE_VERSION."""
    import duckdb  # noqa: PLC0415

    loaders = ("target-csv", "target-duckdb", "target-jsonl")
    meltano(pipeline, "run", *(p for loader in loaders for p in (MIRROR, loader)))
    before = server.ids()
    deleted = before[::25]
    server.delete(deleted)
    second = meltano(pipeline, "run", *(p for loader in loaders for p in (MIRROR, loader)))
    assert "Unknown message type" in second.stderr  # target-jsonl, on ACTIVATE_VERSION
    assert_csv_matches(tmp_path / "csv" / "destinations.csv", server.expected_records())
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as db:
        ids = [
            r[0] for r in db.execute("SELECT id FROM invoca.destinations ORDER BY id").fetchall()
        ]
    assert ids == before  # the deleted destinations stay in DuckDB
    lines = (tmp_path / "destinations.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(before) + len(server.ids())  # appended, run after run


# --- the README: several networks, and every Meltano command it shows ----------------------


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def readme_plugins() -> list[dict[str, list[dict[str, t.Any]]]]:
    """The plugins the README's "Several networks" section adds to meltano.yml, block by block."""
    return [yaml.safe_load(b) for b in code_blocks(readme_section("Several networks"), "yaml")]


def readme_network_commands() -> list[str]:
    return [
        line
        for block in code_blocks(readme_section("Several networks"), "bash")
        for line in block.splitlines()
        if line.startswith("meltano run")
    ]


def add_readme_plugins(project: Path) -> list[dict[str, t.Any]]:
    """Add the README's network plugins to the project; return its extractors."""
    path = project / "meltano.yml"
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    for block in readme_plugins():
        for kind, plugins in block.items():
            loaded["plugins"][kind].extend(plugins)
    path.write_text(yaml.safe_dump(loaded, sort_keys=False), encoding="utf-8")
    return [e for block in readme_plugins() for e in block.get("extractors", [])]


def env_name(plugin: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", plugin).upper()


@pytest.fixture
def network_servers(
    make_server: t.Callable[..., InvocaServer],
) -> dict[str, InvocaServer]:
    """network_id -> its server; the ids overlap (every server's ids start at 1000)."""
    networks = sorted(
        {e["config"]["network_id"] for block in readme_plugins() for e in block["extractors"]}
    )
    assert networks == ["1234", "5678"]
    return {
        "1234": make_server(500, network_id="1234"),
        "5678": make_server(300, network_id="5678"),
    }


def networks_env(
    project: Path, servers: dict[str, InvocaServer], postgres: int, schema: str
) -> dict[str, str]:
    """Each README network extractor pointed at its network's server."""
    env = pg_env(project_env(project, servers["1234"]), postgres, schema)
    for block in readme_plugins():
        for extractor in block["extractors"]:
            server = servers[extractor["config"]["network_id"]]
            env[f"{env_name(extractor['name'])}_BASE_URL"] = server.url
    return env


def fresh_schemas(port: int, *schemas: str) -> None:
    for schema in schemas:
        psql(port, f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def test_several_networks_load_into_one_table_and_keep_every_row(
    project: Path, network_servers: dict[str, InvocaServer], postgres: int
) -> None:
    networks = add_readme_plugins(project)
    env = networks_env(project, network_servers, postgres, "networks")
    # The shared variable does not override a network's own network_id (README).
    env["TAP_INVOCA_DESTINATIONS_NETWORK_ID"] = "9999"
    command = readme_network_commands()[0]
    assert "--net-1234" in command
    a, b = network_servers["1234"], network_servers["5678"]
    assert set(a.ids()) & set(b.ids())  # the same ids in both networks
    want = live_keys(a) | live_keys(b)
    for _ in range(2):  # and again: upserts, no duplicates
        meltano(env, *shlex.split(command)[1:], cwd=project)
        rows = pg_rows(postgres, "networks")
        assert len(rows) == 800
        assert rows == dict.fromkeys(want, False)
    # Each network kept its own state.
    state_ids = meltano(env, "state", "list", cwd=project).stdout.split()
    assert {f"local:{n['name']}-to-target-postgres" for n in networks[:2]} <= set(state_ids)


def test_mirror_of_several_networks_one_schema_each_keeps_each_list(
    project: Path, network_servers: dict[str, InvocaServer], postgres: int
) -> None:
    add_readme_plugins(project)
    fresh_schemas(postgres, "invoca_1234", "invoca_5678")
    env = networks_env(project, network_servers, postgres, "unused")
    command = readme_network_commands()[1]
    assert "--mirror-1234" in command
    a, b = network_servers["1234"], network_servers["5678"]
    meltano(env, *shlex.split(command)[1:], cwd=project)
    assert pg_rows(postgres, "invoca_1234") == dict.fromkeys(live_keys(a), False)
    assert pg_rows(postgres, "invoca_5678") == dict.fromkeys(live_keys(b), False)
    deleted = {("5678", i) for i in b.ids()[::10][:30]}
    b.delete(i for _, i in deleted)
    meltano(env, *shlex.split(command)[1:], cwd=project)
    assert pg_rows(postgres, "invoca_1234") == dict.fromkeys(live_keys(a), False)
    rows = pg_rows(postgres, "invoca_5678")
    assert {key for key, gone in rows.items() if gone} == deleted
    assert {key for key, gone in rows.items() if not gone} == live_keys(b)


def test_mirror_of_two_networks_into_one_table_flags_the_first_networks_rows(
    project: Path, network_servers: dict[str, InvocaServer], postgres: int
) -> None:
    """Why the README says one table per network in mirror mode."""
    add_readme_plugins(project)
    env = networks_env(project, network_servers, postgres, "shared_mirror")
    meltano(
        env, "run", "tap-invoca-destinations--mirror-1234", "target-postgres",
        "tap-invoca-destinations--mirror-5678", "target-postgres", cwd=project,
    )  # fmt: skip
    rows = pg_rows(postgres, "shared_mirror")
    assert {key for key, gone in rows.items() if gone} == live_keys(network_servers["1234"])


def readme_meltano_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [
        line.split("  #")[0].strip()
        for block in code_blocks(text, "bash")
        for line in block.splitlines()
        if line.startswith("meltano ")
    ]


def test_readme_meltano_commands_run(
    project: Path, network_servers: dict[str, InvocaServer], postgres: int
) -> None:
    """Every `meltano ...` line in the README, in order, on Meltano 4.4.1, exits 0."""
    add_readme_plugins(project)
    fresh_schemas(postgres, "invoca_1234", "invoca_5678")
    env = networks_env(project, network_servers, postgres, "readme")
    commands = readme_meltano_commands()
    assert len(commands) >= 8
    assert "meltano run tap-invoca-destinations target-csv" in commands
    assert "meltano run tap-invoca-destinations--mirror target-postgres" in commands
    for command in commands:
        args = shlex.split(command)[1:]
        if tuple(args) == INSTALL:
            continue  # the `installed` fixture ran it, in this repository
        meltano(env, *args, cwd=project)
    assert stored_config(project, "tap-invoca-destinations")["stream_maps"]
    rows = pg_rows(postgres, "readme")
    assert len(rows) == 800
