"""Adversarial reproductions: each test states a promise of TAP_CONTRACT.md that the tap breaks.

Every test talks real HTTP to a tiny server on 127.0.0.1 (a handler function
per test) and runs the installed CLI.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing as t
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from helpers import clean_env, full_table_catalog, run_cli, wait_until_blocked_writing

if t.TYPE_CHECKING:
    from collections.abc import Callable, Iterator

TOKEN = "SECRET-adv-91f2"  # noqa: S105 - a marker, not a secret
UTC = dt.UTC
Reply = tuple[int, dict[str, str], t.Any]
Handler = t.Callable[[dict[str, str], int], Reply]


def destination(dest_id: int, updated: str = "2023-01-01 00:00:00 +0000") -> dict[str, t.Any]:
    """A minimal wire destination."""
    return {"id": dest_id, "created_at": "2023-01-01 00:00:00 +0000", "updated_at": updated}


def listing(count: int) -> Handler:
    """A well-behaved list of ids 1..count honouring start and limit."""

    def respond(query: dict[str, str], _: int) -> Reply:
        start, limit = int(query["start"]), int(query["limit"])
        ids = list(range(1, count + 1))[start : start + limit]
        return 200, {}, {"data": [destination(i) for i in ids], "recordsTotal": count}

    return respond


class TinyServer:
    """A list endpoint on 127.0.0.1 whose every reply is decided by ``respond``."""

    def __init__(self, respond: Handler) -> None:
        """Start serving on an ephemeral port."""
        self.respond = respond
        self.queries: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                with lock:
                    outer.queries.append(query)
                    number = len(outer.queries)
                status, headers, body = outer.respond(query, number)
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                if "Date" in headers:  # ours instead of http.server's
                    self.send_response_only(status)
                else:
                    self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda *_: None  # type: ignore[method-assign]  # resets: quiet
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], TinyServer]]:
    """Start tiny servers for a test; all are stopped after it."""
    servers: list[TinyServer] = []

    def start(respond: Handler) -> TinyServer:
        server = TinyServer(respond)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def config(server: TinyServer, **overrides: t.Any) -> dict[str, t.Any]:
    """A config with short timeouts and few, fast retries."""
    return {
        "api_token": TOKEN,
        "network_id": "1234",
        "base_url": server.url,
        "request_timeout": 5,
        "max_tries": 3,
        "max_retry_seconds": 5,
        "retry_initial_wait": 0.01,
        **overrides,
    }


def error_lines(stderr: str) -> list[str]:
    """The lines logged at ERROR level."""
    return [line for line in stderr.splitlines() if "| ERROR" in line]


def ids_of(stdout: str) -> list[int]:
    """The ids of the RECORD messages on stdout, in order."""
    messages = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return [m["record"]["id"] for m in messages if m["type"] == "RECORD"]


# --- Integrity: "Exit 0 means complete" ---------------------------------------


@pytest.mark.parametrize("max_concurrency", [1, 4])
def test_a_short_page_in_the_middle_of_the_list_is_not_a_complete_sync(
    tmp_path: Path, serve: Callable[[Handler], TinyServer], max_concurrency: int
) -> None:
    # The server returns fewer records than asked for on one page in the middle
    # of a 300-record list whose recordsTotal says 300 on every page. The
    # contract: "even when the server returns fewer records than asked for" every
    # destination is emitted, and recordsTotal "inconsistent with the pages" means
    # "read to the end or fail clearly. Never a short success".
    # The tap takes the short page as the end and exits 0 with 149 of 300.
    full = listing(300)

    def respond(query: dict[str, str], number: int) -> Reply:
        status, headers, body = full(query, number)
        start = int(query["start"])
        if 0 < start < 150:  # one short page mid-list
            body["data"] = body["data"][: int(query["limit"]) // 2]
        return status, headers, body

    server = serve(respond)
    run = run_cli(tmp_path, config(server, max_concurrency=max_concurrency), timeout=60)
    if run.returncode == 0:
        assert ids_of(run.stdout) == list(range(1, 301)), "exit 0 with a short record set"
    else:
        assert len(error_lines(run.stderr)) >= 1


def test_an_empty_first_page_of_a_non_empty_list_is_not_a_complete_sync(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # The first page comes back empty once (a gateway hiccup) while recordsTotal
    # says 250. The tap exits 0 having emitted nothing: a short success.
    full = listing(250)

    def respond(query: dict[str, str], number: int) -> Reply:
        status, headers, body = full(query, number)
        if number == 1:
            body["data"] = []
        return status, headers, body

    server = serve(respond)
    run = run_cli(tmp_path, config(server), timeout=60)
    if run.returncode == 0:
        assert ids_of(run.stdout) == list(range(1, 251)), "exit 0 with a short record set"


def test_mirror_mode_does_not_activate_a_version_after_a_short_read(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # The same short page in mirror mode (FULL_TABLE with
    # emit_activate_version_messages). The contract: ACTIVATE_VERSION is sent
    # only after the whole list was read; "a failed or interrupted sync never
    # deletes or flags a live row". The tap sends ACTIVATE_VERSION after 149 of
    # 300 records, so a target deletes or flags 151 live destinations.
    full = listing(300)

    def respond(query: dict[str, str], number: int) -> Reply:
        status, headers, body = full(query, number)
        if 0 < int(query["start"]) < 150:
            body["data"] = body["data"][: int(query["limit"]) // 2]
        return status, headers, body

    server = serve(respond)
    settings = config(server, emit_activate_version_messages=True)
    run = run_cli(tmp_path, settings, catalog=full_table_catalog(settings), timeout=60)
    messages = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    if any(m["type"] == "ACTIVATE_VERSION" for m in messages):
        assert ids_of(run.stdout) == list(range(1, 301)), "ACTIVATE_VERSION after a short read"


# --- Incremental: "no change is lost" -----------------------------------------


def test_a_bookmark_a_few_minutes_in_the_future_is_not_carried_forward(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # A state bookmark 4 minutes ahead of now (a clock that ran fast). The
    # contract: "A bookmark in the future is warned about and not carried
    # forward" and "the final bookmark is never later than the sync's start".
    # The tap silently keeps it: the run's only STATE carries the future
    # bookmark, so a destination edited in the next 4 minutes is never emitted.
    server = serve(listing(5))
    started = dt.datetime.now(UTC)
    future = (started + dt.timedelta(minutes=4)).replace(microsecond=0).isoformat()
    state = {
        "bookmarks": {
            "destinations": {"replication_key": "updated_at", "replication_key_value": future}
        }
    }
    run = run_cli(tmp_path, config(server), state=state, timeout=60)
    assert run.returncode == 0, run.stderr
    final = run.states[-1]["bookmarks"]["destinations"]["replication_key_value"]
    assert dt.datetime.fromisoformat(final) <= started, f"final bookmark {final} is after the start"


# --- Failures: 429 honouring Retry-After; responses' headers -----------------


def test_a_429_with_an_unparseable_retry_after_date_is_retried(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # One 429 whose Retry-After is a garbage HTTP-date (a year far too large).
    # The contract: 429 is retried with backoff (honouring a Retry-After that
    # can be understood). The tap crashes on the header instead: it does not
    # retry and fails with "Sync failed: OverflowError: Python int too large...".
    full = listing(20)

    def respond(query: dict[str, str], number: int) -> Reply:
        if number == 1:
            retry_after = "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"
            return 429, {"Retry-After": retry_after}, {"errors": {"rate": "slow down"}}
        return full(query, number)

    server = serve(respond)
    run = run_cli(tmp_path, config(server), timeout=60)
    assert "OverflowError" not in run.stderr
    assert run.returncode == 0, run.stderr
    assert ids_of(run.stdout) == list(range(1, 21))


def test_an_unparseable_date_header_does_not_fail_a_good_sync(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # Every reply is a good page, but the Date header holds an absurd year. The
    # Date header is only a hint for the bookmark ceiling; the tap crashes on it
    # with "Sync failed: OverflowError: Python int too large to convert to C long",
    # a line that says nothing about what is wrong.
    full = listing(20)

    def respond(query: dict[str, str], number: int) -> Reply:
        status, headers, body = full(query, number)
        return status, {**headers, "Date": "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"}, body

    server = serve(respond)
    run = run_cli(tmp_path, config(server), timeout=60)
    assert "OverflowError" not in run.stderr
    assert run.returncode == 0, run.stderr
    assert ids_of(run.stdout) == list(range(1, 21))


# --- Failures: bad settings and a bad state, named in one line ----------------


def test_a_start_date_out_of_range_is_refused_naming_the_key(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # A start_date whose UTC instant falls past year 9999. The contract: invalid
    # settings exit non-zero before any request, naming each bad key. The tap
    # says only "Sync failed: OverflowError: date value out of range".
    server = serve(listing(5))
    run = run_cli(tmp_path, config(server, start_date="9999-12-31 23:00:00 -0200"), timeout=60)
    assert run.returncode != 0
    assert server.queries == []
    assert "start_date" in run.stderr
    assert "OverflowError" not in run.stderr


@pytest.mark.parametrize("bookmark", ["9999-12-31 23:00:00 -0200", "0001-01-01 00:00:00 +0100"])
def test_a_bookmark_out_of_range_fails_in_one_line_naming_the_state(
    tmp_path: Path, serve: Callable[[Handler], TinyServer], bookmark: str
) -> None:
    # A bookmark in Invoca's form whose UTC instant is past year 9999 or before
    # year 1. The contract: a bad state file exits non-zero "with one line that
    # says what is wrong" (or, for one in the future: warned about, not carried
    # forward). The tap says "Sync failed: OverflowError: date value out of
    # range", without a word about the state or its bookmark.
    server = serve(listing(5))
    state = {
        "bookmarks": {
            "destinations": {"replication_key": "updated_at", "replication_key_value": bookmark}
        }
    }
    started = dt.datetime.now(UTC)
    run = run_cli(tmp_path, config(server), state=state, timeout=60)
    if run.returncode == 0:  # taken as a bookmark in the future: ignored, not carried
        final = run.states[-1]["bookmarks"]["destinations"]["replication_key_value"]
        assert dt.datetime.fromisoformat(final) <= started
        return
    failures = [line for line in run.stderr.splitlines() if "Sync failed" in line]
    assert len(failures) == 1, run.stderr
    assert "state" in failures[0]
    assert "replication_key_value" in failures[0]
    assert server.queries == []


def test_a_failure_is_reported_in_one_error_line(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # The contract: "At the default log level every failure is one clear line".
    # A 404 is logged as two ERROR lines: the SDK's "An unhandled error occurred
    # while syncing 'destinations'" (which says nothing) and the tap's own line.
    def respond(_: dict[str, str], __: int) -> Reply:
        return 404, {}, {"errors": {"invalid_data": "no such network", "class": "RecordNotFound"}}

    server = serve(respond)
    run = run_cli(tmp_path, config(server), timeout=60)
    assert run.returncode != 0
    errors = error_lines(run.stderr)
    assert len(errors) == 1, errors
    assert "404" in errors[0]


@pytest.mark.parametrize("entry", ["x", [], {"replication_key_value": None, "partitions": 5}])
def test_a_state_whose_stream_entry_is_malformed_fails_in_one_line_naming_the_state(
    tmp_path: Path, serve: Callable[[Handler], TinyServer], entry: object
) -> None:
    # bookmarks.destinations that is not an object (or has a non-list
    # "partitions"). The contract: a bad state file ends in "one line that says
    # what is wrong". The tap says "Sync failed: AttributeError: 'str' object has
    # no attribute 'items'" (or "TypeError: 'int' object is not iterable").
    server = serve(listing(5))
    run = run_cli(
        tmp_path, config(server), state={"bookmarks": {"destinations": entry}}, timeout=60
    )
    assert run.returncode != 0
    failures = [line for line in run.stderr.splitlines() if "Sync failed" in line]
    assert len(failures) == 1, run.stderr
    assert "state" in failures[0]
    assert "Error:" not in failures[0]  # not a bare Python exception


# --- Settings from the environment (--config ENV) ----------------------------


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("INCLUDE_INACTIVE", "maybe", "include_inactive"),
        ("STREAM_MAPS", "{bad", "stream_maps"),
    ],
)
def test_a_bad_setting_from_the_environment_is_refused_naming_the_key(
    tmp_path: Path, serve: Callable[[Handler], TinyServer], variable: str, value: str, key: str
) -> None:
    # The contract: invalid settings exit non-zero before any request, naming
    # each bad key; every key can come from the environment. The tap takes
    # INCLUDE_INACTIVE=maybe as false and syncs (exit 0, records silently
    # dropped), and reports STREAM_MAPS={bad as "an environment setting has a
    # bad value" without naming it.
    server = serve(listing(5))
    env = {
        "TAP_INVOCA_DESTINATIONS_API_TOKEN": TOKEN,
        "TAP_INVOCA_DESTINATIONS_NETWORK_ID": "1234",
        "TAP_INVOCA_DESTINATIONS_BASE_URL": server.url,
        f"TAP_INVOCA_DESTINATIONS_{variable}": value,
    }
    run = run_cli(tmp_path, None, "--config", "ENV", env=env, timeout=60)
    assert run.returncode != 0
    assert server.queries == []
    errors = " ".join(error_lines(run.stderr))
    assert key in errors or f"TAP_INVOCA_DESTINATIONS_{variable}" in errors, run.stderr


# --- Stopping ----------------------------------------------------------------


def test_ctrl_c_during_start_up_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    # SIGINT while the tap is still importing its modules (the first ~0.3 s; the
    # moment the ssl extension is loaded is a reliable point inside it). The
    # contract: stopping exits non-zero, and at the default log level there is
    # no traceback. The tap prints a KeyboardInterrupt traceback.
    config_path = tmp_path / "config.json"
    config_path.write_text(
        json.dumps({"api_token": TOKEN, "network_id": "1234", "base_url": "http://127.0.0.1:9"})
    )
    command = [str(Path(sys.executable).parent / "tap-invoca-destinations")]
    process = subprocess.Popen(
        [*command, "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=tmp_path,
    )
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            if "_ssl" in maps.read_text():
                break
        time.sleep(0.001)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode != 0
    assert "Traceback" not in stderr.decode(), stderr.decode()[-400:]


def test_a_closed_stdout_is_named_in_the_failure_line(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # The tap started with file descriptor 1 closed (`tap ... >&-`). The
    # contract: "a closed stdout: exits non-zero with one line that says what is
    # wrong". The tap says "Sync failed: AttributeError: 'NoneType' object has no
    # attribute 'write'".
    server = serve(listing(5))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config(server)))
    command = [str(Path(sys.executable).parent / "tap-invoca-destinations")]
    result = subprocess.run(
        [*command, "--config", str(config_path)],
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(1),
    )
    assert result.returncode != 0
    failures = [line for line in result.stderr.splitlines() if "| ERROR" in line]
    assert failures, result.stderr
    assert "stdout" in failures[-1], failures
    assert "AttributeError" not in result.stderr


def test_a_token_that_cannot_be_sent_as_a_header_is_refused_naming_api_token(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # A token with a character outside latin-1 cannot go into the Authorization
    # header. The contract: invalid settings exit non-zero before any request,
    # naming each bad key. The tap starts the sync and fails with
    # "Sync failed: UnicodeEncodeError: 'latin-1' codec can't encode character
    # '\u2603' in position 15: ..." (which also tells the token's length).
    server = serve(listing(5))
    run = run_cli(tmp_path, config(server, api_token=TOKEN + "\u2603"), timeout=60)
    assert run.returncode != 0
    errors = " ".join(error_lines(run.stderr))
    assert "api_token" in errors, run.stderr
    assert "UnicodeEncodeError" not in run.stderr


def test_sigterm_stops_the_tap_in_seconds_even_when_the_target_stopped_reading(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # The target hangs (alive, but no longer reading stdout), the pipe fills
    # up, and the orchestrator sends SIGTERM. The contract: stopping "takes
    # seconds, exits non-zero". The tap holds the signal until its blocked
    # write completes, i.e. for as long as the target does not read: it is
    # still running 10 s later (and would be forever). 10,000 records: more
    # than a pipe widened to 1 MiB holds.
    server = serve(listing(10_000))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config(server)))
    command = [str(Path(sys.executable).parent / "tap-invoca-destinations")]
    process = subprocess.Popen(
        [*command, "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 20
        while len(server.queries) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        wait_until_blocked_writing(process)  # 300 records in hand, more than the pipe holds
        process.send_signal(signal.SIGTERM)
        try:
            returncode: int | None = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            returncode = None
        assert returncode is not None, "still running 10 s after SIGTERM"
        assert returncode != 0
    finally:
        process.communicate(timeout=30)  # let a blocked tap finish, then reap it


# --- Bad files on the command line -------------------------------------------


@pytest.mark.parametrize("content", [None, b"\xff\xfe not text", b'{"api_token": '])
def test_a_missing_or_unreadable_config_file_is_one_line_without_a_traceback(
    tmp_path: Path, content: bytes | None
) -> None:
    # --config naming a file that does not exist, is not UTF-8, or is not JSON.
    # The contract: invalid settings exit non-zero, and at the default log level
    # every failure is one clear line, tracebacks only at DEBUG. The tap prints
    # a FileNotFoundError / UnicodeDecodeError traceback.
    path = tmp_path / "settings.json"
    if content is not None:
        path.write_bytes(content)
    run = run_cli(tmp_path, None, "--config", str(path), timeout=60)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-600:]
    assert "settings.json" in run.stderr


def test_a_catalog_that_is_not_json_is_named_in_the_failure_line(
    tmp_path: Path, serve: Callable[[Handler], TinyServer]
) -> None:
    # The tap says "Sync failed: JSONDecodeError: Expecting value or ']': line 2
    # column 1 (char 14)": one line, but not one that says what is wrong (which
    # file?). The contract: every failure is one clear line.
    server = serve(listing(5))
    path = tmp_path / "my-catalog.json"
    path.write_text('{"streams": [\n')
    run = run_cli(tmp_path, config(server), "--catalog", str(path), timeout=60)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = error_lines(run.stderr)
    assert errors, run.stderr
    assert "catalog" in errors[-1], errors
