"""Parity: the fast record path writes exactly what the SDK's own path writes.

``tap_invoca_destinations/sdk_seam.py`` overrides SDK internals for speed. Each
test syncs the same server twice, once with ``FAST_RECORD_PATH`` on and once
with it off (every record through the SDK's own code), and compares the Singer
messages, ``time_extracted`` aside. Run these first after an SDK upgrade.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
import typing as t
from pathlib import Path

import pytest
from helpers import config_for
from singer_sdk.singerlib import Catalog

from tap_invoca_destinations.output import BufferedSingerWriter
from tap_invoca_destinations.streams import DestinationsStream
from tap_invoca_destinations.tap import TapInvocaDestinations

if t.TYPE_CHECKING:
    from invoca_server import InvocaServer


def sync(
    config: dict[str, t.Any],
    catalog: dict[str, t.Any] | None,
    monkeypatch: pytest.MonkeyPatch,
    *,
    fast: bool,
) -> tuple[list[dict[str, t.Any]], int]:
    """Sync in process; return the messages (time_extracted removed) and fast-path writes."""
    fast_writes = 0
    write_record = BufferedSingerWriter.write_record
    write_records = BufferedSingerWriter.write_records

    def counting(self: BufferedSingerWriter, message: dict[str, t.Any]) -> None:
        nonlocal fast_writes
        fast_writes += 1
        write_record(self, message)

    def counting_page(
        self: BufferedSingerWriter, records: list[dict[str, t.Any]], head: bytes, tail: bytes
    ) -> None:
        nonlocal fast_writes
        fast_writes += len(records)
        write_records(self, records, head, tail)

    with monkeypatch.context() as patch:
        patch.setattr(DestinationsStream, "FAST_RECORD_PATH", fast)
        patch.setattr(BufferedSingerWriter, "write_record", counting)
        patch.setattr(BufferedSingerWriter, "write_records", counting_page)
        tap = TapInvocaDestinations(
            config=config, catalog=Catalog.from_dict(catalog) if catalog else None
        )
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            tap.sync_all()
    messages = [json.loads(line) for line in buffer.getvalue().splitlines()]
    for message in messages:
        message.pop("time_extracted", None)
    return messages, fast_writes


def catalog_for(config: dict[str, t.Any], **root: t.Any) -> dict[str, t.Any]:
    catalog = TapInvocaDestinations(config=config).catalog_dict
    entry = catalog["streams"][0]
    for item in entry["metadata"]:
        if item["breadcrumb"] == []:
            item["metadata"].update({"selected": True, **root})
    if "forced-replication-method" in root:
        entry["replication_method"] = root["forced-replication-method"]
    return catalog


def deselect(catalog: dict[str, t.Any], *columns: str) -> dict[str, t.Any]:
    for item in catalog["streams"][0]["metadata"]:
        if item["breadcrumb"][-1:] and item["breadcrumb"][-1] in columns:
            item["metadata"]["selected"] = False
    return catalog


def normalise_signposts(messages: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
    """The signpost is the run's start time: equal in shape, not in value."""
    text = json.dumps(messages)
    return t.cast(
        "list[dict[str, t.Any]]",
        json.loads(
            re.sub(r'"replication_key_signpost": "[^"]+"', '"replication_key_signpost": "S"', text)
        ),
    )


def normalise_versions(messages: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
    """Table versions are the run's start second; make two runs comparable."""
    versions = {m["version"] for m in messages if "version" in m}
    assert len(versions) <= 1, "records and ACTIVATE_VERSION disagree on the version"
    return [{**m, "version": "V"} if "version" in m else m for m in messages]


CASES: dict[str, tuple[dict[str, t.Any], bool]] = {
    # name: (extra config, whether the fast path may take the records)
    "plain": ({}, True),
    "stream maps": (
        {
            "stream_maps": {
                "destinations": {
                    "digits": "phone_number.replace('-', '')",
                    "primary_url": "__NULL__",
                    "__filter__": "id % 3 != 0",
                }
            }
        },
        False,
    ),
    "stream alias": ({"stream_maps": {"destinations": {"__alias__": "invoca_numbers"}}}, False),
    "flattening": ({"flattening_enabled": True, "flattening_max_depth": 2}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_matches_the_sdk_path(
    server: InvocaServer, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    extra, fast_allowed = CASES[case]
    config = config_for(server, page_size=40, **extra)
    fast, fast_writes = sync(config, None, monkeypatch, fast=True)
    slow, slow_writes = sync(config, None, monkeypatch, fast=False)
    assert slow_writes == 0
    assert fast_writes == (250 if fast_allowed else 0)
    assert fast == slow
    assert sum(m["type"] == "RECORD" for m in fast) > 100


def test_checkpoints_inside_a_page(server: InvocaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A STATE every 37 records: the fast path cuts its 40-record pages where the SDK writes one.
    monkeypatch.setattr(DestinationsStream, "STATE_MSG_FREQUENCY", 37)
    config = config_for(server, page_size=40)
    catalog = catalog_for(config, **{"forced-replication-method": "INCREMENTAL"})
    fast, fast_writes = sync(config, catalog, monkeypatch, fast=True)
    slow, _ = sync(config, catalog, monkeypatch, fast=False)
    assert fast_writes == 250
    assert normalise_signposts(fast) == normalise_signposts(slow)
    kinds = "".join("R" if m["type"] == "RECORD" else m["type"][0] for m in fast)
    assert kinds.startswith("S" + "R" * 37 + "S" + "R")  # the SDK's STATE, inside a page


def test_deselected_columns(server: InvocaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    config = config_for(server)
    catalog = deselect(catalog_for(config), "primary_url", "dynamic_number_pool_name")
    fast, fast_writes = sync(config, catalog, monkeypatch, fast=True)
    slow, _ = sync(config, catalog, monkeypatch, fast=False)
    assert fast_writes == 0  # deselection is the SDK's job
    assert fast == slow
    assert all("primary_url" not in m["record"] for m in fast if m["type"] == "RECORD")


def test_full_table_with_activate_version(
    server: InvocaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_for(server, emit_activate_version_messages=True)
    catalog = catalog_for(config, **{"forced-replication-method": "FULL_TABLE"})
    fast, fast_writes = sync(config, catalog, monkeypatch, fast=True)
    slow, _ = sync(config, catalog, monkeypatch, fast=False)
    assert fast_writes == 250
    assert normalise_versions(fast) == normalise_versions(slow)
    assert any(m["type"] == "ACTIVATE_VERSION" for m in fast)
    assert all("version" in m for m in fast if m["type"] == "RECORD")


def test_batch_messages_and_files(
    server: InvocaServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def config_into(folder: Path) -> dict[str, t.Any]:
        folder.mkdir()
        return config_for(
            server,
            batch_config={
                "encoding": {"format": "jsonl", "compression": "none"},
                "storage": {"root": folder.as_uri(), "prefix": "destinations-"},
                "batch_size": 100,
            },
        )

    fast, _ = sync(config_into(tmp_path / "fast"), None, monkeypatch, fast=True)
    slow, _ = sync(config_into(tmp_path / "slow"), None, monkeypatch, fast=False)

    def contents(messages: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
        rows = []
        for message in messages:
            if message["type"] == "BATCH":
                for uri in message["manifest"]:
                    data = Path(uri.removeprefix("file://")).read_bytes()
                    if data[:2] == b"\x1f\x8b":  # the SDK gzips jsonl batches
                        data = gzip.decompress(data)
                    rows += [json.loads(line) for line in data.splitlines()]
        return rows

    assert contents(fast) == contents(slow)
    assert len(contents(fast)) == 250

    def others(messages: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
        return normalise_signposts([m for m in messages if m["type"] != "BATCH"])

    assert others(fast) == others(slow)
