"""REST client handling: the InvocaStream base class, its HTTP requests and paging loop.

The decisions live in ``paging.py`` (what to request, when the list has ended,
how long to wait before a retry); this module does the HTTP around them.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import json
import sys
import threading
import time
import typing as t
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import cached_property
from http import HTTPStatus
from urllib.parse import urlparse

import msgspec
import requests
import urllib3
from requests.adapters import HTTPAdapter
from singer_sdk import metrics
from singer_sdk.exceptions import FatalAPIError

from tap_invoca_destinations.paging import (
    WORKERS,
    AdaptiveWindow,
    Cancelled,
    Pager,
    PagingError,
    PrefetchWindow,
    Request,
    RetryPolicy,
)
from tap_invoca_destinations.records import INT64_MAX, INT64_MIN, PageDecoder, as_int64
from tap_invoca_destinations.sdk_seam import SeamStream

if t.TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from singer_sdk.helpers.types import Context

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override

RETRIABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRIABLE_TRANSPORT = (
    requests.exceptions.Timeout,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,  # raised by body reads (ReadTimeoutError, ProtocolError)
    ConnectionResetError,
)
BODY_QUOTE_CHARS = 300
READ_CHUNK = 256 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024  # a page of 100 destinations is ~100 KB; this is no page
PROGRESS_INTERVAL_SECONDS = 30.0  # wall time between progress lines of a long sync
DEFAULT_BASE_URL = "https://invoca.net"
DEFAULT_API_VERSION = "2022-08-01"
DEFAULT_MAX_CONCURRENCY = 8  # the window's ceiling; see the setting's description
WINDOW_START = 4  # pages in flight at first (the fixed window of earlier versions)

HINTS: dict[int, str] = {
    HTTPStatus.UNAUTHORIZED: "the token was rejected: check api_token",
    HTTPStatus.FORBIDDEN: "Invoca refused the request's arguments: check status, query, "
    "include_inactive and page_size",
    HTTPStatus.NOT_FOUND: "check network_id, api_version and base_url",
}


class InvocaError(FatalAPIError):
    """A failure the tap reports on one line and exits non-zero for."""


class RetriableReply(Exception):  # noqa: N818 - a signal to the retry loop, caught there
    """A response worth another try (429, 5xx)."""

    def __init__(self, reply: Reply) -> None:
        """Keep what the retry loop needs from the reply."""
        super().__init__(error_message(reply))
        self.reason = f"HTTP {reply.status}"
        self.retry_after = retry_after_seconds(reply.headers.get("Retry-After"))
        self.throttled = reply.status == HTTPStatus.TOO_MANY_REQUESTS


@dataclass
class Reply:
    """One HTTP response, read completely within the request deadline."""

    status: int
    reason: str
    path: str  # the URL path only: never the query string
    headers: Mapping[str, str]
    body: bytes
    seconds: float

    @property
    def where(self) -> str:
        """``HTTP 200 for GET /api/...``, the start of every message about this reply."""
        return f"HTTP {self.status} for GET {self.path}"

    def quote(self) -> str:
        """The start of the body, decoded leniently, for an error message."""
        return repr(quote_body(self.body[: BODY_QUOTE_CHARS * 4].decode("utf-8", "replace")))


@dataclass
class Page:
    """One decoded list response."""

    records: list[t.Any]  # RawDestination structs of a typed page, else dicts
    ids: list[int]
    total: object  # recordsTotal as sent: only a hint


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
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):  # absurd years overflow
        return None


def server_date(reply: Reply) -> dt.datetime | None:
    """The reply's ``Date`` header as an aware UTC datetime, or None."""
    try:
        when = email.utils.parsedate_to_datetime(reply.headers.get("Date", ""))
        return None if when.tzinfo is None else when.astimezone(dt.UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def is_loopback(url: str) -> bool:
    """True for a URL whose host is a loopback address or ``localhost``."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def transport_reason(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 transport error, on one line."""
    reason: object = exc
    while True:
        inner = getattr(reason, "reason", None)
        if inner is None and isinstance(reason, requests.RequestException) and reason.args:
            inner = reason.args[0] if isinstance(reason.args[0], BaseException) else None
        if not isinstance(inner, BaseException) or inner is reason:
            break
        reason = inner
    return " ".join(str(reason).split()) or type(reason).__name__


def read_body(
    response: requests.Response, deadline: float, abandoned: threading.Event, timeout: float
) -> bytes:
    """Read a streamed body, giving up at the deadline even if bytes keep trickling in.

    Raises:
        requests.exceptions.ReadTimeout: If the body is not complete by the deadline.
        InvocaError: If the body grows past ``MAX_BODY_BYTES`` (memory stays bounded).
    """
    chunks = []
    size = 0
    while chunk := response.raw.read1(READ_CHUNK, decode_content=True):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            msg = (
                f"HTTP {response.status_code} for GET {urlparse(response.url).path}: the body "
                f"grew past {MAX_BODY_BYTES:,} bytes; lower page_size"
            )
            raise InvocaError(msg)
        if abandoned.is_set() or time.monotonic() > deadline:
            msg = f"no complete response within request_timeout={timeout:g} s"
            raise requests.exceptions.ReadTimeout(msg)
    return b"".join(chunks)


def invoca_error_text(reply: Reply) -> str:
    """Return Invoca's error text from an error body, or the start of the body."""
    try:
        body = json.loads(reply.body)
    except (ValueError, RecursionError):
        return quote_body(reply.body.decode("utf-8", "replace")) if reply.body else ""
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, dict):
        parts = []
        for key, value in errors.items():
            text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{key}: {text}")
        return quote_body(", ".join(parts))
    return quote_body(json.dumps(body))


def error_message(reply: Reply) -> str:
    """One line for an error status: status, path, Invoca's text and a hint."""
    text = f"HTTP {reply.status} {reply.reason}".rstrip() + f" for GET {reply.path}"
    detail = invoca_error_text(reply)
    if detail:
        text += f": {detail}"
    if hint := HINTS.get(reply.status):
        text += f" ({hint})"
    return text


def check_status(reply: Reply) -> None:
    """Pass a 2xx reply; raise for the others.

    Raises:
        InvocaError: On a redirect or a status that retrying cannot fix.
        RetriableReply: On 429, 500, 502, 503 and 504.
    """
    if reply.status in {301, 302, 303, 307, 308}:
        # Not followed: requests drops the Authorization header on a cross-host
        # redirect, which would surface as a confusing 401.
        target = urlparse(reply.headers.get("Location", ""))
        msg = (
            f"{reply.where}: Invoca redirects to {target.scheme}://{target.netloc}{target.path}"
            " (set base_url to that host)"
        )
        raise InvocaError(msg)
    if reply.status in RETRIABLE_STATUSES:
        raise RetriableReply(reply)
    if reply.status >= HTTPStatus.MULTIPLE_CHOICES:
        raise InvocaError(error_message(reply))


def decode_page(reply: Reply, decoder: PageDecoder | None = None) -> Page:
    """Decode a list response once, checking the envelope and the ids.

    With a ``decoder``, the page is decoded into typed records when it fits them
    (see ``records.PageDecoder``); otherwise, and whenever it does not, into dicts.

    Raises:
        InvocaError: If the body is not UTF-8 JSON, carries Invoca's error envelope,
            lacks a ``data`` list, or has records that are not objects with an
            integer id that fits 64 bits.
    """
    if decoder is not None and decoder.active:
        page = _decode_typed(reply, decoder)
        if page is not None:
            return page
    body = _decode_json(reply)
    if isinstance(body, dict):
        _refuse_error_envelope(reply, body.get("errors"), body.get("error"))
        data = body.get("data")
    if not isinstance(body, dict) or not isinstance(data, list):
        msg = f"{reply.where}: the body has no 'data' list: {reply.quote()}"
        raise InvocaError(msg)
    ids = []
    for record in data:
        if not isinstance(record, dict):
            msg = f"{reply.where}: a record in 'data' is not an object: {reply.quote()}"
            raise InvocaError(msg)
        ids.append(_record_id(reply, record.get("id")))
    return Page(records=data, ids=ids, total=body.get("recordsTotal"))


def _decode_json(reply: Reply) -> object:
    try:
        return msgspec.json.decode(reply.body)
    except UnicodeDecodeError:
        problem = "the body is not UTF-8"
    except RecursionError:
        problem = "the body's JSON is nested too deeply"
    except msgspec.DecodeError:
        problem = "the body is not JSON"
    msg = f"{reply.where}: {problem}: {reply.quote()}"
    raise InvocaError(msg)


def _decode_typed(reply: Reply, decoder: PageDecoder) -> Page | None:
    """The page as typed records, or None when it does not fit them (or is broken)."""
    try:
        body = decoder.decoder.decode(reply.body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None  # the dict path decides, and names any problem
    _refuse_error_envelope(reply, body.errors, body.error)
    ids = []
    for record in body.data:
        raw_id = record.id
        if type(raw_id) is not int or not INT64_MIN <= raw_id <= INT64_MAX:
            raw_id = record.id = _record_id(reply, raw_id)
        ids.append(raw_id)
    return Page(records=body.data, ids=ids, total=body.recordsTotal)


def _refuse_error_envelope(reply: Reply, errors: object, error: object) -> None:
    """Raise if a 200 carries Invoca's error envelope: it is no (empty) page."""
    for name, value in (("errors", errors), ("error", error)):
        if value not in (None, "", [], {}):
            text = quote_body(value) if isinstance(value, str) else invoca_error_text(reply)
            msg = f"{reply.where}: Invoca answered with '{name}': {text}"
            raise InvocaError(msg)


def _record_id(reply: Reply, raw_id: object) -> int:
    """A record's id as an int: an integer or an ASCII digit string that fits 64 bits."""
    record_id = as_int64(raw_id) if not isinstance(raw_id, float) else None
    if record_id is None:
        msg = (
            f"{reply.where}: a destination has no integer id that fits 64 bits "
            f"(id {quote_body(repr(raw_id))})"
        )
        raise InvocaError(msg)
    return record_id


class InvocaStream(SeamStream):
    """Base stream for Invoca's network API: auth, retries, and safe, ordered paging.

    Paging is id-anchored offset paging, decided by ``paging.Pager``: pages are
    sorted by id, each request re-reads the last emitted record, and the end of
    the list is proven by the pages themselves, never by ``recordsTotal`` alone.
    Up to ``max_concurrency`` pages are requested ahead on daemon threads; they
    are still checked and emitted strictly in order.
    """

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Initialise the stream; paging state is created per sync by iter_pages."""
        super().__init__(*args, **kwargs)
        self.max_concurrency = max(
            int(self.config.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)), 1
        )
        self.server_date_at_start: dt.datetime | None = None
        self.request_count = 0
        self.retry_count = 0
        self._lock = threading.Lock()
        self._got_reply = False
        self._window: PrefetchWindow[Page] | None = None
        self._adaptive: AdaptiveWindow | None = None
        self._request_counter: metrics.Counter | None = None
        self.page_decoder: PageDecoder | None = None  # set by a stream whose records it knows

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

    @cached_property
    def http_session(self) -> requests.Session:
        """The session of every request: a pooled connection per concurrent page.

        Connections are opened on demand, so a sync opens at most
        ``max_concurrency`` of them; the pool keeps twice that many so requests
        that were dropped (then finish) never make urllib3 discard connections.
        """
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=2 * self.max_concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        # Plain http is allowed only to loopback hosts: never through a proxy.
        session.trust_env = not (
            urlparse(self.url_base).scheme == "http" and is_loopback(self.url_base)
        )
        return session

    @property
    @override
    def requests_session(self) -> requests.Session:
        return self.http_session

    @cached_property
    def retry_policy(self) -> RetryPolicy:
        """The retry rules from the settings."""
        return RetryPolicy(
            max_tries=int(self.config.get("max_tries", 6)),
            budget_seconds=float(self.config.get("max_retry_seconds", 300)),
            initial_wait=float(self.config.get("retry_initial_wait", 1.0)),
        )

    @override
    def get_new_paginator(self) -> None:
        # Paging is done by iter_pages; the SDK's offset paginator skips records
        # on short pages and loops forever on a server that ignores `start`.
        return None

    def filter_params(self) -> dict[str, t.Any]:
        """Return the query parameters every list request carries, besides paging."""
        return {}

    # --- one request ---------------------------------------------------------

    def send(self, params: dict[str, t.Any]) -> Reply:
        """GET the list once; the whole response (connect, headers, body) within the timeout.

        The request runs on a daemon thread so that a server trickling its
        headers or body cannot hold the caller past the deadline.

        Raises:
            requests.exceptions.Timeout: If the response is not complete in time.
        """
        timeout = self.timeout
        deadline = time.monotonic() + timeout
        box: Future[Reply] = Future()
        abandoned = threading.Event()

        def run() -> None:
            try:
                box.set_result(self._receive(params, deadline, abandoned))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                box.set_exception(exc)

        WORKERS.run(run)
        try:
            return box.result(timeout=timeout)
        except FutureTimeout:
            abandoned.set()
            msg = f"no complete response within request_timeout={timeout:g} s"
            raise requests.exceptions.ReadTimeout(msg) from None

    def _receive(
        self, params: dict[str, t.Any], deadline: float, abandoned: threading.Event
    ) -> Reply:
        began = time.monotonic()
        timeout = max(deadline - began, 0.001)
        response = self.http_session.get(
            self.get_url(None),
            params=params,
            headers=self.http_headers,
            timeout=(timeout, timeout),
            allow_redirects=False,
            stream=True,
        )
        try:
            body = read_body(response, deadline, abandoned, self.timeout)
        except BaseException:
            response.close()  # the connection is unusable: not back to the pool
            raise
        reply = Reply(
            status=response.status_code,
            reason=response.reason or "",
            path=urlparse(response.url).path,
            headers=response.headers,
            body=body,
            seconds=time.monotonic() - began,
        )
        self._note_reply(reply)
        return reply

    def _note_reply(self, reply: Reply) -> None:
        if self._window is None:
            return  # a request left running after paging ended: the process may be exiting
        with self._lock:
            self.request_count += 1
            if not self._got_reply:
                self._got_reply = True
                self.server_date_at_start = server_date(reply)
            if self._request_counter is not None:
                self._request_counter.increment()
        point = metrics.Point(
            "timer",
            metric=metrics.Metric.HTTP_REQUEST_DURATION,
            value=reply.seconds,
            tags={
                metrics.Tag.STREAM: self.name,
                metrics.Tag.ENDPOINT: self.path,
                metrics.Tag.HTTP_STATUS_CODE: reply.status,
                metrics.Tag.STATUS: (
                    metrics.Status.SUCCEEDED
                    if reply.status < HTTPStatus.BAD_REQUEST
                    else metrics.Status.FAILED
                ),
            },
        )
        metrics.log(metrics.get_metrics_logger(), point)

    # --- retries -------------------------------------------------------------

    def fetch_page(self, request: Request, cancel: threading.Event) -> Page:
        """GET one page, retrying transient failures (see ``paging.RetryPolicy``).

        Raises:
            InvocaError: On a fatal status, a bad body, a TLS or header problem,
                or exhausted retries.
            Cancelled: If ``cancel`` is set while waiting to retry.
        """
        params = {**self.filter_params(), "limit": request.limit, "start": request.start}
        policy = self.retry_policy
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            adaptive = self._adaptive
            ticket = adaptive.sent() if adaptive is not None else 0
            try:
                reply = self.send(params)
                check_status(reply)
                page = decode_page(reply, self.page_decoder)
            except RetriableReply as exc:
                reason, retry_after, failure = exc.reason, exc.retry_after, str(exc)
                self._window_trouble(ticket, reason)
            except (requests.RequestException, OSError, urllib3.exceptions.HTTPError) as exc:
                reason, failure = self.transport_failure(exc)
                retry_after = None
                if isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)):
                    self._window_trouble(ticket, reason)
            else:
                if adaptive is not None:
                    adaptive.prompt(ticket, reply.seconds)
                return page
            if cancel.is_set():
                raise Cancelled  # no longer wanted: neither retried nor logged
            wait = policy.wait(attempt, waited, retry_after)
            if wait is None:
                raise InvocaError(policy.give_up_message(attempt, waited, failure))
            with self._lock:
                self.retry_count += 1
            self.logger.warning(
                "Retrying GET %s start=%d: %s, attempt %d/%d, waiting %.2f s%s",
                self.path,
                request.start,
                reason,
                attempt,
                policy.max_tries,
                wait,
                " (Retry-After)" if retry_after is not None else "",
            )
            if cancel.wait(wait):
                raise Cancelled
            waited += wait

    def transport_failure(self, exc: BaseException) -> tuple[str, str]:
        """Name a transport failure worth retrying: (reason, message).

        Raises:
            InvocaError: For failures retrying cannot fix (TLS, headers, CA bundle).
        """
        if isinstance(exc, requests.exceptions.SSLError):
            host = urlparse(self.url_base).netloc
            msg = f"TLS error talking to {host}: {transport_reason(exc)}"
            raise InvocaError(msg) from None
        if isinstance(exc, requests.exceptions.InvalidHeader):
            # Its message quotes the header value, which may be the token.
            msg = (
                "a request header has an invalid value (control characters or surrounding "
                "whitespace?): check api_token and user_agent"
            )
            raise InvocaError(msg) from None
        if isinstance(exc, RETRIABLE_TRANSPORT):
            reason = type(exc).__name__
            return reason, f"{reason} for GET {self.path}: {transport_reason(exc)}"
        # E.g. a CA bundle that cannot be read: retrying will not help.
        msg = f"cannot send GET {self.path}: {transport_reason(exc)}"
        raise InvocaError(msg) from None

    def _window_trouble(self, ticket: int, reason: str) -> None:
        adaptive = self._adaptive
        size = adaptive.trouble(ticket) if adaptive is not None else None
        if size is not None:
            self.logger.warning(
                "Invoca %s (%s): lowering concurrency to %d",
                "throttled" if reason == "HTTP 429" else "is struggling",
                reason,
                size,
            )

    # --- paging --------------------------------------------------------------

    def iter_pages(self) -> Iterator[list[dict[str, t.Any]]]:
        """Yield, in id order, the not-yet-emitted records of each page.

        Raises:
            InvocaError: If paging cannot be done safely (see ``paging.Pager``).
        """
        pager = Pager(page_size=int(self.config.get("page_size", 100)))
        with self._lock:
            self.server_date_at_start = None
            self._got_reply = False
            self.request_count = self.retry_count = 0
        window: PrefetchWindow[Page] = PrefetchWindow(self.fetch_page, self.max_concurrency)
        adaptive = AdaptiveWindow(start=WINDOW_START, ceiling=self.max_concurrency)
        self._window, self._adaptive = window, adaptive
        began = last_progress = time.monotonic()
        outcome = "stopped"
        with self.get_http_request_counter() as counter:
            self._request_counter = counter
            try:
                for request in pager.plan(adaptive.size):
                    window.submit(request)
                while len(window):
                    _, page = window.pop()
                    try:
                        step = pager.feed(page.ids, page.total)
                    except PagingError as exc:
                        raise InvocaError(str(exc)) from None
                    if step.discard:
                        window.discard()
                    # Before handing records over, so requests overlap their processing.
                    for request in pager.plan(adaptive.size):
                        window.submit(request)
                    if step.emit_from < len(page.records):
                        yield page.records[step.emit_from :]
                    if time.monotonic() - last_progress >= PROGRESS_INTERVAL_SECONDS:
                        last_progress = time.monotonic()
                        self._log_progress(pager, "in progress", last_progress - began)
                if not pager.done:  # pragma: no cover - a safety net: never a short success
                    msg = "paging stopped before the end of the list was proven"
                    raise InvocaError(msg)
                outcome = "done"
            finally:
                window.discard()
                self._window = self._adaptive = self._request_counter = None
                self._log_progress(pager, outcome, time.monotonic() - began)

    def _log_progress(self, pager: Pager, what: str, seconds: float) -> None:
        total = f" of about {pager.total}" if pager.total is not None else ""
        self.logger.info(
            "Paging %s: %d records read%s, %d requests, %d retries, %.1f s",
            what,
            pager.emitted,
            total,
            self.request_count,
            self.retry_count,
            seconds,
        )

    @override
    def get_records(self, context: Context | None) -> Iterator[dict[str, t.Any]]:
        for records in self.iter_pages():
            yield from records
