"""The Airbyte source end to end with the real client: PyAirbyte 0.71.3, a DuckDB cache.

Run by ``nox -s pyairbyte`` (Python 3.12, its own environment, AIRBYTE_OFFLINE_MODE=1),
never by the main suite: the file name does not match ``test_*.py`` and the main
environment has no ``airbyte``. The local server and its fixtures are the suite's own.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import typing as t
from pathlib import Path

import airbyte as ab
import pytest
from airbyte.caches import DuckDBCache
from helpers import config_for

if t.TYPE_CHECKING:
    from invoca_server import InvocaServer

Factory = t.Callable[..., "InvocaServer"]
EXECUTABLE = Path(sys.executable).parent / "source-invoca-destinations"
KEY = ("network_id", "id")


@pytest.fixture(autouse=True)
def _offline() -> None:
    assert os.environ.get("AIRBYTE_OFFLINE_MODE") == "1", "PyAirbyte would call its registry"


def get_source(server: InvocaServer) -> ab.Source:
    source = ab.get_source(
        "source-invoca-destinations",
        config=config_for(server, page_size=50, max_tries=2),
        local_executable=EXECUTABLE,
        streams="*",
    )
    return t.cast("ab.Source", source)


def cached_rows(cache: DuckDBCache) -> list[dict[str, t.Any]]:
    frame = cache["destinations"].to_pandas()
    return t.cast("list[dict[str, t.Any]]", frame.to_dict("records"))


def keys(rows: list[dict[str, t.Any]]) -> list[tuple[str, int]]:
    return sorted((str(row["network_id"]), int(row["id"])) for row in rows)


def server_keys(server: InvocaServer) -> list[tuple[str, int]]:
    return sorted((server.network_id, dest_id) for dest_id in server.ids())


def test_check_read_incremental_replace_and_failure(tmp_path: Path, make_server: Factory) -> None:
    server = make_server(400)
    source = get_source(server)
    source.check()

    cache = DuckDBCache(db_path=tmp_path / "cache.duckdb", cache_dir=tmp_path / "cache")
    result = source.read(cache=cache)
    assert result.processed_records == 400
    rows = cached_rows(cache)
    assert keys(rows) == server_keys(server)

    # Some records change: the incremental read (PyAirbyte passes its state back)
    # updates those rows in place; no key appears twice.
    changed = server.ids()[:5]
    now = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
    server.touch(changed, now)
    result = source.read(cache=cache)
    assert 5 <= result.processed_records < 400  # only what changed, and the null updated_at
    rows = cached_rows(cache)
    assert keys(rows) == server_keys(server)
    by_id = {int(row["id"]): row for row in rows}
    for dest_id in changed:
        assert by_id[dest_id]["requested_destination_name"] == f"Renamed {dest_id}"

    # Deletions reach the cache only through a full refresh that replaces the table.
    server.delete(server.ids()[10:40])
    source.read(cache=cache, write_strategy="replace", force_full_refresh=True)
    assert keys(cached_rows(cache)) == server_keys(server)

    # A failing server: the read raises, and the cache keeps its rows.
    before = keys(cached_rows(cache))
    server.faults.fail_every = 1
    server.faults.fail_status = 503
    with pytest.raises(Exception, match=r"(?i)transient|503|gave up|failed"):
        source.read(cache=cache, write_strategy="replace", force_full_refresh=True)
    assert keys(cached_rows(cache)) == before


def test_a_rejected_token_fails_the_check(make_server: Factory) -> None:
    server = make_server(10, token="the-right-one")  # noqa: S106
    source = get_source(server)
    source.set_config({**config_for(server), "api_token": "a-wrong-one"})
    with pytest.raises(Exception, match="token was rejected"):
        source.check()
