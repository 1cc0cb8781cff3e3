"""Stream type classes for tap-invoca-destinations."""

from __future__ import annotations

import datetime as dt
import sys
import typing as t

from singer_sdk import typing as th
from singer_sdk.helpers.conform import TypeConformanceLevel

from tap_invoca_destinations.client import (
    DEFAULT_API_VERSION,
    InvocaConfigError,
    InvocaError,
    InvocaStream,
)
from tap_invoca_destinations.records import (
    BOOLEAN,
    COLUMNS,
    INTEGER,
    TIMESTAMP,
    PageDecoder,
    RecordShapeError,
    parse_instant,
    shape_record,
    shape_typed,
    unknown_fields,
)

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override

if t.TYPE_CHECKING:
    from collections.abc import Iterator

    from singer_sdk.helpers.types import Context
    from singer_sdk.singerlib import Catalog


BOOKMARK_MARGIN = dt.timedelta(seconds=5)  # clock and rounding slack below the sync's start
MAX_DRIFT_NAMES_LISTED = 20  # unknown field names named in warnings per run; the rest are counted

_SCHEMA_TYPES: dict[str, type[th.JSONTypeHelper[t.Any]]] = {
    INTEGER: th.IntegerType,
    BOOLEAN: th.BooleanType,
    TIMESTAMP: th.DateTimeType,
}


KEY_COLUMNS = ("network_id", "id")


def _schema() -> dict[str, t.Any]:
    properties = [
        th.Property(name, _SCHEMA_TYPES.get(kind, th.StringType), required=name in KEY_COLUMNS)
        for name, kind in COLUMNS.items()
    ]
    schema = th.PropertiesList(*properties).to_dict()
    for name in KEY_COLUMNS:  # the key is never null
        schema["properties"][name]["type"] = [COLUMNS[name]]
    schema["additionalProperties"] = False
    return schema


class DestinationsStream(InvocaStream):
    """Invoca Destinations (``customer_phone_numbers``), one flat record per phone number."""

    name = "destinations"
    # Ids are not documented to be unique across networks; several networks may
    # load into one table.
    primary_keys = KEY_COLUMNS
    replication_key = "updated_at"
    # Records come in id order, not updated_at order: the bookmark is handed to
    # the SDK once, when the whole list was read (never ahead of unseen records).
    is_sorted = False
    schema = _schema()
    # shape_record already emits JSON-ready, schema-typed values; the SDK's
    # recursive conformance pass would only cost time (and mis-coerces booleans).
    TYPE_CONFORMANCE_LEVEL = TypeConformanceLevel.NONE

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Initialise the stream and its schema-drift and bookmark trackers."""
        super().__init__(*args, **kwargs)
        self.unknown_fields_seen: set[str] = set()
        self._unlisted_drift: set[str] = set()
        self._newest_updated_at: str | None = None
        self._sync_started_at = dt.datetime.now(dt.UTC)
        self._starting_bookmark: str | None = None  # the state's, normalised to UTC
        self.page_decoder = PageDecoder()

    @override
    def apply_catalog(self, catalog: Catalog) -> None:
        # Bookmarks are kept only on updated_at; any other key would fail after the
        # records were sent, or bookmark the wrong column.
        super().apply_catalog(catalog)
        if self.replication_key not in {None, "updated_at"}:
            msg = (
                f"catalog: stream '{self.name}' can only use replication-key 'updated_at', "
                f"not {self.replication_key!r}; fix the catalog's metadata (or use FULL_TABLE "
                "without a replication key)"
            )
            raise InvocaError(msg)

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
        for records in self.record_pages(context):
            yield from records

    @override
    def record_pages(self, context: Context | None) -> Iterator[list[dict[str, t.Any]]]:
        network_id = str(self.config["network_id"])
        only_tracked = not self.config.get("include_inactive", True)
        self._sync_started_at = dt.datetime.now(dt.UTC)
        since = self._starting_updated_at(context)

        def filtered(records: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
            if only_tracked:
                records = [r for r in records if r["dynamic_number_pool_id"] is not None]
            if since is not None:
                records = [r for r in records if (u := r["updated_at"]) is None or u >= since]
            return records

        for raw_records in self.iter_pages():
            self.time_extracted = dt.datetime.now(dt.UTC).isoformat()
            # A typed page was decoded strictly: it has no field we do not know (records.py).
            typed = bool(raw_records) and not isinstance(raw_records[0], dict)
            shape = shape_typed if typed else self._shape_and_report_drift
            try:
                records = [shape(raw, network_id) for raw in raw_records]
            except RecordShapeError as exc:
                # The records before the bad one still go out, as they would one by one.
                if before := filtered(_shaped_until_failure(shape, raw_records, network_id)):
                    yield before
                raise InvocaError(str(exc)) from exc
            if records := filtered(records):
                yield records
        self._finish_bookmark()
        if self._unlisted_drift:
            self.logger.warning(
                "Invoca sent %d more unknown field name(s) not listed above",
                len(self._unlisted_drift),
            )

    def _shape_and_report_drift(self, raw: dict[str, t.Any], network_id: str) -> dict[str, t.Any]:
        drift = unknown_fields(raw)
        if drift and not drift <= self.unknown_fields_seen:
            self._report_drift(drift)
        return shape_record(raw, network_id)

    @override
    def observe_replication_value(self, value: t.Any) -> None:
        # A null updated_at moves no bookmark (the SDK would warn for each one).
        if value is not None and (
            self._newest_updated_at is None or value > self._newest_updated_at
        ):
            self._newest_updated_at = value

    def bookmark_ceiling(self) -> dt.datetime:
        """The latest bookmark this sync may write.

        Invoca stores whole seconds, and its clock may differ from ours: a change
        made after the sync began can carry any time from the sync's start, in
        whole seconds, on the earlier of the two clocks. So the bookmark never
        passes that, minus a margin; records at the boundary come again next run
        (the inclusive rule).
        """
        starts = [self._sync_started_at]
        if self.server_date_at_start is not None:
            starts.append(self.server_date_at_start)
        return min(starts).replace(microsecond=0) - BOOKMARK_MARGIN

    def _finish_bookmark(self) -> None:
        if self.replication_method != "INCREMENTAL":
            return
        ceiling = self.bookmark_ceiling().isoformat()
        newest = self._newest_updated_at
        if newest is not None:
            self.commit_bookmark(min(newest, ceiling))
        elif self._starting_bookmark is not None and self._starting_bookmark > ceiling:
            # Nothing newer was seen, but the state's bookmark may not stand: the
            # whole list was read, so nothing older than the ceiling is unseen.
            self.commit_bookmark(ceiling)

    def _starting_updated_at(self, context: Context | None) -> str | None:
        """The inclusive lower bound on updated_at, as an RFC 3339 UTC string.

        Raises:
            InvocaError: If the state's bookmark is not a timestamp.
        """
        if self.replication_method != "INCREMENTAL":
            return None
        bookmark = self.get_starting_replication_key_value(context)
        start_date = self.config.get("start_date")
        from_start_date = None if start_date is None else _utc_text(parse_instant(start_date))
        if bookmark is None:
            return from_start_date
        try:
            moment = parse_instant(bookmark) if isinstance(bookmark, str) else None
        except ValueError:
            moment = None
        if moment is None:
            msg = (
                f"state: the bookmark of stream '{self.name}' (replication_key_value) is not "
                f"a timestamp string: {bookmark!r}"
            )
            raise InvocaConfigError(msg)
        self._starting_bookmark = _utc_text(moment)
        if moment > self._sync_started_at:
            self.logger.warning(
                "The state's bookmark %s is in the future (now: %s); ignoring it, so this "
                "run reads every destination%s",
                bookmark,
                self._sync_started_at.replace(microsecond=0).isoformat(),
                "" if start_date is None else " since start_date",
            )
            return from_start_date
        # Same shape as emitted values (UTC, "+00:00"), so plain string comparison orders them.
        return _utc_text(moment)

    def _report_drift(self, names: frozenset[str]) -> None:
        new = sorted(names - self.unknown_fields_seen)
        self.unknown_fields_seen.update(new)
        if self.page_decoder is not None:
            self.page_decoder.tolerate(new)  # reported: later pages may carry them
        room = MAX_DRIFT_NAMES_LISTED - (len(self.unknown_fields_seen) - len(new))
        listed, unlisted = new[: max(room, 0)], new[max(room, 0) :]
        self._unlisted_drift.update(unlisted)
        if listed:
            self.logger.warning(
                "Invoca sent field(s) this tap does not know; they are not emitted: %s",
                ", ".join(listed),
            )


def _shaped_until_failure(
    shape: t.Callable[[t.Any, str], dict[str, t.Any]], raws: list[t.Any], network_id: str
) -> list[dict[str, t.Any]]:
    """The records shaped before the first one that cannot be."""
    records = []
    for raw in raws:
        try:
            records.append(shape(raw, network_id))
        except RecordShapeError:
            break
    return records


def _utc_text(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat()
