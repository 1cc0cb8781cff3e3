"""The yardstick: a minimal hand-written extractor doing the tap's work, nothing more.

One requests.Session, sequential offset pages, stdlib json, flatten the two
sub-objects, normalise Invoca timestamps to RFC 3339 UTC, one Singer RECORD
line per destination on stdout. No retries, no integrity checks, no coercion.

Usage: python benchmarks/baseline.py BASE_URL TOKEN [PAGE_SIZE] [--tuned] [--orjson]

--tuned swaps strptime for datetime.fromisoformat after reshaping the string,
the fastest stdlib parse (what a performance-minded hand-written script does).
--orjson (implies --tuned) decodes pages and encodes lines with orjson instead of json.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import typing as t

import requests

TIMESTAMPS = ("created_at", "updated_at", "acknowledged_at", "ignored_at", "notified_at")
SUB_OBJECTS = ("advertiser_campaign", "dynamic_number_pool")


def normalise(value: str | None) -> str | None:
    if value is None:
        return None
    moment = dt.datetime.strptime(value, "%Y-%m-%d %H:%M:%S %z")
    return moment.astimezone(dt.UTC).isoformat()


def normalise_tuned(value: str | None) -> str | None:
    if value is None:
        return None
    iso = f"{value[:10]}T{value[11:19]}{value[20:23]}:{value[23:]}"
    return dt.datetime.fromisoformat(iso).astimezone(dt.UTC).isoformat()


def main() -> None:
    base_url, token = sys.argv[1], sys.argv[2]
    page_size = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 100
    fast_json = "--orjson" in sys.argv
    to_utc = normalise_tuned if "--tuned" in sys.argv or fast_json else normalise
    loads: t.Callable[[bytes], t.Any] = json.loads
    dumps: t.Callable[[t.Any], str] = json.dumps
    if fast_json:
        import orjson  # noqa: PLC0415 - only this variant needs it

        loads, dumps = orjson.loads, lambda message: orjson.dumps(message).decode()
    url = f"{base_url}/api/2022-08-01/1234/customer_phone_numbers.json"
    session = requests.Session()
    session.headers["Authorization"] = token
    out = sys.stdout
    start = 0
    while True:
        response = session.get(url, params={"limit": page_size, "start": start}, timeout=60)
        body = loads(response.content)
        data = body["data"]
        if not data:
            break
        for raw in data:
            record = {k: v for k, v in raw.items() if k not in SUB_OBJECTS}
            for name in TIMESTAMPS:
                record[name] = to_utc(record.get(name))
            for obj in SUB_OBJECTS:
                for member, value in (raw.get(obj) or {}).items():
                    record[f"{obj}_{member}"] = value
            out.write(dumps({"type": "RECORD", "stream": "destinations", "record": record}))
            out.write("\n")
        start += len(data)
        if start >= body["recordsTotal"]:
            break
    out.flush()


if __name__ == "__main__":
    main()
