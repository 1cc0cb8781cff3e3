"""Record shaping: one raw Invoca destination in, one flat, typed record out."""

from __future__ import annotations

import datetime as dt
import re
import typing as t

STRING, INTEGER, BOOLEAN, TIMESTAMP = "string", "integer", "boolean", "timestamp"

# Top-level scalar fields of a destination, in column order, with their column kind.
TOP_LEVEL: dict[str, str] = {
    "id": INTEGER,
    "country_code": STRING,
    "phone_number": STRING,
    "primary_url": STRING,
    "requested_destination_name": STRING,
    "created_at": TIMESTAMP,
    "updated_at": TIMESTAMP,
    "acknowledged_at": TIMESTAMP,
    "ignored_at": TIMESTAMP,
    "notified_at": TIMESTAMP,
}

# Sub-objects flattened into `<object>_<member>` columns.
SUB_OBJECTS: dict[str, dict[str, str]] = {
    "advertiser_campaign": {
        "id_from_network": STRING,
        "name": STRING,
        "status": STRING,
    },
    "dynamic_number_pool": {
        "id": INTEGER,
        "id_from_network": STRING,
        "name": STRING,
        "object_url": STRING,
        "pool_type": STRING,
        "destination_type": STRING,
        "lifetime_seconds": INTEGER,
        "max_pool_size": INTEGER,
        "preferred": BOOLEAN,
        "is_first_preference": BOOLEAN,
        "use_custom_data": BOOLEAN,
        "destination_phone_number": STRING,
        "fill_immediately": BOOLEAN,
    },
}

# Every output column and its kind, in the order records carry them.
COLUMNS: dict[str, str] = {
    "id": INTEGER,
    "network_id": STRING,
    **{name: kind for name, kind in TOP_LEVEL.items() if name != "id"},
    **{
        f"{obj}_{member}": kind
        for obj, members in SUB_OBJECTS.items()
        for member, kind in members.items()
    },
}

KNOWN_TOP_LEVEL = frozenset(TOP_LEVEL) | frozenset(SUB_OBJECTS)
_MEMBER_SETS = {obj: frozenset(members) for obj, members in SUB_OBJECTS.items()}
_NOTHING: frozenset[str] = frozenset()

_OFFSET_FORM = re.compile(r"[+-](?:[01]\d|2[0-3])[0-5]\d\Z")  # -0700; hours 00-23, minutes 00-59
# Forms accepted besides Invoca's own: ISO 8601 calendar dates and date-times, in
# the extended (2024-01-01T00:00:00Z, RFC 3339) and the basic (20240101T000000Z)
# notation; ASCII digits only.
_ISO_OFFSET = r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3])(?::?[0-5][0-9])?)?"
_ISO_FORM = re.compile(
    r"(?:[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]{1,9})?)?" + _ISO_OFFSET + r")?"
    r"|[0-9]{8}(?:T[0-9]{4}(?:[0-9]{2}(?:[.,][0-9]{1,9})?)?" + _ISO_OFFSET + r")?)\Z"
)
_OFFSETS: dict[str, dt.timedelta] = {}  # "-0700" -> timedelta, filled as seen
_TRUE = frozenset({"true", "t", "1", "yes"})
_FALSE = frozenset({"false", "f", "0", "no"})
_INTEGER_STRING = re.compile(r"[+-]?\d+\Z")


class RecordShapeError(ValueError):
    """A source value cannot be turned into its column's type."""

    def __init__(self, record_id: object, column: str, value: object, expected: str) -> None:
        """Describe the bad value.

        Args:
            record_id: The destination's id (raw, as received).
            column: The output column.
            value: The offending source value.
            expected: The column kind that was expected.
        """
        self.record_id = record_id
        self.column = column
        self.value = value
        super().__init__(
            f"stream 'destinations', record id {record_id!r}: column '{column}' "
            f"expects {expected}, got {value!r}",
        )


def _utc_offset(text: str) -> dt.timedelta:
    """Return the offset of Invoca's ``-0700`` notation, cached per distinct offset."""
    offset = _OFFSETS.get(text)
    if offset is None:
        if not _OFFSET_FORM.match(text):
            msg = f"not a UTC offset: {text!r}"
            raise ValueError(msg)
        offset = dt.timedelta(hours=int(text[1:3]), minutes=int(text[3:5]))
        offset = -offset if text[0] == "-" else offset
        _OFFSETS[text] = offset
    return offset


def parse_instant(value: str) -> dt.datetime:
    """Parse a timestamp strictly into an aware UTC datetime.

    Accepted: Invoca's form (``2023-10-19 03:49:21 -0700``) and ISO 8601
    calendar dates and date-times in the extended (RFC 3339: ``2023-10-19``,
    ``2023-10-19T10:49:21Z``, ``…+05:30``, ``…+05``) or the basic notation
    (``20231019``, ``20231019T104921Z``, ``20231019T1049+0530``), with an
    optional fraction of a second; a value without an offset is taken as UTC.
    Anything else (week or ordinal dates, non-ASCII digits, offsets of 24 hours
    or more) is refused.

    Args:
        value: The text to parse.

    Returns:
        The instant, in UTC.

    Raises:
        ValueError: If the value is not one of the accepted forms.
    """
    try:
        return _parse_instant(value)
    except OverflowError:
        msg = f"out of the representable range: {value!r}"
        raise ValueError(msg) from None


def _parse_instant(value: str) -> dt.datetime:
    if (
        len(value) == 25  # noqa: PLR2004 - the documented form's length
        and value[10] == " "
        and value[13] == ":"
        and value[16] == ":"
        and value[19] == " "
    ):
        local = dt.datetime.fromisoformat(value[:19])
        if local.tzinfo is None:
            return (local - _utc_offset(value[20:])).replace(tzinfo=dt.UTC)
    msg = f"not a date-time: {value!r}"
    if not _ISO_FORM.match(value):
        raise ValueError(msg)
    import pendulum  # noqa: PLC0415 - imported on first need: it costs 0.2 s at startup

    parsed = pendulum.parse(value, exact=True)
    if isinstance(parsed, pendulum.Date) and not isinstance(parsed, pendulum.DateTime):
        parsed = pendulum.datetime(parsed.year, parsed.month, parsed.day)
    if not isinstance(parsed, pendulum.DateTime):  # pragma: no cover - the regex allows no other
        raise ValueError(msg)  # noqa: TRY004 - callers catch ValueError
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def to_rfc3339_utc(value: str) -> str:
    """Return a timestamp (see ``parse_instant``) as an RFC 3339 string in UTC.

    Args:
        value: The source timestamp.

    Returns:
        The same instant, e.g. ``2023-10-19T10:49:21+00:00``.

    Raises:
        ValueError: If the value is not a timestamp.
    """
    if len(value) == 25 and value[10] == " " and value[19] == " ":  # noqa: PLR2004
        # The documented form, without building a datetime twice (the hot path).
        local = dt.datetime.fromisoformat(value[:19])
        if local.tzinfo is None and value[13] == ":" and value[16] == ":":
            try:
                return (local - _utc_offset(value[20:])).isoformat() + "+00:00"
            except OverflowError:
                pass  # parse_instant says why
    return parse_instant(value).isoformat()


def _coerce(value: object, kind: str, record_id: object, column: str) -> object:  # noqa: C901, PLR0911, PLR0912
    """Coerce a non-null value that is not already of its column's Python type."""
    if kind == STRING:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind == INTEGER:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INTEGER_STRING.match(value.strip()):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == BOOLEAN:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
        if isinstance(value, int) and value in {0, 1}:
            return bool(value)
    raise RecordShapeError(record_id, column, value, kind)


def _to_timestamp(value: object, record_id: object, column: str) -> str:
    if isinstance(value, str):
        try:
            return to_rfc3339_utc(value)
        except (ValueError, TypeError, OverflowError):
            pass
    raise RecordShapeError(record_id, column, value, "a date-time")


def _converter(kind: str) -> t.Callable[[object, object, str], object]:
    if kind == TIMESTAMP:
        return _to_timestamp
    return lambda value, record_id, column: _coerce(value, kind, record_id, column)


# The Python type a value already has when it needs no conversion (never, for timestamps).
_NATIVE: dict[str, type] = {STRING: str, INTEGER: int, BOOLEAN: bool, TIMESTAMP: type(None)}

# Precomputed (source member, column, native type, converter) per column, so that
# shaping does no string or dispatch work per record.
_TOP_LEVEL_PLAN = tuple(
    (name, name, _NATIVE[kind], _converter(kind))
    for name, kind in TOP_LEVEL.items()
    if name != "id"
)
_SUB_OBJECT_PLAN = tuple(
    (
        obj,
        tuple(
            (member, f"{obj}_{member}", _NATIVE[kind], _converter(kind))
            for member, kind in members.items()
        ),
    )
    for obj, members in SUB_OBJECTS.items()
)


def shape_record(raw: dict[str, t.Any], network_id: str) -> dict[str, t.Any]:
    """Flatten and type one raw destination into the contract's columns.

    Args:
        raw: The destination as received from Invoca.
        network_id: The configured network, added as a column.

    Returns:
        A record with exactly the columns of ``COLUMNS``, in that order.

    Raises:
        RecordShapeError: If a value cannot be coerced to its column's type, or
            the record has no id.
    """
    record_id = raw.get("id")
    if record_id is None:
        raise RecordShapeError(record_id, "id", None, INTEGER)
    out: dict[str, t.Any] = {
        "id": record_id if type(record_id) is int else _coerce(record_id, INTEGER, record_id, "id"),
        "network_id": network_id,
    }
    get = raw.get
    for member, column, native, convert in _TOP_LEVEL_PLAN:
        value = get(member)
        out[column] = (
            value if value is None or type(value) is native else convert(value, record_id, column)
        )
    for obj, plan in _SUB_OBJECT_PLAN:
        sub = get(obj)
        if sub is None:
            sub = {}
        elif not isinstance(sub, dict):
            raise RecordShapeError(record_id, obj, sub, "an object")
        sub_get = sub.get
        for member, column, native, convert in plan:
            value = sub_get(member)
            out[column] = (
                value
                if value is None or type(value) is native
                else convert(value, record_id, column)
            )
    return out


def unknown_fields(raw: dict[str, t.Any]) -> frozenset[str]:
    """Return the dotted names of fields the tap does not know in one raw destination.

    Args:
        raw: The destination as received from Invoca.

    Returns:
        Names such as ``new_field`` or ``dynamic_number_pool.new_member``.
    """
    found: list[str] = []
    if not raw.keys() <= KNOWN_TOP_LEVEL:  # subset tests allocate nothing: the usual case
        found.extend(str(name) for name in raw.keys() - KNOWN_TOP_LEVEL)
    for obj, members in _MEMBER_SETS.items():
        sub = raw.get(obj)
        if isinstance(sub, dict) and not sub.keys() <= members:
            found.extend(f"{obj}.{member}" for member in sub.keys() - members)
    return frozenset(found) if found else _NOTHING
