"""Unit tests: flattening, coercion and timestamp parsing of single records."""

from __future__ import annotations

import datetime as dt
import typing as t

import pendulum
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tap_invoca_destinations import records
from tap_invoca_destinations.records import (
    COLUMNS,
    RecordShapeError,
    invoca_timestamp,
    shape_record,
    to_rfc3339_utc,
    unknown_fields,
)

FULL: dict[str, t.Any] = {
    "id": 17,
    "country_code": "1",
    "phone_number": "202-555-0001",
    "primary_url": "",
    "requested_destination_name": "Zürich — Süd",
    "acknowledged_at": None,
    "ignored_at": None,
    "notified_at": "2023-10-19 03:49:21 +0000",
    "created_at": "2023-10-19 03:49:21 -0700",
    "updated_at": "2023-10-20 00:00:00 +0530",
    "advertiser_campaign": {"id_from_network": "7", "name": "Spring", "status": "Activated"},
    "dynamic_number_pool": {
        "id": "42",
        "id_from_network": "RP-1",
        "name": "Pool",
        "object_url": "https://invoca.net/x",
        "pool_type": "Custom",
        "destination_type": "Advertiser",
        "lifetime_seconds": "3600",
        "max_pool_size": 5,
        "preferred": "false",
        "is_first_preference": True,
        "use_custom_data": "TRUE",
        "destination_phone_number": "202-555-0002",
        "fill_immediately": 0,
    },
}


def test_contract_example_timestamp() -> None:
    assert to_rfc3339_utc("2023-10-19 03:49:21 -0700") == "2023-10-19T10:49:21+00:00"


@pytest.mark.parametrize(
    "value",
    [
        "2023-10-19 03:49:21 -0700",
        "2023-10-19 03:49:21 +0000",
        "2023-12-31 23:59:59 -0930",
        "2024-02-29 00:30:00 +1245",
        "2023-03-12 02:30:00 +0530",
    ],
)
def test_fast_path_agrees_with_pendulum(value: str) -> None:
    expected = pendulum.from_format(value, "YYYY-MM-DD HH:mm:ss ZZ").in_timezone("UTC")
    assert to_rfc3339_utc(value) == expected.isoformat()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2023-10-19T10:49:21Z", "2023-10-19T10:49:21+00:00"),
        ("2023-10-19T03:49:21-07:00", "2023-10-19T10:49:21+00:00"),
        ("2023-10-19T10:49:21.250+00:00", "2023-10-19T10:49:21.250000+00:00"),
    ],
)
def test_other_forms_fall_back_to_pendulum(value: str, expected: str) -> None:
    assert to_rfc3339_utc(value) == expected


@pytest.mark.parametrize(
    "value", ["yesterday", "2023-13-45 03:49:21 -0700", "2023-10-19 03:49:21 -07x0"]
)
def test_bad_timestamps_raise(value: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        to_rfc3339_utc(value)


def test_shape_full_record() -> None:
    record = shape_record(FULL, "1234")
    assert list(record) == list(COLUMNS)
    assert record["id"] == 17
    assert record["network_id"] == "1234"
    assert record["primary_url"] == ""
    assert record["requested_destination_name"] == "Zürich — Süd"
    assert record["created_at"] == "2023-10-19T10:49:21+00:00"
    assert record["updated_at"] == "2023-10-19T18:30:00+00:00"
    assert record["notified_at"] == "2023-10-19T03:49:21+00:00"
    assert record["acknowledged_at"] is None
    assert record["advertiser_campaign_name"] == "Spring"
    assert record["dynamic_number_pool_id"] == 42
    assert record["dynamic_number_pool_lifetime_seconds"] == 3600
    assert record["dynamic_number_pool_max_pool_size"] == 5
    assert record["dynamic_number_pool_preferred"] is False
    assert record["dynamic_number_pool_is_first_preference"] is True
    assert record["dynamic_number_pool_use_custom_data"] is True
    assert record["dynamic_number_pool_fill_immediately"] is False


@pytest.mark.parametrize("form", ["null", "absent", "all-null"])
def test_missing_sub_objects_give_null_columns(form: str) -> None:
    raw = {k: v for k, v in FULL.items() if k != "dynamic_number_pool"}
    if form == "null":
        raw["dynamic_number_pool"] = None
    elif form == "all-null":
        raw["dynamic_number_pool"] = dict.fromkeys(FULL["dynamic_number_pool"])
    record = shape_record(raw, "1")
    pool_columns = [c for c in COLUMNS if c.startswith("dynamic_number_pool_")]
    assert len(pool_columns) == 13
    assert all(record[c] is None for c in pool_columns)
    assert record["advertiser_campaign_status"] == "Activated"


def test_absent_fields_are_null_and_id_string_is_coerced() -> None:
    record = shape_record({"id": "0099"}, "1")
    assert record["id"] == 99
    assert set(record) == set(COLUMNS)
    assert all(v is None for k, v in record.items() if k not in {"id", "network_id"})


@pytest.mark.parametrize(
    ("raw", "column", "value"),
    [
        ({"id": "value"}, "id", "value"),
        (
            {"id": 5, "dynamic_number_pool": {"max_pool_size": "lots"}},
            "dynamic_number_pool_max_pool_size",
            "lots",
        ),
        (
            {"id": 5, "dynamic_number_pool": {"preferred": "maybe"}},
            "dynamic_number_pool_preferred",
            "maybe",
        ),
        ({"id": 5, "dynamic_number_pool": {"preferred": 2}}, "dynamic_number_pool_preferred", 2),
        ({"id": 5, "created_at": "soon"}, "created_at", "soon"),
        ({"id": 5, "updated_at": ""}, "updated_at", ""),
        ({"id": 5, "phone_number": {"n": 1}}, "phone_number", {"n": 1}),
        ({"id": 5, "advertiser_campaign": "x"}, "advertiser_campaign", "x"),
    ],
)
def test_uncoercible_values_name_stream_id_column_value(
    raw: dict, column: str, value: object
) -> None:
    with pytest.raises(RecordShapeError) as caught:
        shape_record(raw, "1")
    message = str(caught.value)
    assert "destinations" in message
    assert repr(raw["id"]) in message
    assert f"'{column}'" in message
    assert repr(value) in message


def test_missing_id_is_an_error() -> None:
    with pytest.raises(RecordShapeError, match="'id'"):
        shape_record({"phone_number": "1"}, "1")


def test_numbers_in_string_columns_become_strings() -> None:
    assert shape_record({"id": 1, "country_code": 44}, "1")["country_code"] == "44"


def test_unknown_fields_are_named_with_their_object() -> None:
    raw = {
        **FULL,
        "brand_new": 1,
        "dynamic_number_pool": {**FULL["dynamic_number_pool"], "auto": 1},
    }
    assert unknown_fields(raw) == {"brand_new", "dynamic_number_pool.auto"}
    assert unknown_fields(FULL) == set()
    assert "brand_new" not in shape_record(raw, "1")


def test_timestamp_output_is_an_instant_in_utc() -> None:
    out = to_rfc3339_utc("2023-10-19 03:49:21 -0700")
    parsed = dt.datetime.fromisoformat(out)
    assert parsed.utcoffset() == dt.timedelta(0)
    assert parsed == dt.datetime(2023, 10, 19, 10, 49, 21, tzinfo=dt.UTC)


def _outcome(convert: t.Callable[[str, object, str], str], value: str) -> str:
    try:
        return convert(value, 1, "updated_at")
    except RecordShapeError as exc:
        return f"error: {exc}"


TWO_DIGITS = st.integers(min_value=0, max_value=99).map("{:02d}".format)
INVOCA_FORM = st.builds(
    "{}-{}-{} {}:{}:{} {}{}{}".format,
    st.sampled_from(["2023", "2024", "0001", "9999"]),
    st.sampled_from(["01", "02", "12", "13"]),
    st.sampled_from(["01", "28", "29", "31", "32"]),
    TWO_DIGITS,
    TWO_DIGITS,
    TWO_DIGITS,
    st.sampled_from("+-"),
    st.sampled_from(["00", "05", "07", "14", "23", "24"]),
    st.sampled_from(["00", "30", "45", "60"]),
)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(values=st.lists(INVOCA_FORM, min_size=1, max_size=30))
def test_invoca_timestamps_convert_as_the_general_path(values: list[str]) -> None:
    # The quick conversion (by text, from dates seen before) gives what the general
    # one gives, error included, whether the date was seen before (warm) or not (cold).
    expected = [_outcome(records._to_timestamp, value) for value in values]  # noqa: SLF001
    assert [_outcome(invoca_timestamp, value) for value in values] == expected
    assert [_outcome(invoca_timestamp, value) for value in values] == expected
    cold = []
    for value in values:
        records.UTC_DAYS.clear()
        cold.append(_outcome(invoca_timestamp, value))
    assert cold == expected


def test_the_dates_kept_are_bounded() -> None:
    records.UTC_DAYS.clear()
    first = dt.date(2020, 1, 1)
    for days in range(records.MAX_UTC_DAYS + 10):
        day, next_day = first + dt.timedelta(days=days), first + dt.timedelta(days=days + 1)
        utc = invoca_timestamp(f"{day} 20:00:00 -0700", 1, "c")
        assert utc == f"{next_day}T03:00:00+00:00"
    assert 0 < len(records.UTC_DAYS) <= records.MAX_UTC_DAYS
