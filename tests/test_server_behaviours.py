"""Server behaviours over real loopback HTTP: odd envelopes, hostile paging, slow bodies, TLS.

Each test reproduces one way a server (or a proxy in front of it) can mislead a
naive tap, and checks the tap either reads the whole list exactly once or ends
with one clear line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import signal
import socket
import threading
import time
import typing as t

import pytest
from helpers import TapRun, config_for, raw_id, run_cli, run_in_process
from invoca_server import Faults, InvocaServer
from test_failures import assert_clean_failure

from tap_invoca_destinations import client
from tap_invoca_destinations.client import InvocaError, InvocaStream, Reply, decode_page
from tap_invoca_destinations.tap import TapInvocaDestinations

if t.TYPE_CHECKING:
    from pathlib import Path

    from frontends import Frontend

Factory = t.Callable[..., InvocaServer]


def ids_of(run: TapRun) -> list[int]:
    return [r["id"] for r in run.records]


def list_starts(server: InvocaServer) -> list[int]:
    return [int(p.rsplit("start=", 1)[1]) for p in server.stats.paths if "start=" in p]


# --- the end of the list comes from the pages, not from recordsTotal ----------------


@pytest.mark.parametrize(
    ("form", "value"),
    [("absent", 0), ("null", 0), ("string", 0), ("float", 0), ("fixed", 100), ("page_len", 0),
     ("fixed", 0), ("fixed", 500)],
)  # fmt: skip
@pytest.mark.parametrize("concurrency", [1, 4])
def test_every_record_whatever_records_total_says(
    make_server: Factory, form: str, value: int, concurrency: int
) -> None:
    server = make_server(500, faults=Faults(total_form=form, total_value=value))
    run = run_in_process(config_for(server, max_concurrency=concurrency))
    assert ids_of(run) == server.ids()


def test_missing_total_exits_zero_with_all_records_from_the_cli(
    tmp_path: Path, make_server: Factory, frontend: Frontend
) -> None:
    server = make_server(500, faults=Faults(total_form="absent"))
    run = frontend.run(tmp_path, config_for(server))
    assert run.returncode == 0, run.stderr
    assert ids_of(run) == server.ids()


def test_an_exact_total_costs_one_confirming_request_and_none_past_it(
    make_server: Factory,
) -> None:
    # The last page (399: 51 records) is short; the page at its last record,
    # holding that record alone, proves the end. Nothing is asked past it.
    server = make_server(450)
    run_in_process(config_for(server, max_concurrency=4))
    assert sorted(list_starts(server)) == [0, 99, 199, 299, 399, 449]


@pytest.mark.parametrize("count", [150, 500])
@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_server_ignoring_start_is_named(
    tmp_path: Path, make_server: Factory, frontend: Frontend, count: int, concurrency: int
) -> None:
    server = make_server(count, faults=Faults(ignore_start=True))
    run = frontend.run(tmp_path, config_for(server, max_concurrency=concurrency))
    assert_clean_failure(run, "start=99", "the server ignores 'start'")
    assert run.stdout.count('"type":"RECORD"') + run.stdout.count('"type": "RECORD"') <= 100


def test_one_record_per_page_is_named(
    tmp_path: Path, make_server: Factory, frontend: Frontend
) -> None:
    server = make_server(50, faults=Faults(page_cap=1))
    run = frontend.run(tmp_path, config_for(server))
    assert_clean_failure(run, "one record per page")
    assert "ignores 'start'" not in run.stderr


def test_a_one_record_list_is_read(make_server: Factory) -> None:
    server = make_server(1)
    assert ids_of(run_in_process(config_for(server))) == server.ids()


@pytest.mark.parametrize("serve", [150, 37, 2])
@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_server_ignoring_limit_is_read_exactly_once(
    make_server: Factory, serve: int, concurrency: int
) -> None:
    server = make_server(400, faults=Faults(ignore_limit=serve, total_form="page_len"))
    run = run_in_process(config_for(server, max_concurrency=concurrency))
    assert ids_of(run) == server.ids()


@pytest.mark.parametrize(("bad", "needle"), [("duplicate", "twice"), ("unsorted", "before id")])
def test_duplicate_or_unsorted_ids_end_clearly(
    tmp_path: Path, make_server: Factory, frontend: Frontend, bad: str, needle: str
) -> None:
    server = make_server(300, faults=Faults(bad_ids=bad, bad_ids_page=2))
    run = frontend.run(tmp_path, config_for(server, max_concurrency=1))
    assert_clean_failure(run, needle, "paging would not be safe")


def test_on_list_page_hook_changes_the_list_mid_sync(make_server: Factory) -> None:
    holder: list[InvocaServer] = []

    def after_page(number: int) -> None:
        if number == 2:
            holder[0].delete(holder[0].ids()[:40])

    server = make_server(300, faults=Faults(on_list_page=after_page))
    holder.append(server)
    initial = server.ids()
    run = run_in_process(config_for(server, page_size=25))
    assert len(server.deleted_ids) == 40
    assert set(initial) - server.deleted_ids <= set(ids_of(run))
    assert ids_of(run) == sorted(set(ids_of(run)))


# --- deadlines and stopping ---------------------------------------------------------


def test_a_trickled_body_times_out_and_is_retried(
    tmp_path: Path, make_server: Factory, frontend: Frontend
) -> None:
    # Every 2nd request sends its 200 body 200 bytes every 50 ms (~6 s for a page).
    faults = Faults(trickle_every=2, trickle_bytes=200, trickle_delay=0.05)
    server = make_server(200, faults=faults)
    began = time.monotonic()
    run = frontend.run(tmp_path, config_for(server, request_timeout=1, max_concurrency=1))
    assert run.returncode == 0, run.stderr
    assert ids_of(run) == server.ids()
    assert "ReadTimeout" in run.stderr
    assert time.monotonic() - began < 20


def test_a_body_trickling_forever_is_given_up_within_the_budget(
    tmp_path: Path, make_server: Factory, frontend: Frontend
) -> None:
    faults = Faults(trickle_every=1, trickle_bytes=1, trickle_delay=0.01)
    server = make_server(100, faults=faults)
    began = time.monotonic()
    run = frontend.run(tmp_path, config_for(server, request_timeout=1, max_tries=3))
    elapsed = time.monotonic() - began
    assert_clean_failure(run, "gave up after 3 attempt(s)", "request_timeout=1")
    assert server.stats.requests == 3
    assert elapsed < 10  # 3 x 1 s, tiny waits, and the CLI's start-up


def test_a_fatal_error_does_not_wait_for_slow_requests_in_flight(
    tmp_path: Path, make_server: Factory
) -> None:
    # The second page (start=9) is refused; the pages prefetched with it take 30 s.
    # The run must end now, not when they do. Pages are chosen by offset (arrival
    # order is a race between threads); every response takes 300 ms, so the slow
    # requests are surely at the server before the second page fails.
    faults = Faults(
        bad_ids="duplicate",
        bad_ids_start=9,
        slow_starts=(19, 29),
        slow_seconds=30,
        latency_ms=300,
    )
    server = make_server(1000, faults=faults)
    began = time.monotonic()
    run = run_cli(tmp_path, config_for(server, page_size=10, max_concurrency=4))
    assert time.monotonic() - began < 10
    assert_clean_failure(run, "twice")
    assert server.stats.in_flight >= 1  # the slow request really was still running


def test_an_interrupt_while_waiting_for_a_page_returns_at_once(make_server: Factory) -> None:
    # What the replaced signal handler does: raise in the main thread, wherever it is.
    server = make_server(500, faults=Faults(slow_every=1, slow_seconds=20))
    tap = TapInvocaDestinations(config=config_for(server, max_concurrency=4))
    stream = t.cast("InvocaStream", tap.streams["destinations"])

    class Stop(BaseException):
        pass

    def raise_stop(*_: object) -> None:
        raise Stop

    previous = signal.signal(signal.SIGALRM, raise_stop)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    began = time.monotonic()
    try:
        with pytest.raises(Stop):
            list(stream.iter_pages())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - began < 8  # the requests take 20 s; a loaded CI machine is slow
    lingering = [th for th in threading.enumerate() if th is not threading.main_thread()]
    assert all(th.daemon for th in lingering), lingering


# --- bodies and transport: one line each ----------------------------------------------

# JSON nested 5,000 deep is too deep for msgspec's decoder on Python 3.11/3.12;
# on 3.13 it decodes, and the envelope check refuses it (unclosed: "not JSON";
# closed: a record that is not an object). One clear line either way.
DEEP = "nested too deeply|the body is not JSON|is not an object"


@pytest.mark.parametrize(
    ("faults", "needle"),
    [
        (Faults(non_utf8_every=1), "the body is not UTF-8"),
        (Faults(deep_json_every=1), DEEP),
    ],
)
def test_bad_bodies_end_in_one_line(
    tmp_path: Path, make_server: Factory, faults: Faults, needle: str
) -> None:
    server = make_server(50, faults=faults)
    run = run_cli(tmp_path, config_for(server))
    assert_clean_failure(run, "HTTP 200", "customer_phone_numbers.json")
    errors = [line for line in run.stderr.splitlines() if "Sync failed" in line]
    assert re.search(needle, errors[0]), errors[0]
    assert "limit=" not in errors[0]  # the path only, never the query string


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"data": {"id": 1}}', "no 'data' list"),
        (b'{"data": [1, 2]}', "not an object"),
        (b'["data"]', "no 'data' list"),
        (b'{"data": [{"id": "x"}]}', "no integer id"),
        (b'{"data": [{"id": 1, "name": "Caf\xe9"}]}', "not UTF-8"),
        (b"[" * 5000, DEEP),
        (b"<html>", "not JSON"),
    ],
)
def test_decode_page_refuses_bad_envelopes(body: bytes, needle: str) -> None:
    reply = Reply(200, "OK", "/api/x.json", {}, body, 0.1)
    with pytest.raises(InvocaError, match=needle) as info:
        decode_page(reply)
    assert "HTTP 200 for GET /api/x.json" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_ca_bundle_is_one_line(tmp_path: Path) -> None:
    config = {"api_token": "tok", "network_id": "1", "base_url": "https://127.0.0.1:9"}
    run = run_cli(tmp_path, config, env={"REQUESTS_CA_BUNDLE": "/nonexistent"})
    assert_clean_failure(run, "CA certificate bundle", "/nonexistent")


def test_tls_errors_are_one_line_and_not_retried(tmp_path: Path, make_server: Factory) -> None:
    server = make_server(10)
    config = config_for(server, base_url=server.url.replace("http://", "https://"))
    run = run_cli(tmp_path, config)
    assert_clean_failure(run, "TLS error talking to 127.0.0.1")
    assert server.stats.connections == 1


def test_an_invalid_header_never_shows_its_value(tmp_path: Path, make_server: Factory) -> None:
    server = make_server(10)
    run = run_cli(tmp_path, config_for(server, user_agent="agent\nSECRET-ish"))
    assert_clean_failure(run, "invalid value", "user_agent")
    assert "SECRET-ish" not in run.stderr


def test_loopback_http_never_goes_through_a_proxy(tmp_path: Path, make_server: Factory) -> None:
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
    proxy = f"http://127.0.0.1:{port}"
    server = make_server(120)
    run = run_cli(
        tmp_path,
        config_for(server),
        env={"HTTP_PROXY": proxy, "http_proxy": proxy, "ALL_PROXY": proxy, "NO_PROXY": ""},
    )
    assert run.returncode == 0, run.stderr
    assert ids_of(run) == server.ids()


# --- connections, metrics, progress -----------------------------------------------------


def test_the_pool_holds_max_concurrency_connections(tmp_path: Path, make_server: Factory) -> None:
    # 150 pages: enough prompt ones for the window to reach 8 on a loaded machine too.
    server = make_server(3000, faults=Faults(latency_ms=40))
    run = run_cli(tmp_path, config_for(server, max_concurrency=8, page_size=20))
    assert run.returncode == 0, run.stderr
    assert len(run.records) == 3000
    assert server.stats.max_in_flight == 8
    assert server.stats.connections <= 8
    assert "Connection pool is full" not in run.stderr


def metric_points(stderr: str) -> list[dict[str, t.Any]]:
    return [
        json.loads(line.split("METRIC: ", 1)[1])
        for line in stderr.splitlines()
        if "METRIC: " in line
    ]


def test_every_request_emits_sdk_metrics(tmp_path: Path, make_server: Factory) -> None:
    server = make_server(300, faults=Faults(fail_every=3, fail_status=503))
    run = run_cli(tmp_path, config_for(server, page_size=50))
    assert run.returncode == 0, run.stderr
    points = metric_points(run.stderr)
    timers = [p for p in points if p["metric"] == "http_request_duration"]
    assert all(p["type"] == "timer" for p in timers)
    assert len(timers) == server.stats.requests
    codes = sorted(p["tags"]["http_status_code"] for p in timers)
    assert codes.count(503) == server.stats.statuses[503] > 0
    assert all(p["tags"]["endpoint"].endswith("customer_phone_numbers.json") for p in timers)
    counted = sum(p["value"] for p in points if p["metric"] == "http_request_count")
    assert counted == server.stats.requests
    summary = [line for line in run.stderr.splitlines() if "Paging done" in line]
    assert len(summary) == 1
    assert f"{server.stats.requests} requests" in summary[0]
    assert f"{server.stats.statuses[503]} retries" in summary[0]
    assert "300 records read" in summary[0]


def test_progress_is_logged_at_the_interval(
    make_server: Factory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(client, "PROGRESS_INTERVAL_SECONDS", 0.0)
    server = make_server(500)
    with caplog.at_level(logging.INFO):
        run_in_process(config_for(server))
    progress = [r.getMessage() for r in caplog.records if "Paging in progress" in r.getMessage()]
    assert len(progress) == 6  # one per page at interval 0
    assert "of about 500" in progress[-1]


def test_server_date_at_start_is_the_first_response_date(make_server: Factory) -> None:
    server = make_server(300, faults=Faults(clock_skew_seconds=-3600))
    tap = TapInvocaDestinations(config=config_for(server))
    stream = t.cast("InvocaStream", tap.streams["destinations"])
    before = dt.datetime.now(dt.UTC)
    assert sum(len(page) for page in stream.iter_pages()) == 300
    got = stream.server_date_at_start
    assert got is not None
    assert got.tzinfo is not None
    assert got.utcoffset() == dt.timedelta(0)
    assert abs((before - dt.timedelta(hours=1) - got).total_seconds()) < 3


class HeaderTrickler:
    """A raw server whose responses send a status line, then a header byte every 50 ms, forever.

    With ``first_page``, a request for start=0 gets that body instead, and the
    connection is kept alive for the next request. With ``stall_with`` (headers
    that end a response with its connection: ``Connection: close``, or no
    length), the trickled responses send those headers, then body bytes for
    ``STALL_AFTER`` seconds, then nothing.
    """

    STALL_AFTER = 1.5

    def __init__(self, first_page: bytes | None = None, stall_with: bytes | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.first_page = first_page
        self.stall_with = stall_with
        self.stop = threading.Event()
        self.accepted: list[socket.socket] = []
        self.asked: list[tuple[int, bytes]] = []  # (connection number, request line)
        self.trickling = [0, 0]  # now, most at once
        self.open_now = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            number = len(self.accepted)
            threading.Thread(target=self._answer, args=(conn, number), daemon=True).start()

    def _answer(self, conn: socket.socket, number: int) -> None:
        with self.lock:
            self.open_now += 1
        try:
            while head := self._request(conn):
                self.asked.append((number, head.split(b"\r\n", 1)[0]))
                line = head.split(b"\r\n", 1)[0]
                if self.first_page is not None and re.search(rb"[?&]start=0[& ]", line):
                    body = self.first_page
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    continue
                self._trickle(conn)
                return
        except OSError:
            pass  # the tap cut the connection
        finally:
            with self.lock:
                self.open_now -= 1

    @staticmethod
    def _request(conn: socket.socket) -> bytes:
        head = b""
        while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
            head += chunk
        return head

    def _trickle(self, conn: socket.socket) -> None:
        with self.lock:
            self.trickling[0] += 1
            self.trickling[1] = max(self.trickling)
        try:
            if self.stall_with is not None:
                conn.sendall(b"HTTP/1.1 200 OK\r\n" + self.stall_with + b"\r\n{")
                stall_at = time.monotonic() + self.STALL_AFTER
                while time.monotonic() < stall_at and not self.stop.wait(0.05):
                    conn.sendall(b" ")
                self.stop.wait()
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self.stop.wait(0.05):
                conn.sendall(b"a")
        finally:
            with self.lock:
                self.trickling[0] -= 1

    def wait_for_no_connection(self) -> None:
        deadline = time.monotonic() + 5
        while self.open_now and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for conn in self.accepted:
            conn.close()


def trickling_stream(server: HeaderTrickler, **settings: t.Any) -> InvocaStream:
    config = {
        "api_token": "tok",
        "network_id": "1",
        "base_url": server.url,
        "request_timeout": 0.5,
        "retry_initial_wait": 0.01,
        "max_concurrency": 1,
        **settings,
    }
    return t.cast("InvocaStream", TapInvocaDestinations(config=config).streams["destinations"])


def test_trickled_headers_are_bounded_by_request_timeout() -> None:
    server = HeaderTrickler()
    stream = trickling_stream(server, max_tries=4)
    began = time.monotonic()
    try:
        with pytest.raises(InvocaError, match=r"gave up after 4 attempt\(s\).*request_timeout=0.5"):
            list(stream.iter_pages())
        assert time.monotonic() - began < 10  # 4 x 0.5 s; unbounded, it would never end
        assert len(server.accepted) == 4
        # A request given up on is cut, not left reading beside its retry: the server
        # sees it gone at its next byte (50 ms), so at most the retry overlaps it.
        assert server.trickling[1] <= 2, server.trickling
        server.wait_for_no_connection()
        assert server.trickling[0] == 0, "a connection the tap gave up on is still open"
    finally:
        server.close()


def test_trickled_headers_of_a_request_sent_ahead_are_cut_at_request_timeout() -> None:
    # start=0 is answered on a kept-alive connection; the next page's headers trickle.
    server = HeaderTrickler(first_page=b'{"data": [{"id": 1}, {"id": 2}], "recordsTotal": 3}')
    stream = trickling_stream(server, max_tries=2, page_size=2)
    began = time.monotonic()
    try:
        with pytest.raises(InvocaError, match=r"gave up after 2 attempt\(s\).*request_timeout=0.5"):
            for _ in stream.iter_pages():
                pass
        assert time.monotonic() - began < 5  # 2 x 0.5 s; unbounded, it would never end
        # The second page went out ahead, on the first page's connection, and was cut.
        assert [number for number, _ in server.asked[:2]] == [1, 1], server.asked
        assert re.search(rb"[?&]start=1[& ]", server.asked[1][1])
        server.wait_for_no_connection()
        assert server.open_now == 0, "a connection the tap gave up on is still open"
    finally:
        server.close()


@pytest.mark.parametrize(
    "stall_with",
    [b"Content-Length: 100000\r\nConnection: close\r\n", b"Connection: keep-alive\r\n"],
    ids=["connection-close", "no-length"],
)
def test_a_stalled_body_that_ends_with_its_connection_is_cut_at_request_timeout(
    stall_with: bytes,
) -> None:
    # http.client closes such a connection as soon as it has the headers and
    # reads the body from its socket: that socket must still be cut at the deadline.
    first_page = b'{"data": [{"id": 1}, {"id": 2}], "recordsTotal": 3}'
    server = HeaderTrickler(first_page=first_page, stall_with=stall_with)
    stream = trickling_stream(server, max_tries=1, page_size=2, request_timeout=2)
    pages = stream.iter_pages()
    try:
        assert [raw_id(r) for r in next(pages)] == [1, 2]
        began = time.monotonic()
        with pytest.raises(InvocaError, match=r"gave up after 1 attempt\(s\).*request_timeout=2"):
            next(pages)
        # At the deadline (2 s), not at the socket's timeout after the last byte (3.5 s).
        assert time.monotonic() - began < 3.0
        assert [number for number, _ in server.asked[:2]] == [1, 1], server.asked
    finally:
        server.close()


def test_records_read_go_out_while_the_next_response_trickles(
    tmp_path: Path, frontend: Frontend
) -> None:
    # Page 1 (two records) comes at once; page 2's headers trickle for the whole
    # request_timeout. Page 1's records reach stdout now, not when page 2 gives up.
    server = HeaderTrickler(first_page=b'{"data": [{"id": 1}, {"id": 2}], "recordsTotal": 3}')
    config = {
        "api_token": "tok",
        "network_id": "1",
        "base_url": server.url,
        "page_size": 2,
        "request_timeout": 30,
        "max_tries": 1,
    }
    process = frontend.start(tmp_path, config)
    began = time.monotonic()
    try:
        assert process.stdout is not None
        lines = iter(process.stdout.readline, b"")
        first = next(line for line in lines if b'"RECORD"' in line)
        assert time.monotonic() - began < 15, "the first record waited for the next page"
        assert b'"id":1' in first
    finally:
        process.kill()
        process.communicate()
        server.close()


def test_a_token_with_a_newline_never_shows_up(tmp_path: Path, make_server: Factory) -> None:
    # The configured token is tidied to "TOKEN-7d1e", which this server (expecting
    # the newline too) rejects: a 401 in one line that never quotes the token.
    server = make_server(10, token="TOKEN-7d1e\n")  # noqa: S106
    run = run_cli(tmp_path, config_for(server), env={"LOGLEVEL": "DEBUG"})
    assert run.returncode != 0
    assert "TOKEN-7d1e" not in run.stderr + run.stdout
    assert server.stats.statuses[401] == 1


def test_a_body_past_the_size_bound_ends_in_one_line(
    make_server: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Memory stays bounded whatever a server sends: here a page of 100 (~100 KB)
    # against a bound lowered to 20 KB.
    monkeypatch.setattr("tap_invoca_destinations.client.MAX_BODY_BYTES", 20 * 1024)
    server = make_server(300)
    with pytest.raises(InvocaError, match="the body grew past 20,480 bytes, far more than"):
        run_in_process(config_for(server, max_tries=1))
    assert server.stats.requests == 1
