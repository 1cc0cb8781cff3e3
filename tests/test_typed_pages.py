"""Typed page decoding: the same records and errors as the dict path, and refused envelopes."""

from __future__ import annotations

import json
import typing as t

import pytest
from helpers import config_for, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from invoca_server import Faults

from tap_invoca_destinations.client import InvocaError, Reply, decode_page
from tap_invoca_destinations.records import (
    BOOLEAN,
    INTEGER,
    MAX_TOLERATED,
    STRING,
    SUB_OBJECTS,
    TIMESTAMP,
    TOP_LEVEL,
    PageDecoder,
    RecordShapeError,
    shape_record,
    shape_typed,
    unknown_fields,
)

if t.TYPE_CHECKING:
    from pathlib import Path

    from invoca_server import InvocaServer


def reply_of(body: bytes | dict[str, t.Any]) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return Reply(200, "OK", "/api/x.json", {}, raw, 0.1)


# --- Invoca's error envelope in a 200, and ids that fit no bigint --------------------

ENVELOPES = [
    {"data": [], "errors": {"base": ["Network 1234 not found"]}, "recordsTotal": 1000},
    {"errors": {"base": ["Network 1234 not found"]}},
    {"data": [{"id": 1}], "errors": {"base": ["Network 1234 not found"]}},
    {"data": [], "error": "Network 1234 not found"},
    {"error": "Network 1234 not found"},
]


@pytest.mark.parametrize("typed", [False, True])
@pytest.mark.parametrize("body", ENVELOPES)
def test_an_error_envelope_in_a_200_is_a_failure(body: dict[str, t.Any], *, typed: bool) -> None:
    with pytest.raises(InvocaError) as info:
        decode_page(reply_of(body), PageDecoder() if typed else None)
    message = str(info.value)
    assert "HTTP 200 for GET /api/x.json" in message
    assert "'error" in message  # names the member
    assert "Network 1234 not found" in message  # and quotes Invoca's text


@pytest.mark.parametrize("typed", [False, True])
def test_empty_error_members_are_no_error(*, typed: bool) -> None:
    body: dict[str, t.Any] = {"data": [{"id": 1}], "errors": None, "error": {}, "recordsTotal": 1}
    assert decode_page(reply_of(body), PageDecoder() if typed else None).ids == [1]


@pytest.mark.parametrize("typed", [False, True])
@pytest.mark.parametrize(
    "raw_id",
    [2**63, "9223372036854775808", -(2**63) - 1, 10**30, "\u0661", "12\u0663", "1_000", 5.0],
)
def test_ids_that_fit_no_bigint_or_are_not_ascii_digits_are_refused(
    raw_id: object, *, typed: bool
) -> None:
    body = {"data": [{"id": 1}, {"id": raw_id}], "recordsTotal": 2}
    with pytest.raises(InvocaError, match="no integer id") as info:
        decode_page(reply_of(body), PageDecoder() if typed else None)
    assert repr(raw_id) in str(info.value)  # names the record


@pytest.mark.parametrize("typed", [False, True])
def test_the_largest_bigint_and_numeric_strings_are_ids(*, typed: bool) -> None:
    body = {"data": [{"id": "0042"}, {"id": 2**63 - 1}], "recordsTotal": 2}
    page = decode_page(reply_of(body), PageDecoder() if typed else None)
    assert page.ids == [42, 2**63 - 1]


@pytest.mark.parametrize(
    ("raw", "column"),
    [
        ({"id": 2**63}, "id"),
        ({"id": "\u0661\u0662"}, "id"),
        ({"id": 5, "dynamic_number_pool": {"max_pool_size": "\u0661"}}, "max_pool_size"),
        ({"id": 5, "dynamic_number_pool": {"lifetime_seconds": 2**63}}, "lifetime_seconds"),
        ({"id": 5, "dynamic_number_pool": {"id": "99999999999999999999"}}, "id"),
    ],
)
def test_integer_columns_refuse_what_fits_no_bigint(raw: dict[str, t.Any], column: str) -> None:
    column = column if "dynamic_number_pool" not in raw else f"dynamic_number_pool_{column}"
    with pytest.raises(RecordShapeError, match=f"'{column}'"):
        shape_record(raw, "1")


def test_a_200_error_envelope_fails_the_sync_in_one_line(
    tmp_path: Path, make_server: t.Callable[..., InvocaServer]
) -> None:
    server = make_server(300, faults=Faults(error_envelope_every=2))
    run = run_cli(tmp_path, config_for(server, max_concurrency=1))
    assert run.returncode == 1
    failures = [line for line in run.stderr.splitlines() if "Sync failed" in line]
    assert len(failures) == 1, run.stderr
    assert "'errors'" in failures[0]
    assert "Injected: try again later" in failures[0]
    assert "Traceback" not in run.stderr


# --- the typed path decides exactly as the dict path ---------------------------------

ODD_STRINGS = st.sampled_from(["", " 42 ", "0099", "+7", "-3", "true", "F", "yes", "\u0661", "x"])
TIMESTAMPS = st.sampled_from(
    [
        "2023-10-19 03:49:21 -0700",
        "2023-10-19 23:49:21 -0700",
        "2023-12-31 23:59:59 -0930",
        "2024-02-29 00:30:00 +1245",
        "2023-10-19 03:49:21 +0000",
        "2023-10-19 03:49:21 -0000",
        "2023-W42-4 03:49:21 +0000",
        "2023-13-45 03:49:21 +0000",
        "2023-10-19 03:49:21 -07x0",
        "2023-10-19 03:49:21 +2400",
        "0001-01-01 00:00:00 +0100",
        "9999-12-31 23:59:59 -0100",
        "2023-10-19T10:49:21Z",
        "2023-10-19",
        "soon",
    ]
)
VALUES: dict[str, st.SearchStrategy[t.Any]] = {
    STRING: st.one_of(
        st.none(),
        st.text(max_size=5),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    INTEGER: st.one_of(
        st.none(), st.integers(-(2**64), 2**64), ODD_STRINGS, st.booleans(), st.just(5.0)
    ),
    BOOLEAN: st.one_of(st.none(), st.booleans(), st.integers(-1, 2), ODD_STRINGS),
    TIMESTAMP: st.one_of(st.none(), TIMESTAMPS, st.integers(0, 3)),
}


def members(plan: dict[str, str]) -> st.SearchStrategy[dict[str, t.Any]]:
    return st.fixed_dictionaries({}, optional={name: VALUES[kind] for name, kind in plan.items()})


SUB = {obj: st.one_of(st.none(), members(plan), st.just("x")) for obj, plan in SUB_OBJECTS.items()}
RAW = st.builds(
    lambda top, subs, extra: {**top, **subs, **extra},
    members({k: v for k, v in TOP_LEVEL.items() if k != "id"}),
    st.fixed_dictionaries({}, optional=SUB),
    st.dictionaries(st.sampled_from(["new_field", "other"]), st.integers(), max_size=1),
)


def shaped(raws: list[t.Any], shape: t.Callable[[t.Any, str], dict[str, t.Any]]) -> list[t.Any]:
    """Each record shaped, or the message of its error."""
    out: list[t.Any] = []
    for raw in raws:
        try:
            out.append(shape(raw, "1"))
        except RecordShapeError as exc:
            out.append(str(exc))
    return out


@settings(max_examples=300, deadline=None)
@given(raws=st.lists(RAW, min_size=1, max_size=4), tolerate=st.booleans())
def test_typed_pages_shape_exactly_as_the_dict_path(
    raws: list[dict[str, t.Any]], *, tolerate: bool
) -> None:
    body = json.dumps(
        {"data": [{"id": i + 1, **raw} for i, raw in enumerate(raws)], "recordsTotal": 9}
    ).encode()
    by_dicts = decode_page(reply_of(body)).records
    decoder = PageDecoder()
    tolerated = {"new_field", "other"} if tolerate else set()
    decoder.tolerate(tolerated)
    page = decode_page(reply_of(body), decoder)
    if all(isinstance(raw, dict) for raw in page.records):
        return  # the page did not fit the structs: the dict path decides it
    # A typed page holds no field that was not reported, and shapes to the same records.
    assert all(unknown_fields(raw) <= tolerated for raw in by_dicts)
    assert shaped(page.records, shape_typed) == shaped(by_dicts, shape_record)


def test_unknown_fields_keep_a_page_off_the_typed_path_until_reported() -> None:
    body = json.dumps({"data": [{"id": 1, "new_field": 1}], "recordsTotal": 1}).encode()
    decoder = PageDecoder()
    assert isinstance(decode_page(reply_of(body), decoder).records[0], dict)
    decoder.tolerate(["new_field"])
    assert not isinstance(decode_page(reply_of(body), decoder).records[0], dict)


def test_too_many_unknown_names_turn_the_typed_path_off() -> None:
    decoder = PageDecoder()
    decoder.tolerate([f"field_{i}" for i in range(MAX_TOLERATED)])
    states = [decoder.active]
    decoder.tolerate(["one_more"])
    states.append(decoder.active)
    assert states == [True, False]  # a page would otherwise be decoded twice, for nothing
    body = json.dumps({"data": [{"id": 1, "field_0": 1}], "recordsTotal": 1}).encode()
    assert isinstance(decode_page(reply_of(body), decoder).records[0], dict)
