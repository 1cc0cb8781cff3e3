"""Stream type classes for tap-invoca-destinations."""

from __future__ import annotations

import datetime as dt
import sys
import typing as t

from singer_sdk import typing as th
from singer_sdk.helpers.conform import TypeConformanceLevel
from singer_sdk.mapper import SameRecordTransform

from tap_invoca_destinations.client import DEFAULT_API_VERSION, InvocaError, InvocaStream
from tap_invoca_destinations.output import BufferedSingerWriter
from tap_invoca_destinations.records import (
    BOOLEAN,
    COLUMNS,
    INTEGER,
    TIMESTAMP,
    RecordShapeError,
    shape_record,
    unknown_fields,
)

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override

if t.TYPE_CHECKING:
    from collections.abc import Iterator

    from singer_sdk.helpers.types import Context


_SCHEMA_TYPES: dict[str, type[th.JSONTypeHelper[t.Any]]] = {
    INTEGER: th.IntegerType,
    BOOLEAN: th.BooleanType,
    TIMESTAMP: th.DateTimeType,
}


def _schema() -> dict[str, t.Any]:
    properties = [
        th.Property(name, _SCHEMA_TYPES.get(kind, th.StringType), required=name == "id")
        for name, kind in COLUMNS.items()
    ]
    schema = th.PropertiesList(*properties).to_dict()
    schema["properties"]["id"]["type"] = ["integer"]
    schema["additionalProperties"] = False
    return schema


class DestinationsStream(InvocaStream):
    """Invoca Destinations (``customer_phone_numbers``), one flat record per phone number."""

    name = "destinations"
    primary_keys = ("id",)
    replication_key = "updated_at"
    # Records come in id order, not updated_at order: the bookmark is promoted
    # only when the stream completes (never ahead of unseen records).
    is_sorted = False
    schema = _schema()
    # shape_record already emits JSON-ready, schema-typed values; the SDK's
    # recursive conformance pass would only cost time (and mis-coerces booleans).
    TYPE_CONFORMANCE_LEVEL = TypeConformanceLevel.NONE

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Initialise the stream and its schema-drift tracker."""
        super().__init__(*args, **kwargs)
        self.unknown_fields_seen: set[str] = set()
        self._direct_write: bool | None = None
        self._time_extracted = ""
        self._newest: dict[str, t.Any] | None = None  # record with the greatest updated_at

    @property
    @override
    def path(self) -> str:  # type: ignore[override]
        return (
            f"/api/{self.config.get('api_version', DEFAULT_API_VERSION)}"
            f"/{self.config['network_id']}/customer_phone_numbers.json"
        )

    @override
    def filter_params(self) -> dict[str, t.Any]:
        params: dict[str, t.Any] = {"sort_by": "id", "sort_dir": "asc"}
        if self.config.get("status"):
            params["status"] = self.config["status"]
        if self.config.get("query"):
            params["query"] = self.config["query"]
        if not self.config.get("include_inactive", True):
            # Older API versions know include_inactive, newer ones status=tracked.
            params["include_inactive"] = "false"
            params["status"] = "tracked"
        return params

    @override
    def get_records(self, context: Context | None) -> Iterator[dict[str, t.Any]]:
        network_id = str(self.config["network_id"])
        only_tracked = not self.config.get("include_inactive", True)
        since = self._starting_updated_at(context)
        try:
            for raw_records in self.iter_pages():
                self._time_extracted = dt.datetime.now(dt.timezone.utc).isoformat()
                for raw in raw_records:
                    drift = unknown_fields(raw)
                    if drift and not drift <= self.unknown_fields_seen:
                        self._report_drift(drift)
                    try:
                        record = shape_record(raw, network_id)
                    except RecordShapeError as exc:
                        raise InvocaError(str(exc)) from exc
                    if only_tracked and record["dynamic_number_pool_id"] is None:
                        continue
                    updated_at = record["updated_at"]
                    if since is not None and updated_at is not None and updated_at < since:
                        continue
                    yield record
        finally:
            # Records buffered ahead of a failure still go out (with no STATE after them).
            writer = self._tap.message_writer
            if isinstance(writer, BufferedSingerWriter):
                writer.flush()
        self._advance_bookmark()

    @override
    def _write_record_message(self, record: dict[str, t.Any]) -> None:
        # The SDK copies and walks every record (deselection, conformance) and
        # builds a message object for it; shaped records need none of that, so
        # unless stream maps or deselection are in play they go out directly.
        if self._direct_write is None:
            self._direct_write = self._can_write_directly()
        if not self._direct_write:
            super()._write_record_message(record)
            return
        message: dict[str, t.Any] = {"type": "RECORD", "stream": self.name, "record": record}
        if self._stream_version is not None:
            message["version"] = self._stream_version
        message["time_extracted"] = self._time_extracted
        t.cast("BufferedSingerWriter", self._tap.message_writer).write_record(message)
        self.state_manager.is_flushed = False

    def _can_write_directly(self) -> bool:
        maps = self.stream_maps
        return (
            isinstance(self._tap.message_writer, BufferedSingerWriter)
            and len(maps) == 1
            and type(maps[0]) is SameRecordTransform
            and maps[0].stream_alias == self.name
            and not self.config.get("flattening_enabled")
            and all(self.mask.get(("properties", name), True) for name in COLUMNS)
        )

    @override
    def _process_record(
        self,
        record: dict[str, t.Any],
        child_context: Context | None = None,
        partition_context: Context | None = None,
    ) -> None:
        # The SDK builds a child context per record for child streams and
        # partitions; this stream has neither, so there is nothing to do.
        if self.child_streams or partition_context:
            super()._process_record(record, child_context, partition_context)

    @override
    def _increment_stream_state(
        self, latest_record: dict[str, t.Any], *, context: Context | None = None
    ) -> None:
        # Called per record; only the newest record matters to an unsorted stream's
        # bookmark, so keep it and hand it to the SDK once per page (_advance_bookmark).
        # A null updated_at moves no bookmark (the SDK would warn for each one).
        updated_at = latest_record.get("updated_at")
        if updated_at is not None and (
            self._newest is None or updated_at > self._newest["updated_at"]
        ):
            self._newest = latest_record

    def _advance_bookmark(self) -> None:
        if self._newest is not None:
            super()._increment_stream_state(self._newest, context=self.context)
            self._newest = None

    def _starting_updated_at(self, context: Context | None) -> str | None:
        """The inclusive lower bound on updated_at, as an RFC 3339 UTC string."""
        if self.replication_method != "INCREMENTAL":
            return None
        start = self.get_starting_timestamp(context)
        if start is None:
            return None
        # Same shape as emitted values (UTC, "+00:00"), so plain string comparison orders them.
        return start.astimezone(dt.timezone.utc).isoformat()

    def _report_drift(self, names: frozenset[str]) -> None:
        new = sorted(names - self.unknown_fields_seen)
        self.unknown_fields_seen.update(new)
        self.logger.warning(
            "Invoca sent field(s) this tap does not know; they are not emitted: %s",
            ", ".join(new),
        )
