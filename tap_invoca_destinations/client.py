"""REST client handling: the InvocaStream base class, its HTTP requests and paging loop.

The decisions live in ``paging.py`` (what to request, when the list has ended,
how long to wait before a retry); this module does the HTTP around them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import ipaddress
import json
import math
import sys
import threading
import time
import typing as t
import zlib
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import cached_property
from http import HTTPStatus
from urllib.parse import quote, quote_plus, urlparse

import msgspec
import requests
import urllib3
from requests.auth import AuthBase
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
    Step,
    UnsettledListError,
    Watchdog,
    settle,
)
from tap_invoca_destinations.records import INT64_MAX, INT64_MIN, PageDecoder, as_int64
from tap_invoca_destinations.sdk_seam import SeamStream
from tap_invoca_destinations.transport import (
    CuttableAdapter,
    InFlight,
    PageTransport,
    SentRequest,
    sending,
)

if t.TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from singer_sdk.helpers.types import Context

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override

RETRIABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # 408: the request was never read
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
MAX_BODY_BYTES = 256 * 1024 * 1024  # the cap of the per-response bound below, whatever the page
BODY_BASE_BYTES = 1024 * 1024  # envelope and error pages
BODY_BYTES_PER_RECORD = 16 * 1024  # a destination is ~1 KB on the wire: 16x slack
BODIES_IN_FLIGHT_BYTES = 64 * 1024 * 1024  # all bodies being read at once (at least 2 pages)
REDACTED = "<redacted>"
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

    failure_type = "system_error"  # the Airbyte source's failure type (see subclasses)


class InvocaConfigError(InvocaError):
    """A failure the user must fix: the token, network, version, a setting, the state."""

    failure_type = "config_error"


class InvocaTransientError(InvocaError):
    """Retries ran out on failures that may pass (429, 5xx, timeouts, dropped connections)."""

    failure_type = "transient_error"


class RetriableReply(Exception):  # noqa: N818 - a signal to the retry loop, caught there
    """A response worth another try (408, 429, 5xx)."""

    def __init__(self, reply: Reply) -> None:
        """Keep what the retry loop needs from the reply."""
        super().__init__(error_message(reply))
        self.reason = f"HTTP {reply.status}"
        self.retry_after = retry_after_seconds(reply.headers.get("Retry-After"))
        self.throttled = reply.status == HTTPStatus.TOO_MANY_REQUESTS
        # A 408 is a request dropped unread (a stale kept-alive connection, mostly):
        # retried like a dropped connection, it says nothing of the server's load.
        self.load = reply.status != HTTPStatus.REQUEST_TIMEOUT


# What sending a request and reading its response may fail with (``transport_failure``
# names each), and what one attempt may fail with that the retry loop judges.
TRANSPORT_FAILURES = (requests.RequestException, OSError, urllib3.exceptions.HTTPError)
ATTEMPT_FAILURES = (RetriableReply, *TRANSPORT_FAILURES)


@dataclass
class Reply:
    """One HTTP response, read completely within the request deadline."""

    status: int
    reason: str
    path: str  # the URL path only: never the query string
    headers: Mapping[str, str]
    body: bytes
    seconds: float
    secrets: tuple[str, ...] = ()  # redacted from every quote of this reply

    @property
    def where(self) -> str:
        """``HTTP 200 for GET /api/...``, the start of every message about this reply."""
        return f"HTTP {self.status} for GET {self.path}"

    def quote(self) -> str:
        """The start of the body, decoded leniently, for an error message (secrets redacted).

        The whole body is redacted before it is quoted and cut: ``repr`` escapes a
        secret differently inside a longer text, and a cut can leave its start.
        """
        return repr(quote_body(self.body.decode("utf-8", "replace"), self.secrets))


@dataclass
class Page:
    """One decoded list response."""

    records: list[t.Any]  # RawDestination structs of a typed page, else dicts
    ids: list[int]
    total: object  # recordsTotal as sent: only a hint


def secret_forms(secret: str) -> list[str]:
    """A secret as it may be printed: raw, escaped (JSON, ``repr`` in any text), URL-encoded.

    Longest first, so that a form holding another is replaced whole.
    """
    backslashed = secret.replace("\\", "\\\\")
    forms = {
        secret,
        repr(secret)[1:-1],
        backslashed,  # repr of a longer text that holds the secret: ' left alone ...
        backslashed.replace("'", "\\'"),  # ... or escaped, when that text holds " too
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret)[1:-1].replace("/", "\\/"),  # JSON encoders that escape /
        quote(secret, safe=""),
        quote_plus(secret),
    }
    return sorted((form for form in forms if form), key=len, reverse=True)


def redact(text: str, secrets: t.Iterable[str]) -> str:
    """Return ``text`` with every form of each secret replaced by ``<redacted>``."""
    for secret in secrets:
        for form in secret_forms(secret):
            if form in text:
                text = text.replace(form, REDACTED)
    return text


def quote_body(text: str, secrets: t.Iterable[str] = ()) -> str:
    """Return the start of a response body, on one line, for an error message.

    Secrets are redacted before the text is flattened and cut, so neither can
    leave part of one.
    """
    secrets = tuple(secrets)
    flat = redact(" ".join(redact(text, secrets).split()), secrets)
    return flat if len(flat) <= BODY_QUOTE_CHARS else flat[:BODY_QUOTE_CHARS] + "…"


def retry_after_seconds(header: str | None) -> float | None:
    """Parse a Retry-After header (delta-seconds or HTTP-date) into seconds from now.

    None for a value that is absent or invalid (negative, ``nan``, infinite,
    unparseable): the caller then uses its usual backoff.
    """
    if not header:
        return None
    header = header.strip()
    try:
        seconds = float(header)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(header)
        return max(0.0, when.timestamp() - time.time())  # a date in the past: now
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


def body_limit(records: int) -> int:
    """The most bytes (inflated) a response asking for ``records`` destinations may hold."""
    return min(BODY_BASE_BYTES + max(records, 1) * BODY_BYTES_PER_RECORD, MAX_BODY_BYTES)


class BodyBudget:
    """Bytes of the response bodies being read at once, by all requests in flight."""

    def __init__(self, limit: int) -> None:
        """Allow ``limit`` bytes in all."""
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes; False (nothing counted) if that would pass the limit."""
        with self._lock:
            if self._used + size > self.limit:
                return False
            self._used += size
            return True

    def give_back(self, size: int) -> None:
        """Release bytes counted by ``take``."""
        with self._lock:
            self._used -= size


def _too_big(response: urllib3.BaseHTTPResponse, path: str, what: str, records: int) -> InvocaError:
    encoding = response.headers.get("Content-Encoding", "").strip()
    body = f"the {encoding}-compressed body inflated" if encoding else "the body grew"
    return InvocaError(
        f"HTTP {response.status} for GET {path}: {body} past "
        f"{what}, far more than the {records} destinations asked for need; Invoca sent "
        "something other than a page"
    )


def out_of_time(timeout: float) -> requests.exceptions.ReadTimeout:
    """The failure of a response not complete within its whole-response deadline."""
    return requests.exceptions.ReadTimeout(
        f"no complete response within request_timeout={timeout:g} s"
    )


def read_body(  # noqa: PLR0913 - the request's deadline and bounds
    response: urllib3.BaseHTTPResponse,
    path: str,
    deadline: float,
    abandoned: threading.Event,
    timeout: float,
    *,
    records: int = 100,
    budget: BodyBudget | None = None,
) -> bytes:
    """Read a streamed body, giving up at the deadline even if bytes keep trickling in.

    Memory stays bounded whatever the server sends (a compressed body may inflate
    a thousandfold): the inflated body may hold at most ``body_limit(records)``
    bytes, and all bodies being read at once at most what ``budget`` allows.

    Raises:
        requests.exceptions.ReadTimeout: If the body is not complete by the deadline.
        InvocaError: If the body passes either bound.
    """
    limit = body_limit(records)
    inflater = body_inflater(response, path)
    chunks = []
    size = 0
    try:
        # Raw bytes, inflated here with a bound on each step: urllib3 would inflate a
        # whole network read at once (256 KiB of gzip can hold 256 MB).
        while raw := response.read1(READ_CHUNK, decode_content=False):
            while raw:
                if inflater is None:
                    chunk, raw = raw, b""
                else:
                    chunk, raw = inflater.inflate(raw, max(limit - size, 0) + 1)
                if size + len(chunk) > limit:
                    raise _too_big(response, path, f"{limit:,} bytes", records)
                if budget is not None and not budget.take(len(chunk)):
                    what = f"{budget.limit:,} bytes with the other responses being read"
                    raise _too_big(response, path, what, records)
                chunks.append(chunk)
                size += len(chunk)
            if abandoned.is_set() or time.monotonic() > deadline:
                break
        if abandoned.is_set() or time.monotonic() > deadline:  # a cut may look like the end
            raise out_of_time(timeout)
        rest = inflater.finish() if inflater is not None else b""
        if size + len(rest) > limit or (budget is not None and not budget.take(len(rest))):
            raise _too_big(response, path, f"{limit:,} bytes", records)
        size += len(rest)
        return b"".join([*chunks, rest])
    finally:
        if budget is not None:
            budget.give_back(size)


class Inflater:
    """Inflates gzip or zlib data in steps of bounded output, across concatenated gzip members."""

    def __init__(self) -> None:
        """Expect a gzip or a zlib header."""
        self._member = zlib.decompressobj(32 + zlib.MAX_WBITS)

    def inflate(self, data: bytes, most: int) -> tuple[bytes, bytes]:
        """Inflate the start of ``data``: at most ``most`` bytes out, and the input left over."""
        member = self._member
        if member.eof:  # RFC 1952 allows several gzip members one after another
            member = self._member = zlib.decompressobj(32 + zlib.MAX_WBITS)
        out = member.decompress(data, most)
        # Input past this member's end comes back as left over, to start the next one.
        return out, member.unconsumed_tail or member.unused_data

    def finish(self) -> bytes:
        """What zlib still holds once every input byte was given (a few bytes, if any)."""
        return self._member.flush()


def body_inflater(response: urllib3.BaseHTTPResponse, path: str) -> Inflater | None:
    """An inflater for the body's ``Content-Encoding``, or None for an identity body.

    Raises:
        InvocaError: For an encoding the tap did not ask for (it asks for gzip or deflate).
    """
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding in {"", "identity"}:
        return None
    if encoding in {"gzip", "x-gzip", "deflate"}:
        return Inflater()
    msg = (
        f"HTTP {response.status} for GET {path}: the body is "
        f"{encoding}-compressed, which the tap did not ask for (it asks for gzip or deflate)"
    )
    raise InvocaError(msg)


def _redact_json(value: object, secrets: tuple[str, ...]) -> object:
    """``value`` (decoded JSON) with secrets redacted from every string, keys included."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        return [_redact_json(item, secrets) for item in value]
    if isinstance(value, dict):
        return {redact(k, secrets): _redact_json(v, secrets) for k, v in value.items()}
    return value


def invoca_error_text(reply: Reply) -> str:
    """Return Invoca's error text from an error body, or the start of the body.

    Secrets are redacted from the decoded strings, before they are quoted or cut
    (a JSON escape such as ``u0026`` hides a secret from a search of the raw text).
    """
    secrets = reply.secrets
    try:
        body = _redact_json(json.loads(reply.body), secrets)
    except (ValueError, RecursionError):
        return quote_body(reply.body.decode("utf-8", "replace"), secrets) if reply.body else ""
    errors = body.get("errors") if isinstance(body, dict) else None
    if isinstance(errors, dict):
        parts = []
        for key, value in errors.items():
            text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{key}: {text}")
        return quote_body(", ".join(parts), secrets)
    return quote_body(json.dumps(body), secrets)


def error_message(reply: Reply) -> str:
    """One line for an error status: status, path, Invoca's text and a hint."""
    text = f"HTTP {reply.status} {reply.reason}".rstrip() + f" for GET {reply.path}"
    detail = invoca_error_text(reply)
    if detail:
        text += f": {detail}"
    if hint := HINTS.get(reply.status):
        text += f" ({hint})"
    return redact(text, reply.secrets)  # the reason phrase is the server's too


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
        raise InvocaConfigError(redact(msg, reply.secrets))
    if reply.status in RETRIABLE_STATUSES:
        raise RetriableReply(reply)
    if reply.status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        raise InvocaError(error_message(reply))
    if reply.status >= HTTPStatus.MULTIPLE_CHOICES:
        raise InvocaConfigError(error_message(reply))  # 401, 403, 404: the request's arguments


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


def feed_pager(pager: Pager, page: Page) -> Step:
    """Feed one page's facts to the pager, turning its refusals into the tap's errors.

    Raises:
        InvocaTransientError: If the list could not be read whole now (a later run may).
        InvocaError: If the server's paging is broken.
    """
    try:
        return pager.feed(page.ids, page.total)
    except UnsettledListError as exc:
        raise InvocaTransientError(str(exc)) from None
    except PagingError as exc:
        raise InvocaError(str(exc)) from None


class TokenAuth(AuthBase):
    """Sends the token as the ``Authorization`` header.

    As the session's auth it also keeps requests from putting Basic auth from
    ``~/.netrc`` or ``user:pass@`` in the URL in place of the token.
    """

    def __init__(self, token: str) -> None:
        """Send ``token``."""
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Set the header on ``request``."""
        request.headers["Authorization"] = self._token
        return request

    def __repr__(self) -> str:
        """Never the token."""
        return "TokenAuth(<redacted>)"


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


class SentPage:
    """A page request sent ahead (``InvocaStream.send_ahead``), for a ``PrefetchWindow``.

    Its response is read on the reader's thread when its turn comes; a failure
    worth retrying goes on, with its retries, to ``fetch_page`` on a daemon
    thread, so that the reader keeps its output alive while they wait.
    """

    def __init__(  # noqa: PLR0913 - the request, and its place in the window
        self,
        stream: InvocaStream,
        request: Request,
        cancel: threading.Event,
        sent: SentRequest,
        *,
        window: AdaptiveWindow,
        ticket: int,
    ) -> None:
        """Hold ``sent`` and its place (``ticket``) in ``window``."""
        self._stream, self._request, self._cancel = stream, request, cancel
        self._sent, self._window, self._ticket = sent, window, ticket
        self._held = True
        self._deadline: float | None = None

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the response to start; True once it has or its time is up.

        The request's timeout counts from the first call (``paging.SentAhead``).
        """
        if self._deadline is None:
            self._deadline = time.monotonic() + self._stream.timeout
        remaining = self._deadline - time.monotonic()
        answered = self._sent.ready(max(min(timeout, remaining), 0.0))
        if answered or time.monotonic() >= self._deadline:
            self._give_back()
            return True
        return False

    def look(self) -> bool:
        """Give the place on the wire back once the response has started (``paging.SentAhead``)."""
        if self._held and (
            self._sent.ready(0.0) or time.monotonic() - self._sent.sent_at > self._stream.timeout
        ):
            self._give_back()
        return self._held

    def read(self, result: Future[Reply]) -> None:
        """Read the response into ``result``, or hand it to ``fetch_page``'s retries."""
        stream = self._stream
        try:
            try:
                deadline = self._deadline or time.monotonic() + stream.timeout
                reply = stream.read_sent(self._sent, self._request.limit, deadline)
            finally:
                self._give_back()
            check_status(reply)
        except ATTEMPT_FAILURES as exc:
            failed = (exc, self._ticket)
            WORKERS.run(
                lambda: settle(
                    result, lambda: stream.fetch_page(self._request, self._cancel, failed)
                )
            )
            return
        except Exception as exc:  # noqa: BLE001 - raised by the window's pop
            result.set_exception(exc)
            return
        self._window.prompt(self._ticket, reply.seconds)
        result.set_result(reply)

    def drop(self) -> None:
        """Close the connection, its response unread."""
        self._sent.drop()
        self._give_back()

    def _give_back(self) -> None:
        if self._held:
            self._held = False
            self._window.give_back()


class InvocaStream(SeamStream):
    """Base stream for Invoca's network API: auth, retries, and safe, ordered paging.

    Paging is id-anchored offset paging, decided by ``paging.Pager``: pages are
    sorted by id, each request re-reads the last emitted record, and the end of
    the list is proven by the pages themselves, never by ``recordsTotal`` alone.
    Up to ``max_concurrency`` pages are requested ahead: on an open connection
    from the reader's own thread (``send_ahead``), else on daemon threads
    (``fetch_page``); they are still checked and emitted strictly in order.
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
        self._window: PrefetchWindow[Reply] | None = None
        self._adaptive: AdaptiveWindow | None = None
        self._request_counter: metrics.Counter | None = None
        self._transport: PageTransport | None = None
        self._watchdog = Watchdog()  # the deadline of the response the reader reads itself
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
            "Accept-Encoding": "gzip, deflate",  # what read_body inflates with bounded steps
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
        """The session page requests are sent as: ``page_transport`` sends what it would.

        Requests go through it only when a proxy applies (see ``PageTransport``).
        Connections are opened on demand, so a sync opens at most
        ``max_concurrency`` of them, and one more for each request dropped unread
        or cut (its connection is closed); its pool, like ``page_transport``'s, keeps
        twice that many so requests that were dropped (then finish) never make
        urllib3 discard connections.
        """
        session = requests.Session()
        adapter = CuttableAdapter(pool_connections=1, pool_maxsize=2 * self.max_concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        # Plain http is allowed only to loopback hosts: never through a proxy.
        session.trust_env = not (
            urlparse(self.url_base).scheme == "http" and is_loopback(self.url_base)
        )
        session.auth = TokenAuth(self.config["api_token"])  # never ~/.netrc's Basic auth
        return session

    @property
    def page_transport(self) -> PageTransport:
        """What sends every page request: built once, by whichever thread asks first."""
        with self._lock:
            if self._transport is None:
                self._transport = PageTransport(
                    self.http_session, self.get_url(None), 2 * self.max_concurrency
                )
            return self._transport

    @cached_property
    def secrets(self) -> tuple[str, ...]:
        """The token as used and as configured: redacted from every quoted reply."""
        forms = {self.config.get("api_token"), *getattr(self._tap, "secret_forms", ())}
        return tuple(form for form in forms if isinstance(form, str) and form.strip())

    @cached_property
    def body_budget(self) -> BodyBudget:
        """The bound on the bytes of all response bodies being read at once."""
        page = body_limit(int(self.config.get("page_size", 100)))
        return BodyBudget(max(BODIES_IN_FLIGHT_BYTES, 2 * page))

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

    @property
    def mirror_mode(self) -> bool:
        """True when a complete read ends in ACTIVATE_VERSION (the target then deletes)."""
        return self.replication_method == "FULL_TABLE" and bool(
            self.config.get("emit_activate_version_messages")
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
        in_flight = InFlight()

        def run() -> None:
            try:
                with sending(in_flight):
                    box.set_result(self._receive(params, deadline, abandoned))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                box.set_exception(exc)

        WORKERS.run(run)
        try:
            return box.result(timeout=timeout)
        except FutureTimeout:
            abandoned.set()
            in_flight.cut()  # or it stays on the wire, beside the retry, while bytes trickle in
            raise out_of_time(timeout) from None

    def _receive(
        self, params: dict[str, t.Any], deadline: float, abandoned: threading.Event
    ) -> Reply:
        began = time.monotonic()
        timeout = max(deadline - began, 0.001)
        response = self.page_transport.get(params, self.http_headers, timeout)
        return self._reply(response, began, deadline, abandoned, int(params.get("limit", 100)))

    def _reply(
        self,
        response: urllib3.BaseHTTPResponse,
        began: float,
        deadline: float,
        abandoned: threading.Event,
        records: int,
    ) -> Reply:
        """Read the body within the deadline and note the reply (metrics, server date)."""
        path = self.page_transport.path
        try:
            body = read_body(
                response,
                path,
                deadline,
                abandoned,
                self.timeout,
                records=records,
                budget=self.body_budget,
            )
        except BaseException:
            response.close()  # the connection is unusable: closed before its slot is given back
            response.release_conn()
            raise
        reply = Reply(
            status=response.status,
            reason=response.reason or "",
            path=path,
            headers=response.headers,
            body=body,
            seconds=time.monotonic() - began,
            secrets=self.secrets,
        )
        self._note_reply(reply)
        return reply

    def send_ahead(self, request: Request, cancel: threading.Event) -> SentPage | None:
        """Send ``request`` from this (the reader's) thread if it can go now, on an open connection.

        None when it cannot (no room in the window, no idle open connection, a
        proxy, a wait before sending): ``fetch_page`` then runs it on a thread.
        """
        adaptive = self._adaptive
        if adaptive is None or request.backoff:
            return None
        ticket = adaptive.take()
        if ticket is None:
            return None
        try:
            sent = self.page_transport.send_ahead(
                self._params(request), self.http_headers, self.timeout
            )
        except requests.RequestException:
            sent = None  # fetch_page raises it, named as every transport failure is
        if sent is None:
            adaptive.give_back()
            return None
        return SentPage(self, request, cancel, sent, window=adaptive, ticket=ticket)

    def read_sent(self, sent: SentRequest, records: int, deadline: float) -> Reply:
        """Read the response to a request sent ahead, on this thread, by ``deadline``.

        The deadline counts from when the reader began waiting for this
        response, not from the send: the response may have waited for the reader.

        Raises:
            requests.RequestException: As ``send`` (a ``ReadTimeout`` if the response
                is not complete in time).
            InvocaError: If the body passes its bounds (see ``read_body``).
        """
        timeout = self.timeout
        in_flight, abandoned = InFlight(), threading.Event()

        def cut() -> None:
            abandoned.set()
            in_flight.cut()

        self._watchdog.watch(deadline, cut)
        try:
            with sending(in_flight):
                return self._reply(sent.response(), sent.sent_at, deadline, abandoned, records)
        except TRANSPORT_FAILURES:
            if abandoned.is_set():
                raise out_of_time(timeout) from None
            raise
        finally:
            self._watchdog.clear()

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

    def fetch_page(
        self,
        request: Request,
        cancel: threading.Event,
        failed: tuple[Exception, int] | None = None,
    ) -> Reply:
        """GET one page, retrying transient failures (see ``paging.RetryPolicy``).

        Returns the successful reply undecoded: the reader decodes it on its own
        thread (``decode_page``), which measured 0.84-0.96 of the wall time of
        decoding here (see docs/performance.md). ``failed`` is the failure and
        ticket of a first attempt made already (sent ahead, see ``SentPage``).

        Raises:
            InvocaError: On a fatal status, a TLS or header problem, or exhausted retries.
            Cancelled: If ``cancel`` is set while waiting to retry.
        """
        params = self._params(request)
        if request.backoff:  # a request confirming a doubtful end (see Pager)
            self._pause(self.retry_policy.backoff(request.backoff), cancel)
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            if failed is not None:
                (first, ticket), failed = failed, None
                reason, retry_after, failure = self._judge(first, ticket)
            else:
                adaptive = self._adaptive
                slot = adaptive.slot(cancel) if adaptive is not None else contextlib.nullcontext(0)
                ticket = 0
                try:
                    with slot as ticket:
                        reply = self.send(params)
                    check_status(reply)
                except ATTEMPT_FAILURES as exc:
                    reason, retry_after, failure = self._judge(exc, ticket)
                else:
                    if adaptive is not None:
                        adaptive.prompt(ticket, reply.seconds)
                    return reply
            if cancel.is_set():
                raise Cancelled  # no longer wanted: neither retried nor logged
            policy = self.retry_policy
            wait = policy.wait(attempt, waited, retry_after)
            if wait is None:
                raise InvocaTransientError(policy.give_up_message(attempt, waited, failure))
            self.logger.warning(
                "Retrying GET %s start=%d: %s, attempt %d/%d, waiting %.2f s%s",
                self.path,
                request.start,
                reason,
                attempt,
                policy.max_tries,
                wait,
                " (Retry-After)" if retry_after is not None and retry_after >= wait else "",
            )
            self._pause(wait, cancel)
            waited += wait

    def _judge(self, exc: Exception, ticket: int) -> tuple[str, float | None, str]:
        """What a failed attempt means to the retry loop: (reason, Retry-After, message).

        Raises:
            InvocaError: If retrying cannot help (see ``transport_failure``).
        """
        if isinstance(exc, RetriableReply):
            if exc.load:
                self._window_trouble(ticket, exc.reason)
            return exc.reason, exc.retry_after, str(exc)
        reason, failure = self.transport_failure(exc)
        if isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)):
            self._window_trouble(ticket, reason)
        return reason, None, failure

    def _params(self, request: Request) -> dict[str, t.Any]:
        return {**self.filter_params(), "limit": request.limit, "start": request.start}

    def _pause(self, seconds: float, cancel: threading.Event) -> None:
        """Wait before a retry (counted as one).

        Raises:
            Cancelled: If the page stops being wanted meanwhile.
        """
        with self._lock:
            self.retry_count += 1
        if cancel.wait(seconds):
            raise Cancelled

    def transport_failure(self, exc: BaseException) -> tuple[str, str]:
        """Name a transport failure worth retrying: (reason, message).

        Raises:
            InvocaError: For failures retrying cannot fix (TLS, headers, CA bundle).
        """
        if isinstance(exc, requests.exceptions.SSLError):
            host = urlparse(self.url_base).netloc
            msg = f"TLS error talking to {host}: {transport_reason(exc)}"
            raise InvocaConfigError(msg) from None
        if isinstance(exc, requests.exceptions.InvalidHeader):
            # Its message quotes the header value, which may be the token.
            msg = (
                "a request header has an invalid value (control characters or surrounding "
                "whitespace?): check api_token and user_agent"
            )
            raise InvocaConfigError(msg) from None
        if isinstance(exc, RETRIABLE_TRANSPORT):
            reason = type(exc).__name__
            return reason, f"{reason} for GET {self.path}: {transport_reason(exc)}"
        # E.g. a CA bundle that cannot be read: retrying will not help.
        msg = f"cannot send GET {self.path}: {transport_reason(exc)}"
        raise InvocaConfigError(msg) from None

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
        pager = Pager(
            page_size=int(self.config.get("page_size", 100)),
            max_doubts=self.retry_policy.max_tries - 1,  # a doubtful end is retried like a 5xx
            strict=self.mirror_mode,
        )
        with self._lock:
            self.server_date_at_start = None
            self._got_reply = False
            self.request_count = self.retry_count = 0
        window: PrefetchWindow[Reply] = PrefetchWindow(self.fetch_page, self.send_ahead)
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
                    _, reply = window.pop(self.output_idle)
                    page = decode_page(reply, self.page_decoder)  # a bad body is fatal here
                    step = feed_pager(pager, page)
                    if step.discard:
                        window.discard()
                    if step.doubt:
                        self.logger.warning(
                            "%s: asking again to confirm the end of the list (%d/%d)",
                            step.doubt,
                            pager.doubts,
                            pager.max_doubts,
                        )
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
