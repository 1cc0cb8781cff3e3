"""Integration tests over real HTTP against the local Invoca-compatible server."""

from __future__ import annotations

import datetime as dt
import logging
import typing as t

import pytest
from helpers import config_for, run_in_process
from invoca_server import Faults, InvocaServer
from jsonschema import Draft7Validator, FormatChecker

from tap_invoca_destinations.client import InvocaError
from tap_invoca_destinations.records import COLUMNS

if t.TYPE_CHECKING:
    from collections.abc import Callable

MakeServer = "Callable[..., InvocaServer]"


def by_id(records: list[dict[str, t.Any]]) -> dict[int, dict[str, t.Any]]:
    result = {r["id"]: r for r in records}
    assert len(result) == len(records), "duplicate ids emitted"
    return result


def test_full_sync_equals_server_value_by_value(server: InvocaServer) -> None:
    run = run_in_process(config_for(server))
    expected = server.expected_records()
    assert len(run.records) == len(expected) == 250
    assert [r["id"] for r in run.records] == [e["id"] for e in expected]
    for got, want in zip(run.records, expected, strict=False):
        assert got == want, f"record {want['id']} differs"
        assert list(got) == list(COLUMNS)


def test_every_record_validates_against_the_schema_message(server: InvocaServer) -> None:
    run = run_in_process(config_for(server))
    validator = Draft7Validator(run.schema, format_checker=FormatChecker())
    for record in run.records:
        validator.validate(record)
    assert run.schema["properties"]["id"]["type"] == ["integer"]
    assert set(run.schema["properties"]) == set(COLUMNS)


def test_quirks_are_present_in_the_served_data(server: InvocaServer) -> None:
    # Guard against the fake server drifting away from the quirks in docs/invoca_api.md.
    wire = [server.wire_record(i) for i in server.ids()]
    assert any(isinstance(w["id"], str) for w in wire)
    assert any("dynamic_number_pool" not in w for w in wire)
    assert any(w.get("dynamic_number_pool", 1) is None for w in wire)
    assert any(
        isinstance(w.get("dynamic_number_pool"), dict)
        and all(v is None for v in w["dynamic_number_pool"].values())
        for w in wire
    )
    assert any(w["updated_at"] is None for w in wire)
    assert {w["created_at"][-5:] for w in wire} >= {"-0700", "+0000", "+0530"}
    assert any(w.get("call_recording_enabled") for w in wire)


@pytest.mark.parametrize(("page_size", "cap"), [(100, 0), (7, 0), (1, 0), (100, 30), (50, 9)])
@pytest.mark.parametrize("concurrency", [1, 4])
def test_paging_short_and_capped_pages(
    make_server: Callable[..., InvocaServer], page_size: int, cap: int, concurrency: int
) -> None:
    server = make_server(203, faults=Faults(page_cap=cap))
    run = run_in_process(config_for(server, page_size=page_size, max_concurrency=concurrency))
    assert [r["id"] for r in run.records] == server.ids()


def test_limit_and_start_sent_follow_page_size(server: InvocaServer) -> None:
    run_in_process(config_for(server, page_size=100, max_concurrency=1))
    list_paths = [p for p in server.stats.paths if "customer_phone_numbers.json" in p]
    assert "limit=100&start=0" in list_paths[0]
    # Later pages re-read the previous page's last record as their anchor.
    assert "limit=101&start=99" in list_paths[1]
    assert "sort_by=id" in list_paths[0]
    assert "sort_dir=asc" in list_paths[0]


@pytest.mark.parametrize(
    ("count", "proof"),
    [
        (950, [949]),  # the page at 899 is short but new: the page after it proves the end
        (1000, [999]),  # the page at 899 is full: one more request proves the end
    ],
)
@pytest.mark.parametrize("concurrency", [1, 4])
def test_prefetching_asks_for_no_page_past_the_end(
    make_server: Callable[..., InvocaServer], concurrency: int, count: int, proof: list[int]
) -> None:
    server = make_server(count)
    run = run_in_process(config_for(server, page_size=100, max_concurrency=concurrency))
    assert len(run.records) == count
    # 100 records, then 100 new ones per page (each re-reads one as its anchor).
    starts = sorted(int(p.rsplit("start=", 1)[1]) for p in server.stats.paths)
    assert starts == [0, 99, 199, 299, 399, 499, 599, 699, 799, 899, *proof]


@pytest.mark.parametrize("status", ["ignored", "tracked", "discovered"])
def test_status_filter(server: InvocaServer, status: str) -> None:
    run = run_in_process(config_for(server, status=status))
    expected = server.expected_records(status=status)
    assert expected
    assert run.records == expected
    assert all(f"status={status}" in p for p in server.stats.paths)


def test_include_inactive_false_sends_both_parameters(server: InvocaServer) -> None:
    run = run_in_process(config_for(server, include_inactive=False))
    assert run.records == server.expected_records(status="tracked")
    assert all("include_inactive=false" in p and "status=tracked" in p for p in server.stats.paths)


def test_include_inactive_false_drops_records_without_ringpool_whatever_the_server_does(
    server: InvocaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An API version that ignores both parameters: the tap must still filter.
    original = server._listing  # noqa: SLF001 - stands in for an API version

    def ignoring_filters(query: dict[str, str]) -> list[int]:
        return original({k: v for k, v in query.items() if k not in {"status", "include_inactive"}})

    monkeypatch.setattr(server, "_listing", ignoring_filters)
    run = run_in_process(config_for(server, include_inactive=False))
    assert run.records == server.expected_records(status="tracked")
    assert all(r["dynamic_number_pool_id"] is not None for r in run.records)


def test_query_filter(server: InvocaServer) -> None:
    target = server.expected_records()[37]
    run = run_in_process(config_for(server, query=target["phone_number"]))
    assert target in run.records
    assert all(target["phone_number"] in r["phone_number"] for r in run.records)
    assert len(run.records) < 250


def test_unknown_fields_reported_once(
    server: InvocaServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        run = run_in_process(config_for(server))
    drift = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(drift) == 1
    assert "call_recording_enabled" in drift[0]
    assert "dynamic_number_pool.auto_scale" in drift[0]
    assert all("call_recording_enabled" not in r for r in run.records)


def test_uncoercible_value_stops_the_sync(server: InvocaServer) -> None:
    victim = server.ids()[120]
    wire = server.wire_record(victim)
    wire["dynamic_number_pool"] = {"max_pool_size": "twelve"}
    server.set_wire(victim, wire)
    with pytest.raises(
        InvocaError,
        match=rf"record id {victim}: column 'dynamic_number_pool_max_pool_size'.*'twelve'",
    ):
        run_in_process(config_for(server))


# --- incremental -------------------------------------------------------------------


def _bookmark(states: list[dict[str, t.Any]]) -> str:
    return states[-1]["bookmarks"]["destinations"]["replication_key_value"]


def test_incremental_round_trip(server: InvocaServer) -> None:
    first = run_in_process(config_for(server))
    assert len(first.records) == 250
    bookmark = _bookmark(first.states)
    non_null = [r["updated_at"] for r in first.records if r["updated_at"]]
    assert bookmark == max(non_null)

    # Nothing changed: only the boundary records (inclusive) and null updated_at come back.
    second = run_in_process(config_for(server), state=first.states[-1])
    nulls = {r["id"] for r in first.records if r["updated_at"] is None}
    assert nulls
    boundary = {r["id"] for r in first.records if r["updated_at"] == bookmark}
    assert {r["id"] for r in second.records} == nulls | boundary

    # Change three destinations: exactly those come back, plus the boundary and null ones.
    changed = server.ids()[10:13]
    later = dt.datetime.fromisoformat(bookmark) + dt.timedelta(days=3)
    server.touch(changed, later)
    third = run_in_process(config_for(server), state=second.states[-1])
    assert {r["id"] for r in third.records} == nulls | boundary | set(changed)
    assert all(
        r["requested_destination_name"].startswith("Renamed")
        for r in third.records
        if r["id"] in changed
    )
    assert _bookmark(third.states) == later.astimezone(dt.UTC).isoformat()


def test_start_date_is_an_inclusive_lower_bound(server: InvocaServer) -> None:
    expected = server.expected_records()
    cut = sorted(r["updated_at"] for r in expected if r["updated_at"])[100]
    run = run_in_process(config_for(server, start_date=cut))
    want = {r["id"] for r in expected if r["updated_at"] is None or r["updated_at"] >= cut}
    assert {r["id"] for r in run.records} == want
    assert any(r["updated_at"] == cut for r in run.records)


def test_full_table_when_the_catalog_asks(server: InvocaServer) -> None:
    from tap_invoca_destinations.tap import TapInvocaDestinations  # noqa: PLC0415

    catalog = TapInvocaDestinations(config=config_for(server)).catalog_dict
    entry = catalog["streams"][0]
    entry["replication_method"] = "FULL_TABLE"
    for item in entry["metadata"]:
        if item["breadcrumb"] == []:
            item["metadata"]["selected"] = True
            item["metadata"]["forced-replication-method"] = "FULL_TABLE"
    state = {
        "bookmarks": {
            "destinations": {
                "replication_key": "updated_at",
                "replication_key_value": "2099-01-01T00:00:00+00:00",
            }
        }
    }
    run = run_in_process(config_for(server), state=state, catalog=catalog)
    assert len(run.records) == 250
    assert not any(
        s.get("bookmarks", {}).get("destinations", {}).get("replication_key_value")
        not in {None, "2099-01-01T00:00:00+00:00"}
        for s in run.states
    )


def test_deselected_columns_are_not_emitted(server: InvocaServer) -> None:
    from tap_invoca_destinations.tap import TapInvocaDestinations  # noqa: PLC0415

    catalog = TapInvocaDestinations(config=config_for(server)).catalog_dict
    for item in catalog["streams"][0]["metadata"]:
        if item["breadcrumb"] == []:
            item["metadata"]["selected"] = True
        elif item["breadcrumb"] == ["properties", "primary_url"]:
            item["metadata"]["selected"] = False
    run = run_in_process(config_for(server), catalog=catalog)
    assert len(run.records) == 250
    assert all("primary_url" not in r for r in run.records)
    assert all("phone_number" in r for r in run.records)
