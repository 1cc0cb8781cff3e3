"""Record shaping: one raw Invoca destination in, one flat, typed record out."""

from __future__ import annotations

import datetime as dt
import re
import threading
import typing as t
from types import SimpleNamespace

import msgspec

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
# "2024-03-05 -0700" (a local date and an offset) -> the day before, the day and the
# day after, and the offset in minutes: a timestamp of that date and offset is then
# converted to UTC by text alone. Filled as seen: a list's timestamps share dates.
UTC_DAYS: dict[str, tuple[str | None, str, str | None, int] | tuple[()]] = {}
MAX_UTC_DAYS = 1024  # ~0.4 MB at most
_DAY = 24 * 60  # minutes
_CLOCK = tuple(f"{m // 60:02d}:{m % 60:02d}" for m in range(_DAY))  # "HH:MM" of each minute
_MINUTE_OF_DAY = {clock: minute for minute, clock in enumerate(_CLOCK)}
_SIXTY = frozenset(f"{n:02d}" for n in range(60))  # valid seconds
_TRUE = frozenset({"true", "t", "1", "yes"})
_FALSE = frozenset({"false", "f", "0", "no"})
_INTEGER_STRING = re.compile(r"[+-]?[0-9]+\Z")  # ASCII: int() and \d take any script's digits
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what a warehouse's bigint holds


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


def _coerce(value: object, kind: str, record_id: object, column: str) -> object:  # noqa: C901, PLR0911
    """Coerce a non-null value that is not already of its column's Python type."""
    if kind == STRING:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind == INTEGER:
        number = as_int64(value)
        if number is not None:
            return number
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


def as_int64(value: object) -> int | None:
    """Return an integer value, an integral float or an ASCII digit string as an int.

    None if it is none of those, or does not fit a signed 64-bit integer (a bigint).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if not _INTEGER_STRING.match(value.strip()):
            return None
    elif not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        return None
    number = int(value)
    return number if INT64_MIN <= number <= INT64_MAX else None


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


# The Python type a value already has when it needs no conversion (never, for
# timestamps; for integers, only once its range is checked).
_NATIVE: dict[str, type] = {STRING: str, INTEGER: type(None), BOOLEAN: bool, TIMESTAMP: type(None)}

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
        "id": (
            record_id
            if type(record_id) is int and INT64_MIN <= record_id <= INT64_MAX
            else _coerce(record_id, INTEGER, record_id, "id")
        ),
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


# --- the typed fast path -----------------------------------------------------
#
# A page is decoded straight into structs whose members are typed with the forms
# Invoca sends (a string, or a number or boolean that may come as a string). The
# decode itself is the check: an unknown field (the structs forbid them) or any
# other form fails it, and that page goes through the dict path above instead
# (``shape_record`` and ``unknown_fields``), which decides exactly as before. Once
# unknown names are reported, ``PageDecoder.tolerate`` adds them to the structs,
# so drift is looked for once per distinct name, not per record.

_WIRE_TYPES: dict[str, t.Any] = {
    STRING: str | None,
    INTEGER: int | str | None,
    BOOLEAN: bool | int | str | None,
    TIMESTAMP: str | None,
}
MAX_TOLERATED = 200  # unknown names the structs learn; past that, pages take the dict path


def _wire_struct(name: str, members: dict[str, t.Any], extras: frozenset[str]) -> type:
    # Extras get neutral attribute names (an unknown JSON name may be no identifier).
    fields: list[tuple[str, t.Any, None]] = [(m, kind, None) for m, kind in members.items()]
    rename = {f"extra{i}": extra for i, extra in enumerate(sorted(extras))}
    fields += [(attr, t.Any, None) for attr in rename]
    return msgspec.defstruct(name, fields, forbid_unknown_fields=True, rename=rename)


class PageDecoder:
    """Decodes list bodies into typed raw destinations (see above); thread-safe."""

    def __init__(self) -> None:
        """Start with the known fields only."""
        self._lock = threading.Lock()
        self._extras: dict[str, frozenset[str]] = {"": _NOTHING} | dict.fromkeys(
            SUB_OBJECTS, _NOTHING
        )
        self.decoder = self._build()
        self.active = True  # False once too many unknown names were seen

    def _build(self) -> msgspec.json.Decoder[t.Any]:
        subs = {
            obj: _wire_struct(
                obj, {m: _WIRE_TYPES[k] for m, k in members.items()}, self._extras[obj]
            )
            for obj, members in SUB_OBJECTS.items()
        }
        top = {name: _WIRE_TYPES[kind] for name, kind in TOP_LEVEL.items()}
        top |= {obj: struct | None for obj, struct in subs.items()}
        record = _wire_struct("RawDestination", top, self._extras[""])
        envelope = msgspec.defstruct(
            "Envelope",
            [
                ("data", list[record]),  # type: ignore[valid-type]
                ("recordsTotal", t.Any, None),
                ("errors", t.Any, None),
                ("error", t.Any, None),
            ],
        )
        return msgspec.json.Decoder(envelope)

    def tolerate(self, names: t.Iterable[str]) -> None:
        """Let the structs accept these reported unknown names (``obj.member`` or ``field``)."""
        with self._lock:
            extras = dict(self._extras)
            for name in names:
                obj, _, member = name.rpartition(".")
                if obj in extras and member:
                    extras[obj] = extras[obj] | {member}
            if extras == self._extras:
                return
            if sum(map(len, extras.values())) > MAX_TOLERATED:
                self.active = False  # every page would be decoded twice: dicts only
                return
            self._extras = extras
            self.decoder = self._build()


def invoca_timestamp(value: str, record_id: object, column: str) -> str:
    """``_to_timestamp``, quicker for Invoca's own form: by text, once its date was seen."""
    # value[4:20:3] holds the separators at 4, 7, 10, 13, 16 and 19; the dashes rule
    # out ISO week dates, which fromisoformat also reads.
    if len(value) == 25 and value[4:20:3] == "-- :: ":  # noqa: PLR2004 - the form's length
        key = value[:10] + value[19:]
        day = UTC_DAYS.get(key)
        if day is None:
            if len(UTC_DAYS) >= MAX_UTC_DAYS:
                UTC_DAYS.clear()
            day = UTC_DAYS[key] = _utc_day(value)
        minute = _MINUTE_OF_DAY.get(value[11:16])  # "HH:MM", checked
        if day and minute is not None and value[17:19] in _SIXTY:
            before, same, after, shift = day
            minute -= shift
            date = same if 0 <= minute < _DAY else before if minute < 0 else after
            if date is not None:
                return f"{date}T{_CLOCK[minute % _DAY]}{value[16:19]}+00:00"
    return _to_timestamp(value, record_id, column)


def _utc_day(value: str) -> tuple[str | None, str, str | None, int] | tuple[()]:
    """The ``UTC_DAYS`` entry for the date and offset of ``value``; () if it has none."""
    try:
        shift = _utc_offset(value[20:])
        local = dt.date.fromisoformat(value[:10])
    except ValueError:
        return ()  # _to_timestamp says why

    def day(days: int) -> str | None:
        try:
            return (local + dt.timedelta(days=days)).isoformat()
        except OverflowError:
            return None

    return (day(-1), local.isoformat(), day(1), int(shift.total_seconds()) // 60)


def _shaper_source() -> str:
    """The source of ``shape_typed``: one dict display, generated from ``COLUMNS``.

    Generated rather than written out so that the column list lives in one place;
    straight-line code is what makes the typed path cheap.
    """
    lines = [
        "def shape_typed(raw, network_id):",
        "    record_id = raw.id",
        *(f"    {obj} = raw.{obj} or EMPTY_{obj}" for obj in SUB_OBJECTS),
        "    return {",
        '        "id": record_id,',
        '        "network_id": network_id,',
    ]
    members = [(name, f"raw.{name}", kind) for name, kind in TOP_LEVEL.items() if name != "id"]
    members += [
        (f"{obj}_{member}", f"{obj}.{member}", kind)
        for obj, plan in SUB_OBJECTS.items()
        for member, kind in plan.items()
    ]
    for column, source, kind in members:
        if kind == STRING:  # typed str | None: nothing to do
            value = source
        elif kind == TIMESTAMP:
            value = f"None if (v := {source}) is None else timestamp(v, record_id, {column!r})"
        else:
            fits = "type(v) is bool" if kind == BOOLEAN else "type(v) is int and MIN <= v <= MAX"
            value = (
                f"v if (v := {source}) is None or {fits} "
                f"else coerce(v, {kind!r}, record_id, {column!r})"
            )
        lines.append(f"        {column!r}: {value},")
    lines.append("    }")
    return "\n".join(lines) + "\n"


def _compile_shaper() -> t.Callable[[t.Any, str], dict[str, t.Any]]:
    namespace: dict[str, t.Any] = {
        "timestamp": invoca_timestamp,
        "coerce": _coerce,
        "MIN": INT64_MIN,
        "MAX": INT64_MAX,
        **{f"EMPTY_{obj}": SimpleNamespace(**dict.fromkeys(m)) for obj, m in SUB_OBJECTS.items()},
    }
    exec(compile(_shaper_source(), "<records.shape_typed>", "exec"), namespace)  # noqa: S102
    shaper: t.Callable[[t.Any, str], dict[str, t.Any]] = namespace["shape_typed"]
    shaper.__doc__ = "``shape_record`` for a record of a typed page (its id already checked)."
    return shaper


shape_typed = _compile_shaper()
