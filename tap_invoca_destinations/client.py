"""REST client handling: the InvocaStream base class, retries, and id-anchored paging."""

from __future__ import annotations

import collections
import email.utils
import itertools
import json
import random
import sys
import threading
import time
import typing as t
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from http import HTTPStatus
from urllib.parse import urlparse

import msgspec
import requests
from requests.adapters import HTTPAdapter
from singer_sdk.exceptions import FatalAPIError, RetriableAPIError

from tap_invoca_destinations.sdk_seam import SeamStream

if t.TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterator

    from singer_sdk.helpers.types import Context

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override

RETRIABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRIABLE_EXCEPTIONS = (
    requests.exceptions.Timeout,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    ConnectionResetError,
)
MAX_SINGLE_WAIT_SECONDS = 120.0  # cap on one wait, whatever Retry-After asks for
MAX_IDLE_PAGES = 2  # consecutive pages that bring nothing new before paging gives up
MAX_STEP_BACKS = 1000  # re-reads after the list shrank under us, per sync
BODY_QUOTE_CHARS = 300
DEFAULT_BASE_URL = "https://invoca.net"
DEFAULT_API_VERSION = "2022-08-01"

HINTS: dict[int, str] = {
    HTTPStatus.UNAUTHORIZED: "the token was rejected: check api_token",
    HTTPStatus.FORBIDDEN: "Invoca refused the request's arguments: check status, query, "
    "include_inactive and page_size",
    HTTPStatus.NOT_FOUND: "check network_id, api_version and base_url",
}


class InvocaError(FatalAPIError):
    """A failure the tap reports on one line and exits non-zero for."""


@dataclass
class Page:
    """One response of the list endpoint."""

    limit: int
    records: list[dict[str, t.Any]]
    ids: list[int]
    total: int


def quote_body(text: str) -> str:
    """Return the start of a response body, on one line, for an error message."""
    flat = " ".join(text.split())
    return flat if len(flat) <= BODY_QUOTE_CHARS else flat[:BODY_QUOTE_CHARS] + "…"


def retry_after_seconds(header: str | None) -> float | None:
    """Parse a Retry-After header (delta-seconds or HTTP-date) into seconds from now."""
    if not header:
        return None
    header = header.strip()
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class InvocaStream(SeamStream):
    """Base stream for Invoca's network API: auth, retries, and safe, ordered paging.

    Paging is id-anchored offset paging. Invoca offers only ``start``/``limit``
    offsets, which lose a record whenever one before the offset is deleted
    mid-sync and repeat one when one is inserted. So the tap sorts by ``id``
    and asks each page to start at the *last record already emitted*. A page
    whose first id is at or below that record's id ("anchored") proves nothing
    between the two pages was skipped; its ids at or below are dropped as seen.
    A page that is not anchored means the list shrank before the offset: the
    tap steps back a page and reads again. Paging ends at the first anchored
    page that reaches ``recordsTotal``; a page that repeats what was seen (a
    server ignoring ``start``) or ids out of order end in a clear error. Up to
    ``max_concurrency`` pages are requested ahead; they are still checked and
    emitted strictly in order, so prefetching never changes the result.
    """

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Initialise the stream and its concurrency window (lowered on 429)."""
        super().__init__(*args, **kwargs)
        self._max_concurrency = max(int(self.config.get("max_concurrency", 4)), 1)
        self._window = self._max_concurrency
        self._window_lock = threading.Lock()
        self._paging_over = threading.Event()  # tells prefetches still retrying to give up
        self.server_date_at_start: dt.datetime | None = None  # Invoca's clock at the first response

    @property
    @override
    def url_base(self) -> str:
        return str(self.config.get("base_url", DEFAULT_BASE_URL)).rstrip("/")

    @property
    @override
    def http_headers(self) -> dict[str, str]:
        return {
            "Authorization": self.config["api_token"],
            "Accept": "application/json",
            "User-Agent": self.user_agent,
        }

    @cached_property
    @override
    def user_agent(self) -> str:
        return self.config.get("user_agent") or f"tap-invoca-destinations/{self.plugin_version}"

    @property
    @override
    def timeout(self) -> float:  # type: ignore[override]
        # Config numbers may arrive as Decimal (the SDK's JSON reader); sockets want float.
        return float(self.config.get("request_timeout", 60))

    @property
    @override
    def requests_session(self) -> requests.Session:
        # A pool per concurrent page request, so prefetching reuses connections.
        if not self._requests_session:
            session = requests.Session()
            size = self._max_concurrency
            session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=size))
            session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=size))
            self._requests_session = session
        return self._requests_session

    @override
    def get_new_paginator(self) -> None:
        # Paging is done by iter_pages (id-anchored, see class docstring); the
        # SDK's offset paginator skips records on short pages and loops forever
        # on a server that ignores `start`.
        return None

    def filter_params(self) -> dict[str, t.Any]:
        """Return the query parameters every list request carries, besides paging."""
        return {}

    # --- responses -----------------------------------------------------------

    @override
    def response_error_message(self, response: requests.Response) -> str:
        # The SDK's message carries the whole body and header names; ours is one
        # line with Invoca's own error text and a hint.
        status = response.status_code
        detail = invoca_error_text(response)
        hint = HINTS.get(status)
        text = f"HTTP {status} {response.reason or ''}".rstrip()
        text += f" for GET {urlparse(response.url).path}"
        if detail:
            text += f": {detail}"
        if hint:
            text += f" ({hint})"
        return text

    @override
    def validate_response(self, response: requests.Response) -> None:
        if response.is_redirect:
            # Not followed: requests drops the Authorization header on a cross-host
            # redirect, which would surface as a confusing 401.
            target = urlparse(response.headers.get("Location", ""))
            msg = (
                f"HTTP {response.status_code} for GET {urlparse(response.url).path}: Invoca "
                f"redirects to {target.scheme}://{target.netloc}{target.path} "
                "(set base_url to that host)"
            )
            raise InvocaError(msg)
        if response.status_code in RETRIABLE_STATUSES:
            raise RetriableAPIError(self.response_error_message(response), response)
        if response.status_code >= HTTPStatus.BAD_REQUEST:
            raise InvocaError(self.response_error_message(response))

    def decode_page(self, response: requests.Response, start: int, limit: int) -> Page:
        """Decode a list response once, checking the envelope.

        Raises:
            InvocaError: If the body is not JSON, lacks ``data``, or has records
                without integer ids.
        """
        where = f"HTTP {response.status_code} for GET {urlparse(response.url).path}"
        try:
            body = msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            msg = f"{where}: the body is not JSON: {quote_body(response.text)!r}"
            raise InvocaError(msg) from None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            msg = f"{where}: the body has no 'data' list: {quote_body(response.text)!r}"
            raise InvocaError(msg)
        ids = []
        for record in data:
            raw_id = record.get("id") if isinstance(record, dict) else None
            try:
                ids.append(raw_id if type(raw_id) is int else int(str(raw_id).strip()))
            except ValueError:
                msg = f"{where}: a destination has no integer id ({raw_id!r})"
                raise InvocaError(msg) from None
        total = body.get("recordsTotal")
        return Page(
            limit=limit,
            records=data,
            ids=ids,
            total=total if isinstance(total, int) else start + len(data),
        )

    # --- requests and retries ------------------------------------------------

    def fetch_page(self, start: int, limit: int) -> Page:
        """GET one page, retrying transient failures.

        429, 500, 502, 503, 504, timeouts and dropped connections are retried
        with exponential backoff and jitter, honouring ``Retry-After`` (capped),
        until ``max_tries`` attempts or ``max_retry_seconds`` of waiting are used.
        The SDK's backoff decorator is not used: it ignores ``Retry-After`` and
        has no shared budget or concurrency feedback.

        Raises:
            InvocaError: On a fatal status, a bad body, or exhausted retries.
        """
        params = {**self.filter_params(), "limit": limit, "start": start}
        url = self.get_url(None)
        max_tries = int(self.config.get("max_tries", 6))
        budget = float(self.config.get("max_retry_seconds", 300))
        initial_wait = float(self.config.get("retry_initial_wait", 1.0))
        waited = 0.0
        for attempt in range(1, max_tries + 1):
            try:
                response = self.requests_session.get(
                    url,
                    params=params,
                    headers=self.http_headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                )
                self.validate_response(response)
                return self.decode_page(response, start, limit)
            except RetriableAPIError as exc:
                # validate_response always attaches the response to retriable errors.
                failed = t.cast("requests.Response", exc.response)
                reason = f"HTTP {failed.status_code}"
                retry_after = retry_after_seconds(failed.headers.get("Retry-After"))
                if failed.status_code == HTTPStatus.TOO_MANY_REQUESTS:
                    self._lower_concurrency()
                failure = str(exc)
            except RETRIABLE_EXCEPTIONS as exc:
                reason, retry_after = type(exc).__name__, None
                failure = f"{reason} for GET {self.path}"
            if retry_after is not None:
                wait = min(retry_after, MAX_SINGLE_WAIT_SECONDS)
            else:
                wait = min(initial_wait * 2 ** (attempt - 1), MAX_SINGLE_WAIT_SECONDS)
                wait *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not crypto
            if attempt == max_tries or waited + wait > budget:
                msg = (
                    f"gave up after {attempt} attempt(s) and {waited:.1f} s of waiting "
                    f"(max_tries={max_tries}, max_retry_seconds={budget:g}): {failure}"
                )
                raise InvocaError(msg)
            self.logger.warning(
                "Retrying GET %s start=%d: %s, attempt %d/%d, waiting %.2f s%s",
                self.path,
                start,
                reason,
                attempt,
                max_tries,
                wait,
                " (Retry-After)" if retry_after is not None else "",
            )
            if self._paging_over.wait(wait):
                msg = f"paging ended while GET {self.path} start={start} was retrying"
                raise InvocaError(msg)
            waited += wait
        msg = "unreachable"  # pragma: no cover - the loop returns or raises
        raise AssertionError(msg)  # pragma: no cover

    def _lower_concurrency(self) -> None:
        with self._window_lock:
            if self._window > 1:
                self._window = max(1, self._window // 2)
                self.logger.warning(
                    "Invoca throttled (429): lowering concurrency to %d for the rest of the run",
                    self._window,
                )

    # --- paging --------------------------------------------------------------

    def iter_pages(self) -> Iterator[list[dict[str, t.Any]]]:  # noqa: C901, PLR0912, PLR0915
        """Yield, in id order, the not-yet-seen records of each page (see class docstring).

        Raises:
            InvocaError: If paging cannot make progress or ids are out of order.
        """
        page_size = int(self.config.get("page_size", 100))
        overlap_limit = page_size + 1  # re-read the last seen record as the anchor
        pool = ThreadPoolExecutor(
            max_workers=self._max_concurrency,
            thread_name_prefix="invoca-page",
        )
        in_flight: collections.deque[tuple[int, Future[Page]]] = collections.deque()
        last_id: int | None = None
        page_cap = overlap_limit  # most records a page holds; lowered if the server caps pages
        known_total: int | None = None
        idle_pages = step_backs = 0

        def submit(start: int, limit: int) -> None:
            in_flight.append((start, pool.submit(self.fetch_page, start, limit)))

        def refill(anchor: int) -> None:
            # Keep up to `window` requests in flight, each predicted to start
            # at the last record of the one before it.
            start = in_flight[-1][0] + page_cap - 1 if in_flight else anchor
            while len(in_flight) < self._window:
                # A page starting at the total's last record would bring nothing new.
                if in_flight and known_total is not None and start + 1 >= known_total:
                    break
                submit(start, overlap_limit)
                start += page_cap - 1

        def discard_in_flight() -> None:
            while in_flight:
                in_flight.pop()[1].cancel()

        self._paging_over.clear()
        try:
            submit(0, page_size)
            while in_flight:
                start, future = in_flight.popleft()
                page = future.result()
                known_total = page.total
                ids = page.ids
                if any(a >= b for a, b in itertools.pairwise(ids)):
                    msg = (
                        f"Invoca returned ids out of order at start={start} "
                        f"(sort_by=id ignored?); paging would not be safe"
                    )
                    raise InvocaError(msg)
                anchored = start == 0 or last_id is None or (bool(ids) and ids[0] <= last_id)
                if not anchored:
                    # Records before our offset were deleted: the list moved left,
                    # so we may have skipped some. Read the previous stretch again.
                    step_backs += 1
                    if step_backs > MAX_STEP_BACKS:
                        msg = "the list keeps shrinking faster than the tap can page it"
                        raise InvocaError(msg)
                    discard_in_flight()
                    submit(max(0, start - (page_cap - 1)), overlap_limit)
                    continue
                first_new = 0
                if last_id is not None:
                    while first_new < len(ids) and ids[first_new] <= last_id:
                        first_new += 1
                is_last = not ids or start + len(ids) >= page.total
                if first_new < len(ids):
                    idle_pages = 0
                elif not is_last:
                    idle_pages += 1
                    if idle_pages > MAX_IDLE_PAGES:
                        msg = (
                            f"Invoca returned no new records at start={start} "
                            f"{idle_pages} times in a row (does the server ignore 'start'?)"
                        )
                        raise InvocaError(msg)
                if not is_last:
                    if len(ids) < page.limit:
                        page_cap = min(page_cap, max(len(ids), 2))
                    anchor = start + len(ids) - 1
                    if in_flight and in_flight[0][0] > anchor:
                        discard_in_flight()  # mispredicted: the next page would leave a gap
                    # Before handing records over, so requests overlap their processing.
                    refill(anchor)
                if first_new < len(ids):
                    last_id = ids[-1]
                    yield page.records[first_new:]
                if is_last:
                    break
        finally:
            self._paging_over.set()
            discard_in_flight()
            pool.shutdown(wait=False, cancel_futures=True)

    @override
    def get_records(self, context: Context | None) -> Iterator[dict[str, t.Any]]:
        for records in self.iter_pages():
            yield from records


def invoca_error_text(response: requests.Response) -> str:
    """Return Invoca's error text from an error body, or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return quote_body(response.text) if response.text else ""
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, dict):
        parts = []
        for key, value in errors.items():
            text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{key}: {text}")
        return quote_body(", ".join(parts))
    return quote_body(json.dumps(body))
