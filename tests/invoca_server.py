"""A local, Invoca-compatible Destinations API for tests, the demo and benchmarks.

Faithful to ``docs/invoca_api.md``: list and detail endpoints, the
``{"data", "requestId", "recordsTotal"}`` envelope, ``Authorization`` header auth
(401 otherwise), ``limit``/``start``/``status``/``include_inactive``/``query``/
``sort_by``/``sort_dir``, Invoca's timestamp format and its quirks (numeric
strings, null/absent/all-null sub-objects, unknown fields, unicode, null
``updated_at``). Binds 127.0.0.1 only.

Each destination is generated twice: ``expected`` holds the typed, flat record a
correct tap must emit (computed here, independently of the tap's code), and the
wire form renders it the way Invoca would. Fault knobs (``Faults``) inject
latency, error statuses, dropped connections, slow or malformed bodies, page
caps, changes to the list mid-sync, a server that ignores ``start`` or ``limit``,
``recordsTotal`` variants, duplicate or unsorted ids, trickled, non-UTF-8 or deeply
nested bodies, and a skewed ``Date`` header. All are off by default.

Standalone: ``python tests/invoca_server.py --port 8765 --count 500``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import email.utils
import functools
import gzip
import json
import socket
import ssl
import threading
import time
import typing as t
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlparse

UTC = dt.UTC
NETWORK_ID = "1234"
API_VERSION = "2022-08-01"
DEFAULT_TOKEN = "local-test-token"  # noqa: S105 - a placeholder for the local server
OFFSETS = [-7 * 60, -4 * 60, 0, 5 * 60 + 30, -(9 * 60 + 30), 12 * 60 + 45]
EPOCH = dt.datetime(2023, 1, 1, tzinfo=UTC)
UNICODE_NAMES = ["Café Ünïcode", "東京 支店", "Zürich — Süd", "Ñandú 🚀"]


def rfc3339(moment: dt.datetime | None) -> str | None:
    """The contract's output form of an instant: RFC 3339 in UTC."""
    return None if moment is None else moment.astimezone(UTC).isoformat()


def invoca_time(moment: dt.datetime | None, offset_minutes: int) -> str | None:
    """Invoca's wire form: ``2023-10-19 03:49:21 -0700``."""
    if moment is None:
        return None
    local = moment.astimezone(dt.timezone(dt.timedelta(minutes=offset_minutes)))
    return local.strftime("%Y-%m-%d %H:%M:%S %z")


@dataclasses.dataclass
class Destination:
    """One destination: the typed truth and how it goes over the wire."""

    id: int
    expected: dict[str, t.Any]  # the flat record a correct tap emits (minus network_id)
    wire: dict[str, t.Any]
    status: str  # ignored | tracked | discovered

    def wire_bytes(self) -> bytes:
        """The wire JSON of this destination."""
        return json.dumps(self.wire, ensure_ascii=False).encode()


def make_destination(index: int, dest_id: int, moment: dt.datetime | None = None) -> Destination:
    """Build destination number ``index`` deterministically."""
    i = index
    created = moment or EPOCH + dt.timedelta(minutes=7 * i, seconds=i % 60)
    updated = None if i % 97 == 5 else created + dt.timedelta(hours=i % 500, seconds=i % 7)
    kind = i % 10
    ignored_at = created + dt.timedelta(days=1) if kind == 3 else None
    tracked = kind not in {3, 7, 8, 9}
    acknowledged = created + dt.timedelta(hours=2) if i % 4 == 0 else None
    notified = created + dt.timedelta(minutes=30) if i % 6 == 1 else None
    name = f"{UNICODE_NAMES[i % len(UNICODE_NAMES)]} {i}" if i % 13 == 0 else f"Destination {i}"
    phone = f"{200 + i % 700:03d}-555-{i % 10000:04d}"
    campaign: dict[str, t.Any] | None = {
        "id_from_network": f"AC-{i % 40}",
        "name": f"{UNICODE_NAMES[i % 4]} campaign" if i % 26 == 0 else f"Campaign {i % 40}",
        "status": "Paused" if i % 9 == 0 else "Activated",
    }
    campaign_form = "absent" if i % 19 == 0 else "null" if i % 17 == 0 else "object"
    if campaign_form != "object":
        campaign = None
    pool: dict[str, t.Any] | None = None
    if tracked:
        pool = {
            "id": 500000 + i,
            "id_from_network": f"RP-{i}",
            "name": f"RingPool {i}",
            "object_url": f"https://invoca.net/a/networks/{NETWORK_ID}/ring_pools/{500000 + i}",
            "pool_type": "Custom" if i % 2 else "Standard",
            "destination_type": "Advertiser",
            "lifetime_seconds": 3600 if i % 3 else 1800,
            "max_pool_size": 10 + i % 20,
            "preferred": i % 2 == 0,
            "is_first_preference": i % 3 == 0,
            "use_custom_data": i % 5 == 0,
            "destination_phone_number": phone,
            "fill_immediately": i % 4 != 0,
        }
    pool_members = [
        "id", "id_from_network", "name", "object_url", "pool_type", "destination_type",
        "lifetime_seconds", "max_pool_size", "preferred", "is_first_preference",
        "use_custom_data", "destination_phone_number", "fill_immediately",
    ]  # fmt: skip
    expected: dict[str, t.Any] = {
        "id": dest_id,
        "country_code": "44" if i % 15 == 0 else "1",
        "phone_number": phone,
        "primary_url": "" if i % 11 == 0 else f"https://www.example{i % 50}.com/landing/{i}",
        "requested_destination_name": name,
        "created_at": rfc3339(created),
        "updated_at": rfc3339(updated),
        "acknowledged_at": rfc3339(acknowledged),
        "ignored_at": rfc3339(ignored_at),
        "notified_at": rfc3339(notified),
    }
    for member in ("id_from_network", "name", "status"):
        expected[f"advertiser_campaign_{member}"] = campaign[member] if campaign else None
    for member in pool_members:
        expected[f"dynamic_number_pool_{member}"] = pool[member] if pool else None

    offset = OFFSETS[i % len(OFFSETS)]
    wire: dict[str, t.Any] = {
        # Ids sometimes arrive as numeric strings.
        "id": str(dest_id) if i % 23 == 0 else dest_id,
        "country_code": expected["country_code"],
        "phone_number": phone,
        "primary_url": expected["primary_url"],
        "requested_destination_name": name,
        "acknowledged_at": invoca_time(acknowledged, offset),
        "ignored_at": invoca_time(ignored_at, offset),
        "notified_at": invoca_time(notified, offset),
        "created_at": invoca_time(created, offset),
        "updated_at": invoca_time(updated, offset),
    }
    if campaign_form == "object":
        wire["advertiser_campaign"] = dict(campaign or {})
    elif campaign_form == "null":
        wire["advertiser_campaign"] = None
    if pool is not None:
        wire_pool: dict[str, t.Any] = dict(pool)
        if i % 5 == 0:
            wire_pool["lifetime_seconds"] = str(pool["lifetime_seconds"])
            wire_pool["max_pool_size"] = str(pool["max_pool_size"])
        if i % 6 == 0:
            wire_pool["preferred"] = "true" if pool["preferred"] else "false"
            wire_pool["use_custom_data"] = "true" if pool["use_custom_data"] else "false"
        if i % 31 == 0:
            wire_pool["auto_scale"] = True  # a member Invoca added later
        wire["dynamic_number_pool"] = wire_pool
    elif kind == 7:
        wire["dynamic_number_pool"] = None
    elif kind != 8:  # 8: the object is absent altogether
        wire["dynamic_number_pool"] = dict.fromkeys(pool_members)
    if i % 29 == 0:
        wire["call_recording_enabled"] = True  # a field Invoca added later
    status = "ignored" if ignored_at else "tracked" if tracked else "discovered"
    return Destination(id=dest_id, expected=expected, wire=wire, status=status)


@dataclasses.dataclass
class Faults:
    """Fault knobs; every one is off by default."""

    latency_ms: float = 0  # added to every request
    fail_every: int = 0  # every K-th request answered with fail_status
    fail_status: int = 503
    retry_after: str | None = None  # None, "<seconds>", or "date:<seconds>" (HTTP-date form)
    fail_times: int | None = None  # stop failing after this many injected failures
    fail_starts: tuple[int, ...] = ()  # list requests at these offsets fail likewise
    drop_every: int = 0  # every K-th request: connection closed without a response
    slow_every: int = 0  # every K-th request: sleep slow_seconds before answering
    slow_seconds: float = 0
    slow_starts: tuple[int, ...] = ()  # list requests at these offsets are slow likewise
    non_json_every: int = 0  # every K-th request: 200 with an HTML body
    non_json_starts: tuple[int, ...] = ()  # list requests at these offsets get it likewise
    no_data_every: int = 0  # every K-th request: 200 without "data"
    page_cap: int = 0  # serve at most this many records per page
    ignore_start: bool = False  # always serve from offset 0
    mutate_after_page: int = 0  # after the N-th list page is served...
    delete_count: int = 0  # ...delete this many destinations...
    delete_from: str = "front"  # ...the lowest ids ("front") or spread evenly ("spread")
    insert_count: int = 0  # ...and insert this many
    insert_at: str = "end"  # new highest ids ("end") or ids between the first ones ("front")
    status_every: dict[int, int] = dataclasses.field(default_factory=dict)  # {K: status}
    redirect_to: str | None = None  # answer every request with a 301 to this base URL
    ignore_limit: int = 0  # serve this many records per page whatever `limit` says
    total_form: str = (
        "exact"  # recordsTotal: exact|absent|null|string|float|fixed|plus_one|page_len
    )
    total_value: int = 0  # the recordsTotal sent when total_form is "fixed"
    bad_ids: str = ""  # "duplicate" or "unsorted": ids of the list page number bad_ids_page
    bad_ids_page: int = 1
    bad_ids_start: int = -1  # >= 0: the page at this offset instead of bad_ids_page
    # Glitches with a true recordsTotal: list page number (from 1) -> "lone" (only the
    # page's first record) or "empty" (no record): a server that misbehaves once.
    glitch_pages: dict[int, str] = dataclasses.field(default_factory=dict)
    trickle_every: int = 0  # every K-th request: a list body sent trickle_bytes at a time...
    trickle_bytes: int = 1
    trickle_delay: float = 0.05  # ...with this many seconds between the pieces
    non_utf8_every: int = 0  # every K-th request: 200 with a body that is not UTF-8
    deep_json_every: int = 0  # every K-th request: 200 with JSON nested 5,000 deep
    clock_skew_seconds: float = 0  # the Date header is shifted by this much
    on_list_page: t.Callable[[int], None] | None = None  # called after the N-th list page
    gzip_bomb_every: int = 0  # every K-th request: 200 with a gzip body (valid JSON, no records)...
    gzip_bomb_bytes: int = 300_000_000  # ...that inflates to this many bytes
    gzip_pages: bool = False  # gzip every body when the client accepts it
    body_every: int = 0  # every K-th request: body_status with body_text, where "{token}" and
    body_status: int = 200  # "{token_json}" stand for the server's token (raw, JSON-escaped)
    body_text: str = ""
    throttle_above: int = 0  # a request arriving with more than this many in flight: 429
    error_envelope_every: int = 0  # every K-th request: 200 with Invoca's error envelope


@dataclasses.dataclass
class Stats:
    """What the server saw."""

    requests: int = 0
    list_pages: int = 0
    statuses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    token_in_url: int = 0
    dropped: int = 0
    non_json: int = 0  # 200s with an HTML body (non_json_every, non_json_starts)
    paths: list[str] = dataclasses.field(default_factory=list)
    connections: int = 0  # TCP connections accepted
    other_auth: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )  # Authorization headers other than the token, by scheme ("Basic", "none", "other")


class InvocaServer:
    """The Invoca-compatible server; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        count: int = 250,
        *,
        token: str = DEFAULT_TOKEN,
        port: int = 0,
        faults: Faults | None = None,
        network_id: str = NETWORK_ID,
    ) -> None:
        """Generate ``count`` destinations and prepare (not start) the server."""
        self.token = token
        self.network_id = network_id
        self.faults = faults or Faults()
        self.stats = Stats()
        self.lock = threading.Lock()
        self._destinations: dict[int, Destination] = {}
        self._bytes: dict[int, bytes] = {}
        self._cache: dict[tuple[t.Any, ...], list[int]] = {}
        self.deleted_ids: set[int] = set()
        self.inserted_ids: set[int] = set()
        for index in range(count):
            self._put(make_destination(index, 1000 + 3 * index))
        self._next_index = count
        self._mutated = False
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- data -----------------------------------------------------------------

    def _put(self, destination: Destination) -> None:
        self._destinations[destination.id] = destination
        self._bytes[destination.id] = destination.wire_bytes()
        self._cache.clear()

    @property
    def url(self) -> str:
        """Base URL to give the tap as ``base_url``."""
        scheme = "https" if isinstance(self._httpd.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self._httpd.server_port}"

    def use_tls(self, certfile: str, keyfile: str) -> Self:
        """Serve HTTPS with this certificate (call before start)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        return self

    def ids(self) -> list[int]:
        """Ids of the destinations that exist now, ascending."""
        with self.lock:
            return sorted(self._destinations)

    def expected_records(self, status: str | None = None) -> list[dict[str, t.Any]]:
        """The records a correct tap emits now, in id order, with network_id."""
        with self.lock:
            return [
                {**d.expected, "network_id": self.network_id}
                for _, d in sorted(self._destinations.items())
                if status is None or d.status == status
            ]

    def raw_destination(self, dest_id: int) -> bytes | None:
        """The bytes sent for one destination, or None if it does not exist."""
        return self._bytes.get(dest_id)

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted."""
        self._httpd.serve_forever()

    def wire_record(self, dest_id: int) -> dict[str, t.Any]:
        """The raw JSON Invoca sends for one destination."""
        return json.loads(self._bytes[dest_id])

    def set_wire(self, dest_id: int, wire: dict[str, t.Any]) -> None:
        """Replace what is sent for one destination (to inject odd values)."""
        with self.lock:
            self._bytes[dest_id] = json.dumps(wire).encode()
            self._cache.clear()

    def touch(self, ids: t.Iterable[int], when: dt.datetime) -> None:
        """Change destinations: set their updated_at to ``when`` (and rename them)."""
        with self.lock:
            for dest_id in ids:
                d = self._destinations[dest_id]
                d.expected["updated_at"] = rfc3339(when)
                d.expected["requested_destination_name"] = f"Renamed {dest_id}"
                d.wire["updated_at"] = invoca_time(when, -7 * 60)
                d.wire["requested_destination_name"] = f"Renamed {dest_id}"
                self._bytes[dest_id] = d.wire_bytes()
            self._cache.clear()

    def delete(self, ids: t.Iterable[int]) -> None:
        """Delete destinations."""
        with self.lock:
            for dest_id in ids:
                if self._destinations.pop(dest_id, None) is not None:
                    self._bytes.pop(dest_id, None)
                    self.deleted_ids.add(dest_id)
            self._cache.clear()

    def insert(self, count: int, *, at: str = "end") -> list[int]:
        """Insert destinations with new highest ids, or ids between the lowest ones."""
        with self.lock:
            existing = sorted(self._destinations)
            if at == "front":
                new_ids = [d + 1 for d in existing if d + 1 not in self._destinations][:count]
            else:
                top = existing[-1] if existing else 1000
                new_ids = [top + 3 * (n + 1) for n in range(count)]
            for dest_id in new_ids:
                self._put(make_destination(self._next_index, dest_id))
                self._next_index += 1
                self.inserted_ids.add(dest_id)
            return new_ids

    def mutate_now(self) -> None:
        """Apply the configured deletions and insertions (``Faults.delete_count``, ...)."""
        faults = self.faults
        ids = self.ids()
        if faults.delete_count:
            if faults.delete_from == "spread":
                step = max(1, len(ids) // faults.delete_count)
                victims = ids[::step][: faults.delete_count]
            else:
                victims = ids[: faults.delete_count]
            self.delete(victims)
        if faults.insert_count:
            self.insert(faults.insert_count, at=faults.insert_at)

    def _listing(self, query: dict[str, str]) -> list[int]:
        key = tuple(sorted((k, v) for k, v in query.items() if k not in {"start", "limit"}))
        with self.lock:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            items = list(self._destinations.values())
            status = query.get("status")
            if status:
                items = [d for d in items if d.status == status]
            if query.get("include_inactive", "true").lower() == "false":
                items = [d for d in items if d.status == "tracked"]
            if query.get("query"):
                needle = "".join(ch for ch in query["query"] if ch.isdigit())
                items = [d for d in items if needle in d.expected["phone_number"].replace("-", "")]
            sort_by = query.get("sort_by", "id")
            reverse = query.get("sort_dir", "asc") == "desc"
            if sort_by == "id":
                items.sort(key=lambda d: d.id, reverse=reverse)
            else:
                items.sort(key=lambda d: (str(d.expected.get(sort_by)), d.id), reverse=reverse)
            listing = [d.id for d in items]
            self._cache[key] = listing
            return listing

    def list_body(self, query: dict[str, str], page_number: int = 0) -> bytes:
        """The body of one list response (``page_number``: its rank among list pages, from 1)."""
        faults = self.faults
        listing = self._listing(query)
        limit = faults.ignore_limit or int(query.get("limit", 100))
        start = 0 if faults.ignore_start else int(query.get("start", 0))
        if faults.page_cap:
            limit = min(limit, faults.page_cap)
        ids = listing[start : start + limit]
        glitch = faults.glitch_pages.get(page_number)
        if glitch:
            ids = ids[:1] if glitch == "lone" else []
        bad_page = (
            start == faults.bad_ids_start
            if faults.bad_ids_start >= 0
            else page_number == faults.bad_ids_page
        )
        if faults.bad_ids and bad_page and len(ids) >= 2:
            ids = [ids[0], *ids] if faults.bad_ids == "duplicate" else [ids[1], ids[0], *ids[2:]]
        with self.lock:
            chunk = [self._bytes[i] for i in ids if i in self._bytes]
        total = self._total_json(len(listing), len(chunk))
        return b'{"data":[' + b",".join(chunk) + b'],"requestId":null' + total + b"}"

    def _total_json(self, total: int, page_len: int) -> bytes:
        form = self.faults.total_form
        value: object = {
            "exact": total,
            "null": None,
            "string": str(total),
            "float": float(total),
            "fixed": self.faults.total_value,
            "plus_one": total + 1,
            "page_len": page_len,
        }.get(form, total)
        return b"" if form == "absent" else b',"recordsTotal":' + json.dumps(value).encode()

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> Self:
        """Serve in a background thread."""
        # A short poll: stop() (shutdown) waits for the serving loop to look at its
        # flag, every poll_interval (0.5 s by default, half of it per test on average).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (if started) and free the port."""
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        """Start."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop."""
        self.stop()


@functools.cache
def gzip_bomb(size: int) -> bytes:
    """A gzip body of about 1/1000 its size that inflates to ``size`` bytes of valid JSON.

    Concatenated gzip members (one per MiB of spaces), as RFC 1952 allows.
    """
    head, tail = b'{"data":[],"recordsTotal":0', b"}"
    mebibyte = gzip.compress(b" " * (1 << 20), compresslevel=9)
    count = max(size - len(head) - len(tail), 0) >> 20
    return gzip.compress(head) + mebibyte * count + gzip.compress(tail)


def _handler_for(server: InvocaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Invoca's front end does
        disable_nagle_algorithm = True  # no 40 ms Nagle stall between the header and body writes

        def log_message(self, format: str, *args: t.Any) -> None:  # noqa: A002
            pass

        def setup(self) -> None:
            with server.lock:
                server.stats.connections += 1
            super().setup()

        def date_time_string(self, timestamp: float | None = None) -> str:
            if timestamp is None:
                timestamp = time.time() + server.faults.clock_skew_seconds
            return super().date_time_string(timestamp)

        def _raw_200(self, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self._out_of_flight()
            self.wfile.write(body)
            with server.lock:
                server.stats.statuses[200] += 1

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            with server.lock:
                server.stats.statuses[status] += 1
            if server.faults.gzip_pages and "gzip" in self.headers.get("Accept-Encoding", ""):
                # As a front end compresses: members of 4 KiB, one after another.
                body = b"".join(
                    gzip.compress(body[i : i + 4096]) for i in range(0, len(body), 4096)
                )
                headers = {**(headers or {}), "Content-Encoding": "gzip"}
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self._out_of_flight()
            self.wfile.write(body)

        def _trickle(self, body: bytes) -> None:
            with server.lock:
                server.stats.statuses[200] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            step = max(server.faults.trickle_bytes, 1)
            try:
                for at in range(0, len(body), step):
                    self.wfile.write(body[at : at + step])
                    self.wfile.flush()
                    time.sleep(server.faults.trickle_delay)
            except OSError:  # the client gave up: that is the point
                self.close_connection = True

        def _error(self, status: int, errors: dict[str, t.Any]) -> None:
            self._send(status, json.dumps({"errors": errors}).encode())

        def do_GET(self) -> None:
            with server.lock:
                server.stats.requests += 1
                number = server.stats.requests
                server.stats.in_flight += 1
                self._in_flight = True
                server.stats.max_in_flight = max(server.stats.max_in_flight, server.stats.in_flight)
                server.stats.paths.append(self.path)
                if server.token and server.token in self.path:
                    server.stats.token_in_url += 1
                limit = server.faults.throttle_above
                throttled = bool(limit) and server.stats.in_flight > limit
            try:
                if throttled:  # a rate limiter answers at once, before any work
                    body = {"errors": {"invalid_data": "Too many requests in flight"}}
                    retry_after = server.faults.retry_after
                    headers = {"Retry-After": retry_after} if retry_after is not None else {}
                    self._send(429, json.dumps(body).encode(), headers)
                    return
                self._handle(number)
            finally:
                self._out_of_flight()

        def _out_of_flight(self) -> None:
            # Before the last bytes go out: a client that has the whole response may
            # send its next request at once, and must not find this one still counted.
            with server.lock:
                if getattr(self, "_in_flight", False):
                    self._in_flight = False
                    server.stats.in_flight -= 1

        def _injected_fault(self, number: int) -> bool:  # noqa: PLR0911
            faults = server.faults

            def every(k: int) -> bool:
                return bool(k) and number % k == 0

            if faults.redirect_to:
                self.send_response(301)
                self.send_header("Location", faults.redirect_to + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True
            if every(faults.drop_every):
                server.stats.dropped += 1
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return True
            if every(faults.slow_every) or any(
                f"start={n}&" in f"{self.path}&" for n in faults.slow_starts
            ):
                time.sleep(faults.slow_seconds)
            for k, status in faults.status_every.items():
                if every(k):
                    self._error(status, {"invalid_data": f"injected {status}", "class": "Injected"})
                    return True
            failing_start = any(f"start={n}&" in f"{self.path}&" for n in faults.fail_starts)
            if (every(faults.fail_every) or failing_start) and (
                faults.fail_times is None or faults.fail_times > 0
            ):
                if faults.fail_times is not None:
                    faults.fail_times -= 1
                headers = {}
                if faults.retry_after is not None:
                    if faults.retry_after.startswith("date:"):
                        when = time.time() + float(faults.retry_after[5:])
                        headers["Retry-After"] = email.utils.formatdate(when, usegmt=True)
                    else:
                        headers["Retry-After"] = faults.retry_after
                body = {"errors": {"invalid_data": "Server error, handle: ERR-4242"}}
                self._send(faults.fail_status, json.dumps(body).encode(), headers)
                return True
            if every(faults.non_json_every) or any(
                f"start={n}&" in f"{self.path}&" for n in faults.non_json_starts
            ):
                server.stats.non_json += 1
                self._raw_200(
                    b"<html><body>Service temporarily unavailable</body></html>", "text/html"
                )
                return True
            if every(faults.non_utf8_every):
                self._raw_200(b'{"data":[{"id":1,"requested_destination_name":"Caf\xe9"}]}')
                return True
            if every(faults.deep_json_every):
                self._raw_200(b'{"data":' + b"[" * 5000 + b"]" * 5000 + b"}")
                return True
            if every(faults.no_data_every):
                self._send(200, b'{"requestId":null,"recordsTotal":0}')
                return True
            if every(faults.gzip_bomb_every):
                self._gzip_bomb()
                return True
            if every(faults.body_every):
                token_json = json.dumps(server.token)[1:-1]
                text = faults.body_text.replace("{token_json}", token_json)
                self._send(faults.body_status, text.replace("{token}", server.token).encode())
                return True
            if every(faults.error_envelope_every):
                errors = {"base": ["Injected: try again later"]}
                envelope = {"data": [], "errors": errors, "recordsTotal": len(server.ids())}
                self._send(200, json.dumps(envelope).encode())
                return True
            return False

        def _gzip_bomb(self) -> None:
            body = gzip_bomb(server.faults.gzip_bomb_bytes)
            with server.lock:
                server.stats.statuses[200] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:  # the client stopped reading: that is the point
                self.close_connection = True

        def _handle(self, number: int) -> None:
            if server.faults.latency_ms:
                time.sleep(server.faults.latency_ms / 1000)
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if self.headers.get("Authorization") != server.token:
                given = self.headers.get("Authorization")
                scheme = "none" if given is None else given.split(" ")[0]
                with server.lock:
                    server.stats.other_auth[scheme if scheme in {"none", "Basic"} else "other"] += 1
                self._error(401, {"invalid_data": "Not authorized", "class": "Unauthorized"})
                return
            if self._injected_fault(number):
                return
            prefix = f"/api/{API_VERSION}/{server.network_id}/customer_phone_numbers"
            if url.path == prefix + ".json":
                with server.lock:
                    pages = server.stats.list_pages + 1
                try:
                    body = server.list_body(query, pages)
                except ValueError:
                    self._error(403, {"limit": ["must be an integer"]})
                    return
                faults = server.faults
                if faults.trickle_every and number % faults.trickle_every == 0:
                    self._trickle(body)
                else:
                    self._send(200, body)
                with server.lock:
                    server.stats.list_pages += 1
                    pages = server.stats.list_pages
                if faults.mutate_after_page and pages == faults.mutate_after_page:
                    server.mutate_now()
                if faults.on_list_page is not None:
                    faults.on_list_page(pages)
                return
            if url.path.startswith(prefix + "/") and url.path.endswith(".json"):
                raw_id = url.path[len(prefix) + 1 : -len(".json")]
                dest_id = int(raw_id) if raw_id.isdigit() else -1
                with server.lock:
                    found = server.raw_destination(dest_id)
                if found is None:
                    self._error(404, {"invalid_data": "not found", "class": "RecordNotFound"})
                else:
                    self._send(200, found)
                return
            self._error(
                404, {"invalid_data": f"no route for {url.path}", "class": "RecordNotFound"}
            )

    return Handler


NOT_ON_CLI = {
    "status_every",
    "on_list_page",
    "glitch_pages",
    "fail_starts",
    "slow_starts",
    "non_json_starts",
}


def main() -> None:
    """Run the server in the foreground."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--count", type=int, default=500, help="destinations to serve")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument(
        "--no-drift",
        action="store_true",
        help="serve only fields the tap knows (no 'field Invoca added later', so no warning)",
    )
    floats = {"latency_ms", "slow_seconds", "trickle_delay", "clock_skew_seconds"}
    for field in dataclasses.fields(Faults):
        if field.name in NOT_ON_CLI:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true")
        else:
            kind = (
                float
                if field.name in floats
                else (int if isinstance(default, int) or field.name == "fail_times" else str)
            )
            parser.add_argument(flag, type=kind, default=default)
    args = parser.parse_args()
    faults = Faults(
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(Faults)
            if f.name not in NOT_ON_CLI
        }
    )
    try:
        server = InvocaServer(args.count, token=args.token, port=args.port, faults=faults)
    except OSError as exc:
        msg = f"invoca_server: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}"
        raise SystemExit(msg) from None
    if args.no_drift:
        for destination in list(server._destinations.values()):  # noqa: SLF001
            destination.wire.pop("call_recording_enabled", None)
            pool = destination.wire.get("dynamic_number_pool")
            if isinstance(pool, dict):
                pool.pop("auto_scale", None)
            server._put(destination)  # noqa: SLF001
    print(f"Invoca-compatible server on {server.url} ({args.count} destinations)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
