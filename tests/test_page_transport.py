"""PageTransport sends the request requests would send and fails the way requests would.

Each comparison runs the same request both ways: through the stream's
``PageTransport`` (urllib3 directly) and through the stream's own
``requests.Session``, as every page request was sent before.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import threading
import time
import typing as t
from concurrent.futures import Future

import pytest
import requests
import urllib3
from helpers import config_for, raw_id, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from invoca_server import Faults
from test_failures import assert_clean_failure
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    DecodeError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from tap_invoca_destinations.client import (
    InvocaStream,
    Reply,
    RetriableReply,
    SentPage,
    transport_reason,
)
from tap_invoca_destinations.paging import AdaptiveWindow, Request
from tap_invoca_destinations.tap import TapInvocaDestinations
from tap_invoca_destinations.transport import InFlight, encode_params, sending

if t.TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from invoca_server import InvocaServer

    from tap_invoca_destinations.transport import SentRequest

PROXY_VARIABLES = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"]
CA_VARIABLES = ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"]
INVOCA = "https://mynetwork.invoca.net"  # never contacted: only the proxy choice is checked
PROXY = "http://127.0.0.1:3128"
SOCKS = "socks5://127.0.0.1:1080"


def stream_for(base_url: str, **settings_: t.Any) -> InvocaStream:
    config = {"api_token": "tok-3f9", "network_id": "1234", "base_url": base_url, **settings_}
    return t.cast("InvocaStream", TapInvocaDestinations(config=config).streams["destinations"])


def params_of(stream: InvocaStream) -> dict[str, t.Any]:
    return {**stream.filter_params(), "limit": 101, "start": 99}


def via_session(
    stream: InvocaStream, params: dict[str, t.Any], timeout: float
) -> urllib3.BaseHTTPResponse:
    """The request as the tap sent every page before PageTransport."""
    response = stream.http_session.get(
        stream.get_url(None),
        params=params,
        headers=stream.http_headers,
        timeout=(timeout, timeout),
        allow_redirects=False,
        stream=True,
    )
    return t.cast("urllib3.BaseHTTPResponse", response.raw)


def both_ways(stream: InvocaStream, timeout: float = 5) -> tuple[BaseException, BaseException]:
    """The exception of the same GET sent through the session, then through PageTransport."""
    params = params_of(stream)
    caught: list[BaseException] = []
    for send in (via_session, lambda s, p, to: s.page_transport.get(p, s.http_headers, to)):
        with pytest.raises(Exception) as info:  # noqa: PT011 - compared below
            send(stream, params, timeout)
        caught.append(info.value)
    return caught[0], caught[1]


def same_words(text: str) -> str:
    """``text`` without object addresses, which differ between two runs of one failure."""
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def assert_same_failure(old: BaseException, new: BaseException) -> None:
    assert type(new) is type(old), (old, new)
    assert same_words(str(new)) == same_words(str(old))
    assert same_words(transport_reason(new)) == same_words(transport_reason(old))


@pytest.fixture(autouse=True)
def _no_proxy_or_bundle_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES + CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


class RawServer:
    """A loopback server that runs ``answer`` on each connection, keeping what it read."""

    def __init__(self, answer: Callable[[socket.socket, bytes], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.heads: list[bytes] = []
        self.answer = answer
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                head += chunk
            self.heads.append(head)
            self.answer(conn, head)

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(answer: Callable[[socket.socket, bytes], None]) -> RawServer:
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def answer_ok(conn: socket.socket, _: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    conn.close()


# --- the same request ------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings_",
    [{}, {"status": "tracked", "query": "+1 (555) 010-ünï&x=y/z~", "include_inactive": False}],
)
def test_the_request_is_the_one_the_session_sends(
    raw_server: Callable[..., RawServer], settings_: dict[str, t.Any]
) -> None:
    server = raw_server(answer_ok)
    stream = stream_for(server.url, user_agent="agent/1 (test)", **settings_)
    params = params_of(stream)
    assert via_session(stream, params, 5).read() == b"{}"
    assert stream.page_transport.get(params, stream.http_headers, 5).read() == b"{}"
    old, new = server.heads
    assert new == old  # the request line (path and query) and every header, in order
    assert b"Authorization: tok-3f9\r\n" in new


def test_headers_that_change_are_sent_as_changed(raw_server: Callable[..., RawServer]) -> None:
    server = raw_server(answer_ok)
    stream = stream_for(server.url)
    params = params_of(stream)
    for agent in ("first/1", "second/2", "first/1"):
        headers = {**stream.http_headers, "User-Agent": agent}
        stream.page_transport.get(params, headers, 5).read()
    agents = [re.findall(rb"User-Agent: ([^\r]*)", head) for head in server.heads]
    assert agents == [[b"first/1"], [b"second/2"], [b"first/1"]]


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=6),
        st.none()
        | st.integers()
        | st.booleans()
        | st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
        | st.lists(st.none() | st.integers() | st.text(max_size=3), max_size=3),
        max_size=5,
    )
)
def test_query_parameters_are_encoded_as_requests_encodes_them(params: dict[str, t.Any]) -> None:
    prepared = requests.Request("GET", "http://127.0.0.1/p.json", params=params).prepare()
    expected = t.cast("str", prepared.url).partition("?")[2]
    assert encode_params(params) == expected


# --- the same failures --------------------------------------------------------------------


def test_a_refused_connection_fails_as_with_requests() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    old, new = both_ways(stream_for(f"http://127.0.0.1:{port}"))
    assert isinstance(new, requests.exceptions.ConnectionError)
    assert_same_failure(old, new)


def test_headers_that_never_come_time_out_as_with_requests(
    raw_server: Callable[..., RawServer],
) -> None:
    stop = threading.Event()
    server = raw_server(lambda _conn, _head: stop.wait(10))
    try:
        old, new = both_ways(stream_for(server.url), timeout=0.3)
    finally:
        stop.set()
    assert isinstance(new, requests.exceptions.ReadTimeout)
    assert_same_failure(old, new)


def test_a_connection_dropped_before_the_status_fails_as_with_requests(
    raw_server: Callable[..., RawServer],
) -> None:
    server = raw_server(lambda conn, _head: conn.close())
    old, new = both_ways(stream_for(server.url))
    assert isinstance(new, requests.exceptions.ConnectionError)
    assert_same_failure(old, new)


def test_tls_to_a_plain_http_server_fails_as_with_requests(server: InvocaServer) -> None:
    old, new = both_ways(stream_for(server.url.replace("http://", "https://")))
    assert isinstance(new, requests.exceptions.SSLError)
    assert_same_failure(old, new)


def test_an_untrusted_certificate_fails_as_with_requests(tls_server: InvocaServer) -> None:
    # No REQUESTS_CA_BUNDLE: certifi's bundle, which does not hold the test's certificate.
    old, new = both_ways(stream_for(tls_server.url))
    assert isinstance(new, requests.exceptions.SSLError)
    assert "certificate verify failed" in str(new)
    assert_same_failure(old, new)


@pytest.mark.parametrize("variable", CA_VARIABLES)
def test_the_environment_s_ca_bundle_is_trusted(
    tls_server: InvocaServer,
    certificate: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, certificate[0])
    stream = stream_for(tls_server.url, api_token=tls_server.token)
    response = stream.page_transport.get(params_of(stream), stream.http_headers, 5)
    assert response.status == 200
    assert b'"data"' in response.read()


def test_a_missing_ca_bundle_fails_as_with_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent")
    old, new = both_ways(stream_for("https://127.0.0.1:9"))
    assert type(new) is OSError
    assert_same_failure(old, new)


def test_an_invalid_header_value_fails_as_with_requests() -> None:
    old, new = both_ways(stream_for("http://127.0.0.1:9", user_agent="agent\nSECRET-ish"))
    assert isinstance(new, requests.exceptions.InvalidHeader)
    assert type(new) is type(old)


def test_an_invalid_header_comes_before_a_missing_ca_bundle_as_with_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent")
    old, new = both_ways(stream_for("https://127.0.0.1:9", user_agent="agent\nSECRET-ish"))
    assert isinstance(new, requests.exceptions.InvalidHeader)
    assert type(new) is type(old)


URLOPEN_FAILURES: list[Exception] = [
    MaxRetryError(None, "/x", ConnectTimeoutError("timed out")),  # type: ignore[arg-type]
    MaxRetryError(None, "/x", NewConnectionError(None, "refused")),  # type: ignore[arg-type]
    MaxRetryError(None, "/x", urllib3.exceptions.SSLError("bad handshake")),  # type: ignore[arg-type]
    MaxRetryError(None, "/x", ProtocolError("aborted")),  # type: ignore[arg-type]
    ProtocolError("Connection aborted.", http.client.RemoteDisconnected("closed")),
    ConnectionResetError(104, "reset"),
    ClosedPoolError(None, "closed"),  # type: ignore[arg-type]
    urllib3.exceptions.SSLError("bad record mac"),
    ReadTimeoutError(None, "/x", "Read timed out. (read timeout=1)"),  # type: ignore[arg-type]
    urllib3.exceptions.InvalidHeader("bad"),
    DecodeError("passed through as it is"),
]


@pytest.mark.parametrize("failure", URLOPEN_FAILURES, ids=lambda e: type(e).__name__)
def test_every_urlopen_failure_becomes_what_requests_raises(
    monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    # requests' own HTTPAdapter is the oracle: both ways call the same failing urlopen.
    def urlopen(*_: object, **__: object) -> t.NoReturn:
        raise failure

    monkeypatch.setattr(urllib3.connectionpool.HTTPConnectionPool, "urlopen", urlopen)
    old, new = both_ways(stream_for("http://127.0.0.1:9"))
    assert type(new) is type(old)
    if old is failure:
        assert new is failure
    else:
        assert new.args[0] is old.args[0] is failure


# --- sent ahead: the request on an open connection, its response read later -------------


def keep_alive_then(
    fault: Callable[[socket.socket], None], seen: list[bytes] | None = None
) -> Callable[[socket.socket, bytes], None]:
    """Answer a connection's first request (kept alive), then meet its second with ``fault``.

    The second request's head goes to ``seen``.
    """

    def answer(conn: socket.socket, _head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        head = b""
        while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
            head += chunk
        if seen is not None:
            seen.append(head)
        fault(conn)

    return answer


def sent_ahead(
    stream: InvocaStream, params: dict[str, t.Any], timeout: float
) -> urllib3.BaseHTTPResponse:
    """The request sent ahead on the connection a first request left open, then its response."""
    transport = stream.page_transport
    assert transport.get(params, stream.http_headers, timeout).read() == b"{}"
    sent = transport.send_ahead(params, stream.http_headers, timeout)
    assert sent is not None
    return sent.response()


def both_ways_on_an_open_connection(
    stream: InvocaStream, timeout: float = 5
) -> tuple[BaseException, BaseException]:
    """The exception of a second GET on a kept-alive connection: the session's, then sent ahead."""
    params = params_of(stream)
    assert via_session(stream, params, timeout).read() == b"{}"
    with pytest.raises(Exception) as old:  # noqa: PT011 - compared by the caller
        via_session(stream, params, timeout)
    with pytest.raises(Exception) as new:  # noqa: PT011
        sent_ahead(stream, params, timeout)
    return old.value, new.value


def test_a_request_sent_ahead_is_the_one_the_session_sends(
    raw_server: Callable[..., RawServer],
) -> None:
    seconds: list[bytes] = []  # each connection's second request

    def answer_again(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")

    server = raw_server(keep_alive_then(answer_again, seconds))
    stream = stream_for(server.url, user_agent="agent/1 (test)", status="tracked", query="+1 ü&x")
    params = params_of(stream)
    assert sent_ahead(stream, params, 5).read() == b"[]"  # a get, then one sent ahead
    assert via_session(stream, params, 5).read() == b"{}"
    assert via_session(stream, params, 5).read() == b"[]"  # the session's second request
    assert len(server.connections) == 2  # each second request went on its first's connection
    ahead, session = seconds
    assert ahead == session  # the request line (path and query) and every header, in order
    assert b"Authorization: tok-3f9\r\n" in ahead
    assert b"start=99" in ahead


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (lambda conn: conn.close(), requests.exceptions.ConnectionError),
        (lambda conn: conn.sendall(b"NOT HTTP\r\n\r\n"), requests.exceptions.ConnectionError),
        (lambda _conn: time.sleep(2), requests.exceptions.ReadTimeout),
    ],
    ids=["dropped", "garbage", "silent"],
)
def test_a_response_sent_ahead_fails_as_with_requests(
    raw_server: Callable[..., RawServer],
    fault: Callable[[socket.socket], None],
    expected: type[Exception],
) -> None:
    server = raw_server(keep_alive_then(fault))
    old, new = both_ways_on_an_open_connection(stream_for(server.url), timeout=0.5)
    assert isinstance(new, expected)
    assert_same_failure(old, new)


def test_nothing_is_sent_ahead_without_an_idle_open_connection(
    raw_server: Callable[..., RawServer],
) -> None:
    server = raw_server(answer_ok)  # Connection: close, then closes
    stream = stream_for(server.url)
    transport, params = stream.page_transport, params_of(stream)
    assert transport.send_ahead(params, stream.http_headers, 5) is None  # none opened yet
    assert transport.get(params, stream.http_headers, 5).read() == b"{}"
    assert transport.send_ahead(params, stream.http_headers, 5) is None  # closed with its answer
    assert len(server.heads) == 1  # neither sent a request
    assert transport.get(params, stream.http_headers, 5).read() == b"{}"  # the pool still works


def test_nothing_is_sent_ahead_on_a_connection_the_server_dropped_while_idle(
    raw_server: Callable[..., RawServer],
) -> None:
    seconds: list[bytes] = []
    server = raw_server(keep_alive_then(lambda conn: conn.close(), seconds))
    stream = stream_for(server.url)
    transport, params = stream.page_transport, params_of(stream)
    assert transport.get(params, stream.http_headers, 5).read() == b"{}"  # kept alive
    server.connections[0].shutdown(socket.SHUT_RDWR)  # the server drops it while it is idle
    time.sleep(0.1)
    assert transport.send_ahead(params, stream.http_headers, 5) is None
    assert seconds == [b""]  # the dropped connection never carried a second request
    assert transport.get(params, stream.http_headers, 5).read() == b"{}"  # on a new connection
    assert len(server.connections) == 2


def test_nothing_is_sent_ahead_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", PROXY)
    stream = stream_for(INVOCA)
    assert stream.page_transport.send_ahead(params_of(stream), stream.http_headers, 5) is None


def test_a_sync_reads_its_pages_sent_ahead_on_its_own_thread(
    make_server: Callable[..., InvocaServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server(3000, faults=Faults(fail_every=7, fail_status=503))
    stream = stream_for(
        server.url, api_token=server.token, network_id=server.network_id, retry_initial_wait=0.01
    )
    read_on: list[threading.Thread] = []
    handed_over: list[tuple[Exception, int]] = []
    read_sent, fetch_page = InvocaStream.read_sent, InvocaStream.fetch_page

    def spy_read(self: InvocaStream, *args: t.Any) -> Reply:
        read_on.append(threading.current_thread())
        return read_sent(self, *args)

    def spy_fetch(
        self: InvocaStream,
        request: Request,
        cancel: threading.Event,
        failed: tuple[Exception, int] | None = None,
    ) -> Reply:
        if failed is not None:
            handed_over.append(failed)
        return fetch_page(self, request, cancel, failed)

    monkeypatch.setattr(InvocaStream, "read_sent", spy_read)
    monkeypatch.setattr(InvocaStream, "fetch_page", spy_fetch)
    pages = stream.iter_pages()
    ids = [raw_id(r) for page in pages for r in page]
    assert ids == server.ids()
    # Most requests were read on this thread: not the first few (no connection open
    # yet), the retries, nor those made while no open connection was idle.
    assert len(read_on) >= server.stats.requests // 2, (len(read_on), server.stats.requests)
    assert set(read_on) == {threading.current_thread()}
    # A 503 met by a request sent ahead goes on to fetch_page's retries, with its ticket.
    assert handed_over
    assert all(isinstance(exc, RetriableReply) for exc, _ in handed_over)


def test_a_response_sent_ahead_that_fails_oddly_closes_its_connection(
    raw_server: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = raw_server(keep_alive_then(lambda conn: conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")))
    stream = stream_for(server.url)
    transport, params = stream.page_transport, params_of(stream)
    assert transport.get(params, stream.http_headers, 5).read() == b"{}"
    sent = transport.send_ahead(params, stream.http_headers, 5)
    assert sent is not None
    conn = sent._conn  # noqa: SLF001 - the connection whose fate is checked

    def odd(*_: object) -> t.NoReturn:
        raise KeyboardInterrupt  # not an HTTP failure: e.g. a stop signal

    monkeypatch.setattr(conn, "getresponse", odd)
    with pytest.raises(KeyboardInterrupt):
        sent.response()
    assert conn.sock is None  # closed, as urlopen closes it whatever fails
    assert transport.get(params, stream.http_headers, 5).read() == b"{}"  # the pool is whole


class FakeSentRequest:
    """A SentRequest whose response has started (or not) as the test says."""

    def __init__(self) -> None:
        self.answered = False
        self.sent_at = time.monotonic()
        self.dropped = 0

    def ready(self, timeout: float) -> bool:
        if not self.answered:
            time.sleep(timeout)
        return self.answered

    def drop(self) -> None:
        self.dropped += 1


class FakeStream:
    """What a SentPage asks of its stream: the timeout, the read, the retries."""

    timeout = 0.3

    def __init__(self, failure: Exception | None) -> None:
        self.failure = failure
        self.deadlines: list[float] = []
        self.retried: list[tuple[Exception, int] | None] = []

    def read_sent(self, _sent: object, _records: int, deadline: float) -> Reply:
        self.deadlines.append(deadline)
        if self.failure is not None:
            raise self.failure
        return Reply(200, "OK", "/p", {}, b"{}", 0.01, ())

    def fetch_page(
        self, _request: object, _cancel: object, failed: tuple[Exception, int] | None = None
    ) -> Reply:
        self.retried.append(failed)
        return Reply(200, "OK", "/p", {}, b"[]", 0.01, ())


def sent_page(stream: FakeStream) -> tuple[SentPage, FakeSentRequest, AdaptiveWindow]:
    window = AdaptiveWindow(1, 1)
    ticket = window.take()
    assert ticket is not None
    sent = FakeSentRequest()
    page = SentPage(
        t.cast("InvocaStream", stream),
        Request(0, 10),
        threading.Event(),
        t.cast("SentRequest", sent),
        window=window,
        ticket=ticket,
    )
    return page, sent, window


def test_a_page_sent_ahead_holds_its_place_until_its_answer_starts_or_its_time_is_up() -> None:
    page, sent, window = sent_page(FakeStream(None))
    page.look()
    assert window.on_the_wire == 1  # not answered yet
    sent.answered = True
    page.look()
    assert window.on_the_wire == 0
    page.look()
    page.drop()
    assert window.on_the_wire == 0  # given back once
    assert sent.dropped == 1

    page, sent, window = sent_page(FakeStream(None))
    time.sleep(FakeStream.timeout + 0.05)
    page.look()
    assert window.on_the_wire == 0  # never answered, but its timeout has passed


def test_the_timeout_of_a_page_sent_ahead_counts_from_the_first_wait() -> None:
    stream = FakeStream(None)
    page, _, window = sent_page(stream)
    time.sleep(FakeStream.timeout + 0.05)  # sent a timeout ago: it waited for the reader
    began = time.monotonic()
    assert not page.ready(0.05)
    assert window.on_the_wire == 1
    assert page.ready(5)  # unanswered, but the deadline came: read it (and time out)
    assert FakeStream.timeout <= time.monotonic() - began < FakeStream.timeout + 1
    assert window.on_the_wire == 0
    result: Future[Reply] = Future()
    page.read(result)
    assert result.result().body == b"{}"
    assert stream.deadlines == [pytest.approx(began + FakeStream.timeout, abs=0.05)]


def test_a_page_sent_ahead_that_fails_goes_on_to_fetch_page_with_its_ticket() -> None:
    failure = requests.exceptions.ConnectionError("dropped")
    stream = FakeStream(failure)
    page, _, window = sent_page(stream)
    result: Future[Reply] = Future()
    page.read(result)
    assert result.result(timeout=5).body == b"[]"  # from the retries, on a daemon thread
    assert stream.retried == [(failure, 0)]
    assert window.on_the_wire == 0

    fatal = ValueError("not for retrying")
    page, _, window = sent_page(FakeStream(fatal))
    result = Future()
    page.read(result)
    assert result.exception(timeout=5) is fatal
    assert window.on_the_wire == 0


# --- proxies: resolved once; a proxy means the session sends ----------------------------


@pytest.mark.parametrize(
    ("base_url", "env", "proxy"),
    [
        (INVOCA, {"HTTPS_PROXY": PROXY}, PROXY),
        (INVOCA, {"ALL_PROXY": SOCKS}, SOCKS),
        (INVOCA, {"HTTP_PROXY": PROXY}, None),  # for http:// URLs only
        (INVOCA, {"HTTPS_PROXY": PROXY, "NO_PROXY": "invoca.net"}, None),
        ("http://127.0.0.1:9", {"HTTP_PROXY": PROXY, "ALL_PROXY": PROXY}, None),  # trust_env off
    ],
)  # fmt: skip
def test_the_proxy_is_the_one_requests_would_use(
    monkeypatch: pytest.MonkeyPatch, base_url: str, env: dict[str, str], proxy: str | None
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stream = stream_for(base_url)
    session = stream.http_session
    url = stream.get_url(None)
    environment = session.merge_environment_settings(url, {}, None, None, None)["proxies"]
    assert requests.utils.select_proxy(url, environment) == proxy
    assert stream.page_transport.proxy == proxy


class ConnectProxy(RawServer):
    """A loopback HTTP proxy that only tunnels (CONNECT), keeping each tunnel's target."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        super().__init__(self._tunnel)

    def _tunnel(self, client: socket.socket, head: bytes) -> None:
        # The client waits for the 200 before it sends a byte more: head is all it sent.
        with client:
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
            if method != b"CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            host, port = target.decode().rsplit(":", 1)
            self.tunnels.append(target.decode())
            with socket.create_connection((host, int(port)), timeout=30) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
                back.start()
                pump(client, upstream)
                back.join(30)


def pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def proxy_env(proxy: str, **extra: str) -> dict[str, str]:
    env = {"NO_PROXY": "", "no_proxy": "", **extra}
    for name in ("HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = proxy
    return env


def test_a_sync_through_an_https_proxy_reads_every_record(
    tmp_path: Path, tls_server: InvocaServer, certificate: tuple[str, str]
) -> None:
    proxy = ConnectProxy()
    try:
        env = proxy_env(proxy.url, REQUESTS_CA_BUNDLE=certificate[0])
        run = run_cli(tmp_path, config_for(tls_server, page_size=25), env=env)
    finally:
        proxy.close()
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == tls_server.ids()
    target = tls_server.url.removeprefix("https://")
    assert proxy.tunnels
    assert set(proxy.tunnels) == {target}


def test_a_socks_proxy_is_left_to_requests(tmp_path: Path) -> None:
    # Without PySocks, requests refuses SOCKS before connecting: one line, as before.
    config = {"api_token": "tok", "network_id": "1", "base_url": "https://127.0.0.1:9"}
    run = run_cli(tmp_path, config, env=proxy_env("socks5://127.0.0.1:9"))
    assert_clean_failure(run, "cannot send GET", "SOCKS")


def test_a_cut_after_the_response_spares_the_connection_back_in_the_pool(
    server: InvocaServer,
) -> None:
    # The connection went back to the pool with the whole body: cutting the request
    # late (its caller's deadline passing just then) must not cut the next request.
    stream = stream_for(server.url, api_token=server.token)
    transport = stream.page_transport
    first = InFlight()
    with sending(first):
        response = transport.get(params_of(stream), stream.http_headers, 5)
        assert b'"data"' in response.read()
    first.cut()
    with sending(InFlight()):
        again = transport.get(params_of(stream), stream.http_headers, 5)
        assert b'"data"' in again.read()
    assert server.stats.connections == 1  # the same connection, reused whole


def test_a_cut_ends_a_read_waiting_for_headers(raw_server: Callable[..., RawServer]) -> None:
    stop = threading.Event()
    server = raw_server(lambda _conn, _head: stop.wait(10))  # never answers
    stream = stream_for(server.url)
    request = InFlight()

    def send() -> None:
        with sending(request), contextlib.suppress(requests.RequestException):
            stream.page_transport.get(params_of(stream), stream.http_headers, 30)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        while not server.heads:  # the request is on the wire
            time.sleep(0.01)
        time.sleep(0.1)
        began = time.monotonic()
        request.cut()
        sender.join(5)
        assert not sender.is_alive()
        assert time.monotonic() - began < 2  # not the 30 s read timeout
    finally:
        stop.set()
