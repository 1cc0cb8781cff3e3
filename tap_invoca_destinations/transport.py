"""Page requests sent through urllib3 directly: the request requests would send, for less CPU.

Why: ``requests.Session`` costs ~0.35 ms of CPU per request (URL parsing,
environment merging, hooks, cookie jars, Response objects, the adapter), most of
the tap's per-page overhead. ``PageTransport`` works out once per stream what
the session would work out per request (the URL, the proxy, the CA bundle),
then sends each page request with one ``urlopen`` on a urllib3 pool (``get``),
or sends it on an idle open connection and leaves its response to be read
later (``send_ahead``), raising the exceptions requests' ``HTTPAdapter`` would
raise.

When the environment puts a proxy in front of the host (``HTTPS_PROXY``,
``ALL_PROXY``... and no ``NO_PROXY`` match, with the session trusting the
environment), every request goes through the session instead: proxies (HTTP
CONNECT, SOCKS, proxy credentials) stay requests' business.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import socket
import ssl
import threading
import time
import typing as t
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import (
    DEFAULT_CA_BUNDLE_PATH,
    check_header_validity,
    get_environ_proxies,
    select_proxy,
)
from urllib3.connection import BaseSSLError
from urllib3.connectionpool import port_by_scheme
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import Retry, parse_url
from urllib3.util.connection import is_connection_dropped
from urllib3.util.ssl_match_hostname import CertificateError
from urllib3.util.wait import wait_for_read

if t.TYPE_CHECKING:
    from collections.abc import Mapping


class InFlight:
    """The socket one page request is reading from, so that a caller who gave up can cut it.

    A socket's timeout bounds each read, not a response: a server trickling its
    headers keeps a request alive long after its deadline, and its connection
    open beside the retry's. ``cut`` shuts the socket down, which ends the read
    at once. It covers the waits for the headers and the body; connecting (and
    a TLS handshake) stays bounded by the connect timeout alone. Only the
    request's own socket is cut: it stops being this request's once its
    connection goes back to the pool (``let_go``), before the pool can lend it
    to another.
    """

    def __init__(self) -> None:
        """Hold no connection yet."""
        self._lock = threading.Lock()
        self._connection: urllib3.connection.HTTPConnection | None = None
        # The connection's socket as the request read from it: a response that ends
        # with its connection (Connection: close, or no length) is read from this
        # socket after http.client closed the connection. A socket object closed for
        # good shuts nothing down (its descriptor is gone); only a cut in the same
        # instant as that final close could meet a descriptor number reused by then.
        self._socket: socket.socket | None = None
        self._cut = False

    def hold(self, connection: urllib3.connection.HTTPConnection) -> None:
        """The request reads from ``connection`` now (cut at once if the caller gave up)."""
        with self._lock:
            self._connection, self._socket = connection, connection.sock
            if self._cut:
                _shut_down(self._socket)

    def let_go(self, connection: urllib3.connection.HTTPConnection | None) -> None:
        """``connection`` goes back to the pool: no longer this request's to cut."""
        with self._lock:
            if connection is self._connection:
                self._connection = self._socket = None

    def cut(self) -> None:
        """Shut the request's socket down; one it takes later is shut as it reads."""
        with self._lock:
            self._cut = True
            _shut_down(self._socket)

    def close(
        self, connection: urllib3.connection.HTTPConnection, close: t.Callable[[], None]
    ) -> None:
        """Close ``connection`` (the sending thread's own close), out of a cut's way."""
        with self._lock:
            if connection is self._connection:
                self._connection = None  # its socket stays cuttable while a response reads it
            close()


def _shut_down(sock: socket.socket | None) -> None:
    if isinstance(sock, socket.socket):  # not, e.g., pyOpenSSL's wrapper: left to its timeout
        with contextlib.suppress(OSError):  # socket's own: SSLSocket.shutdown drops its TLS state
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


_SENDING = threading.local()  # .request: the InFlight of the request this thread sends


@contextlib.contextmanager
def sending(request: InFlight) -> t.Iterator[None]:
    """Tie the connections this thread takes from a ``PageTransport`` pool to ``request``."""
    _SENDING.request = request
    try:
        yield
    finally:
        _SENDING.request = None


def _held(connection: urllib3.connection.HTTPConnection) -> None:
    request: InFlight | None = getattr(_SENDING, "request", None)
    if request is not None:
        request.hold(connection)


def _closed(connection: urllib3.connection.HTTPConnection, close: t.Callable[[], None]) -> None:
    request: InFlight | None = getattr(_SENDING, "request", None)
    if request is None:
        close()
    else:
        request.close(connection, close)


# urllib3 puts a pool's and a connection's class name in its messages: the same names
# keep every message as requests users know it.


class _Held:
    """A connection held by the sending thread's ``InFlight`` while it waits for the response."""

    def getresponse(self, *args: t.Any, **kwargs: t.Any) -> t.Any:  # noqa: ANN401 - urllib3's
        """Note the connection as the request's (connected, request sent), then read."""
        _held(t.cast("urllib3.connection.HTTPConnection", self))  # the unbounded waits follow
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]

    def close(self) -> None:
        """Close, out of the way of a cut (``InFlight.close``)."""
        _closed(t.cast("urllib3.connection.HTTPConnection", self), super().close)  # type: ignore[misc]


class HTTPConnection(_Held, urllib3.connection.HTTPConnection):
    """urllib3's, whose waits for a response a caller can cut."""


class HTTPSConnection(_Held, urllib3.connection.HTTPSConnection):
    """urllib3's, whose waits for a response a caller can cut."""


class _LetGo:
    def _put_conn(self, conn: t.Any) -> None:  # noqa: ANN401 - urllib3's BaseHTTPConnection | None
        request: InFlight | None = getattr(_SENDING, "request", None)
        if request is not None:
            request.let_go(conn)
        super()._put_conn(conn)  # type: ignore[misc]


class HTTPConnectionPool(_LetGo, urllib3.connectionpool.HTTPConnectionPool):
    """urllib3's, whose connections a caller can cut (``InFlight``)."""

    ConnectionCls = HTTPConnection


class HTTPSConnectionPool(_LetGo, urllib3.connectionpool.HTTPSConnectionPool):
    """urllib3's, whose connections a caller can cut (``InFlight``)."""

    ConnectionCls = HTTPSConnection


POOLS = {"http": HTTPConnectionPool, "https": HTTPSConnectionPool}
_URLLIB3_LOG = logging.getLogger("urllib3.connectionpool")


class CuttableAdapter(HTTPAdapter):
    """requests' adapter with these pools, so a request sent through a proxy can be cut too.

    Not through a SOCKS proxy: its pools are urllib3's own (the request then ends
    at its socket timeout, as before).
    """

    def init_poolmanager(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Requests' pool manager, making pools of this module's kind."""
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: t.Any) -> t.Any:  # noqa: ANN401
        """Requests' proxy manager, making pools of this module's kind unless it is SOCKS."""
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = POOLS
        return manager


def as_requests_error(exc: Exception) -> Exception:  # noqa: PLR0911 - one per case of requests
    """The exception requests' ``HTTPAdapter.send`` raises for this urllib3 one from ``urlopen``.

    The same types, wrapping the same urllib3 exceptions, so the retry loop and
    every message read them as before. Proxy and retry-count branches are left
    out: a proxied request goes through the session, and no status is retried.
    """
    if isinstance(exc, (ProtocolError, OSError, ClosedPoolError)):
        return requests.exceptions.ConnectionError(exc)
    if isinstance(exc, MaxRetryError):
        reason = exc.reason
        if isinstance(reason, ConnectTimeoutError) and not isinstance(reason, NewConnectionError):
            return requests.exceptions.ConnectTimeout(exc)
        if isinstance(reason, urllib3.exceptions.SSLError):
            return requests.exceptions.SSLError(exc)
        return requests.exceptions.ConnectionError(exc)
    if isinstance(exc, urllib3.exceptions.SSLError):
        return requests.exceptions.SSLError(exc)
    if isinstance(exc, ReadTimeoutError):
        return requests.exceptions.ReadTimeout(exc)
    if isinstance(exc, urllib3.exceptions.InvalidHeader):
        return requests.exceptions.InvalidHeader(exc)
    return exc


class PageTransport:
    """GETs of one URL with varying query parameters, as ``session`` would send them.

    Per request it skips what requests redoes each time and this tap does not
    need: URL parsing, environment look-ups, hooks, cookie jars (no cookie is
    kept or sent) and a ``requests.Response``. The response is urllib3's,
    unread and undecoded (``read_body`` inflates it with its own bounds).
    """

    def __init__(self, session: requests.Session, url: str, pool_size: int) -> None:
        """Resolve, once, what ``session`` would for ``url``; pool up to ``pool_size`` connections.

        With a proxy for ``url``, no pool is made: ``get`` uses the session.
        """
        self.session = session
        prepared = requests.Request("GET", url).prepare()  # requests' own URL normalising
        self.url = t.cast("str", prepared.url)
        parts = urlsplit(self.url)
        self.path = parts.path  # the path only, for messages: never the query string
        self._target, self._query = parts.path or "/", parts.query
        self._session_headers = CaseInsensitiveDict(t.cast("Mapping[str, str]", session.headers))
        # The last request headers given and what is sent for them: merged, checked.
        self._sent: tuple[tuple[tuple[str, str], ...], Mapping[str, str]] = ((), {})
        self._retries = Retry(0, read=False)  # what HTTPAdapter passes: no retries at all
        self._refusal: str | None = None
        self.proxy: str | None = None
        if session.trust_env:
            proxies = {**session.proxies, **get_environ_proxies(self.url)}
            self.proxy = select_proxy(self.url, proxies)
        self._pool: urllib3.connectionpool.HTTPConnectionPool | None = None
        if self.proxy is not None:
            return
        tls: dict[str, t.Any] = {}
        if parts.scheme == "https":
            bundle = DEFAULT_CA_BUNDLE_PATH  # certifi's, as requests' adapter uses
            if session.trust_env:
                env = os.environ
                bundle = env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or bundle
            if not Path(bundle).exists():
                # requests' words, raised by each request as requests would.
                self._refusal = (
                    f"Could not find a suitable TLS CA certificate bundle, invalid path: {bundle}"
                )
            key = "ca_cert_dir" if Path(bundle).is_dir() else "ca_certs"
            tls = {"cert_reqs": "CERT_REQUIRED", key: bundle}
        # As urllib3's connection_from_url, with connections a caller can cut (InFlight).
        target = parse_url(self.url)
        scheme = target.scheme or "http"
        port = target.port or port_by_scheme.get(scheme, 80)
        pool = HTTPSConnectionPool if scheme == "https" else HTTPConnectionPool
        self._pool = pool(target.host or "", port=port, maxsize=pool_size, block=False, **tls)

    def get(
        self, params: Mapping[str, t.Any], headers: Mapping[str, str], timeout: float
    ) -> urllib3.BaseHTTPResponse:
        """Send the GET; return the response with its body unread.

        ``timeout`` bounds the connect and each socket read, as requests'
        ``timeout=(timeout, timeout)`` does; the whole response's deadline is
        the caller's. Redirects are not followed.

        Raises:
            requests.RequestException: What the session would raise (see ``as_requests_error``).
            OSError: If the CA bundle does not exist (requests' message).
        """
        pool = self._pool
        if pool is None:  # a proxy: the session does it all
            response = self.session.get(
                self.url,
                params=params,
                headers=headers,
                timeout=(timeout, timeout),
                allow_redirects=False,
                stream=True,
            )
            return t.cast("urllib3.BaseHTTPResponse", response.raw)
        sent = self._checked(headers)
        if self._refusal is not None:  # after the header checks, as in requests
            raise OSError(self._refusal)
        try:
            return pool.urlopen(
                "GET",
                self._target_of(params),
                headers=sent,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=False,
                retries=self._retries,
                timeout=urllib3.Timeout(connect=timeout, read=timeout),
            )
        except Exception as exc:
            mapped = as_requests_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def send_ahead(
        self, params: Mapping[str, t.Any], headers: Mapping[str, str], timeout: float
    ) -> SentRequest | None:
        """Send the GET on an idle, open pooled connection; its response is read later.

        None when there is no such connection (or a proxy, or no CA bundle): then
        ``get`` is the way, on a thread of its own, since connecting (a TLS
        handshake) would hold up the caller.

        Raises:
            requests.exceptions.InvalidHeader: As ``get``.
        """
        pool = self._pool
        if pool is None or self._refusal is not None:
            return None
        sent = self._checked(headers)
        # An idle connection from urllib3's queue, as _get_conn takes it, but without
        # making one: a new connection is made where it cannot hold up the reader.
        try:
            conn = pool.pool.get(block=False) if pool.pool is not None else None
        except queue.Empty:
            return None
        if conn is None or is_connection_dropped(conn):  # never opened, closed, or dropped
            pool._put_conn(conn)  # noqa: SLF001 - back, for _get_conn to renew
            return None
        conn = t.cast("urllib3.connection.HTTPConnection", conn)
        target = self._target_of(params)
        return SentRequest(pool, conn, target, sent, timeout=timeout, retries=self._retries)

    def _checked(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The headers sent for ``headers``: the session's, then these; checked as requests does."""
        given, sent = self._sent
        if tuple(headers.items()) != given:  # the first request (the tap's headers never vary)
            merged = self._session_headers.copy()  # the session's, then the request's
            merged.update(headers)
            for header in merged.items():
                check_header_validity(header)  # InvalidHeader, as requests raises it
            given, sent = tuple(headers.items()), merged
            self._sent = given, sent
        return sent

    def _target_of(self, params: Mapping[str, t.Any]) -> str:
        query = encode_params(params)
        if self._query:
            query = f"{self._query}&{query}" if query else self._query
        return f"{self._target}?{query}" if query else self._target


class SentRequest:
    """A GET sent on a pooled connection, whose response the caller reads when it wants it.

    ``response`` does what the rest of urllib3's ``urlopen`` would have done
    (``_make_request`` after the send, the error mapping with no retries), then
    requests' adapter: the same exceptions as ``PageTransport.get``.
    """

    def __init__(  # noqa: PLR0913 - what urlopen would be given
        self,
        pool: urllib3.connectionpool.HTTPConnectionPool,
        conn: urllib3.connection.HTTPConnection,
        target: str,
        headers: Mapping[str, str],
        *,
        timeout: float,
        retries: Retry,
    ) -> None:
        """Send the request on ``conn`` now; a failure to send is raised by ``response``."""
        self._pool, self._conn, self._target, self._timeout = pool, conn, target, timeout
        self._retries = retries
        self._error: BaseException | None = None
        self.sent_at = time.monotonic()
        pool.num_requests += 1
        conn.timeout = timeout
        try:
            conn.request(
                "GET",
                target,
                headers=headers,
                preload_content=False,
                decode_content=False,
            )
        except BrokenPipeError:
            pass  # as urllib3: the server may have answered before closing; read it
        except OSError as exc:
            if exc.errno not in {errno.EPROTOTYPE, errno.ECONNRESET}:
                self._error = exc
        except Exception as exc:  # noqa: BLE001 - raised by response(), as urlopen would
            self._error = exc

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the response to start; True once it has or failed."""
        sock = self._conn.sock
        if self._error is not None or sock is None:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        return wait_for_read(sock, timeout=timeout)

    def response(self) -> urllib3.BaseHTTPResponse:
        """Read the status line and headers; the body is left unread.

        Raises:
            requests.RequestException: What ``PageTransport.get`` would raise.
        """
        pool, conn = self._pool, self._conn
        try:
            response = self._status_and_headers()
        except (
            urllib3.exceptions.TimeoutError,
            HTTPException,
            OSError,
            ProtocolError,
            BaseSSLError,
            SSLError,
            CertificateError,
        ) as exc:
            self.drop()  # its place, for a new connection
            error: Exception = exc
            if isinstance(exc, (BaseSSLError, CertificateError)):
                error = SSLError(exc)
            elif isinstance(exc, (OSError, HTTPException)):
                error = ProtocolError("Connection aborted.", exc)
            try:
                self._retries.increment("GET", self._target, error=error, _pool=pool)
            except Exception as raised:
                mapped = as_requests_error(raised)
                if mapped is raised:
                    raise
                raise mapped from raised
            raise  # pragma: no cover - increment always raises: no retries are left
        except BaseException:
            self.drop()  # as urlopen, whatever else fails: the connection's state is unknown
            raise
        response._connection = conn  # noqa: SLF001 - as urlopen sets them, for release_conn
        response._pool = pool  # noqa: SLF001
        _URLLIB3_LOG.debug(  # the line urlopen logs for each response
            '%s://%s:%s "%s %s %s" %s %s',
            pool.scheme,
            pool.host,
            pool.port,
            "GET",
            self._target,
            response.version_string,
            response.status,
            response.length_remaining,
        )
        return response

    def _status_and_headers(self) -> urllib3.HTTPResponse:
        """The part of urllib3's ``_make_request`` after the send."""
        if self._error is not None:
            raise self._error
        try:
            return self._conn.getresponse()
        except (BaseSSLError, OSError) as exc:
            self._pool._raise_timeout(err=exc, url=self._target, timeout_value=self._timeout)  # noqa: SLF001
            raise

    def drop(self) -> None:
        """Close the connection (its response unread, or broken); give its place to the pool."""
        self._conn.close()
        self._pool._put_conn(None)  # noqa: SLF001


def encode_params(params: Mapping[str, t.Any]) -> str:
    """The query string requests makes of ``params``: None values dropped, lists repeated."""
    return urlencode(
        [
            (key, value)
            for key, values in params.items()
            for value in (values if isinstance(values, (list, tuple)) else (values,))
            if value is not None
        ]
    )
