"""Failure behaviour over loopback HTTP: retries, clear fatal errors, secret safety.

Each row of the contract's Failures table has a test here. Every run uses a
distinctive token at DEBUG level and checks it appears in nothing the tap wrote.
"""

from __future__ import annotations

import io
import json
import logging
import time
import typing as t

import pytest
from helpers import TapRun, config_for, run_cli
from invoca_server import Faults, InvocaServer

if t.TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

TOKEN = "SECRET-tok-3f9a7c1e"  # noqa: S105 - a marker to search for, not a credential
DEBUG = {"LOGLEVEL": "DEBUG"}


def assert_no_secret(run: TapRun, server: InvocaServer) -> None:
    assert TOKEN not in run.stdout
    assert TOKEN not in run.stderr
    assert server.stats.token_in_url == 0


def assert_clean_failure(run: TapRun, *needles: str, debug: bool = False) -> None:
    assert run.returncode != 0
    if not debug:  # at DEBUG the traceback is logged on purpose
        assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "Sync failed" in line]
    assert len(errors) == 1, run.stderr
    if not debug:  # the failure is the only ERROR line
        assert [line for line in run.stderr.splitlines() if "| ERROR" in line] == errors
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def serve(
    make_server: Callable[..., InvocaServer], faults: Faults, count: int = 120
) -> InvocaServer:
    return make_server(count, faults=faults, token=TOKEN)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(
    tmp_path: Path, make_server: Callable[..., InvocaServer], status: int
) -> None:
    server = serve(make_server, Faults(fail_every=3, fail_status=status))
    run = run_cli(tmp_path, config_for(server, page_size=10), env=DEBUG)
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert server.stats.statuses[status] >= 3
    retries = [line for line in run.stderr.splitlines() if "Retrying GET" in line]
    assert len(retries) == server.stats.statuses[status]
    assert f"HTTP {status}" in retries[0]
    assert "attempt 1/6" in retries[0]
    # A 408 is a request dropped unread: it says nothing of the server's load.
    assert ("lowering concurrency" in run.stderr) == (status != 408)
    assert_no_secret(run, server)


@pytest.mark.parametrize("form", ["1", "date:2"])
def test_retry_after_is_honoured(
    tmp_path: Path, make_server: Callable[..., InvocaServer], form: str
) -> None:
    server = serve(
        make_server, Faults(fail_every=2, fail_status=429, retry_after=form, fail_times=1)
    )
    began = time.monotonic()
    run = run_cli(tmp_path, config_for(server, max_concurrency=1), env=DEBUG)
    elapsed = time.monotonic() - began
    assert run.returncode == 0, run.stderr
    assert len(run.records) == 120
    retry = next(line for line in run.stderr.splitlines() if "Retrying GET" in line)
    assert "(Retry-After)" in retry
    assert elapsed >= 0.9  # the backoff alone would have waited ~0.01 s
    assert_no_secret(run, server)


def test_429_lowers_concurrency(tmp_path: Path, make_server: Callable[..., InvocaServer]) -> None:
    server = serve(make_server, Faults(fail_every=4, fail_status=429, fail_times=1), count=400)
    run = run_cli(tmp_path, config_for(server, page_size=20, max_concurrency=4))
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert "lowering concurrency to 2" in run.stderr


def test_dropped_connections_are_retried(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = serve(make_server, Faults(drop_every=3))
    run = run_cli(tmp_path, config_for(server, page_size=10), env=DEBUG)
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert server.stats.dropped >= 3
    assert "ConnectionError" in run.stderr
    assert_no_secret(run, server)


def test_timeouts_are_retried(tmp_path: Path, make_server: Callable[..., InvocaServer]) -> None:
    server = serve(make_server, Faults(slow_every=3, slow_seconds=1.5))
    run = run_cli(
        tmp_path,
        config_for(server, page_size=30, request_timeout=0.5, max_concurrency=1),
        env=DEBUG,
    )
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert "ReadTimeout" in run.stderr
    assert_no_secret(run, server)


def test_exhausted_tries_end_clearly(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = serve(make_server, Faults(fail_every=1, fail_status=503))
    run = run_cli(tmp_path, config_for(server, max_tries=3))
    assert_clean_failure(
        run, "gave up after 3 attempt(s)", "HTTP 503", "ERR-4242", "customer_phone_numbers.json"
    )
    assert server.stats.requests == 3
    assert_no_secret(run, server)


def test_retry_time_budget_is_a_bound(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = serve(make_server, Faults(fail_every=1, fail_status=429, retry_after="30"))
    began = time.monotonic()
    run = run_cli(tmp_path, config_for(server, max_retry_seconds=5))
    assert time.monotonic() - began < 20
    assert_clean_failure(run, "gave up after 1 attempt(s)", "HTTP 429", "max_retry_seconds=5")


def test_a_failure_stops_prefetches_still_waiting_to_retry(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    # The page at start=9 carries a bad value (the sync stops while handling it);
    # the pages prefetched with it get 503 with Retry-After: 30. The run must end
    # now, not after those waits. Every response takes 200 ms and the bad page 1.5 s
    # more, so the prefetches surely have their 503 before the bad page is handled.
    faults = Faults(
        fail_starts=(19, 29),
        fail_status=503,
        retry_after="30",
        latency_ms=200,
        slow_starts=(9,),
        slow_seconds=1.5,
    )
    server = serve(make_server, faults)
    victim = server.ids()[12]
    wire = server.wire_record(victim)
    wire["dynamic_number_pool"] = {"max_pool_size": "twelve"}
    server.set_wire(victim, wire)
    began = time.monotonic()
    run = run_cli(tmp_path, config_for(server, page_size=10, max_concurrency=4))
    assert time.monotonic() - began < 15
    assert_clean_failure(run, f"record id {victim}", "dynamic_number_pool_max_pool_size")
    assert server.stats.statuses[503] >= 1  # a prefetch really was waiting


def test_401_is_not_retried_and_names_the_token_setting(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = make_server(50, token="the-server-wants-another-token")  # noqa: S106
    config = config_for(server)
    config["api_token"] = TOKEN
    run = run_cli(tmp_path, config, env=DEBUG)
    assert_clean_failure(run, "HTTP 401", "check api_token", "Not authorized", debug=True)
    assert server.stats.requests == 1
    assert TOKEN not in run.stdout + run.stderr


def test_401_at_default_level_has_no_traceback(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = make_server(50, token="another")  # noqa: S106
    run = run_cli(tmp_path, {**config_for(server), "api_token": TOKEN})
    assert_clean_failure(run, "HTTP 401")
    assert TOKEN not in run.stdout + run.stderr


def test_traceback_is_kept_at_debug(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = make_server(50, token="another")  # noqa: S106
    run = run_cli(tmp_path, {**config_for(server), "api_token": TOKEN}, env=DEBUG)
    assert run.returncode != 0
    assert "Traceback" in run.stderr
    assert TOKEN not in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("faults", "overrides", "needles"),
    [
        pytest.param(
            Faults(status_every={1: 403}),
            {},
            ["HTTP 403", "injected 403", "/api/2022-08-01/1234/customer_phone_numbers.json"],
            id="403 quotes Invoca's error text",
        ),
        pytest.param(
            Faults(),
            {"network_id": "999"},
            ["HTTP 404", "/api/2022-08-01/999/customer_phone_numbers.json", "check network_id"],
            id="404 hints at network and version",
        ),
    ],
)
def test_403_and_404_are_not_retried_and_end_clearly(
    tmp_path: Path,
    make_server: Callable[..., InvocaServer],
    faults: Faults,
    overrides: dict[str, str],
    needles: list[str],
) -> None:
    server = serve(make_server, faults)
    run = run_cli(tmp_path, config_for(server, **overrides), env=DEBUG)
    assert_clean_failure(run, *needles, debug=True)
    assert server.stats.requests == 1
    assert_no_secret(run, server)


def test_non_json_body_ends_with_status_url_and_body_start(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = serve(make_server, Faults(non_json_every=2))
    run = run_cli(tmp_path, config_for(server, page_size=10, max_concurrency=1), env=DEBUG)
    assert_clean_failure(
        run,
        "HTTP 200",
        "not JSON",
        "<html><body>Service",
        "customer_phone_numbers.json",
        debug=True,
    )
    assert_no_secret(run, server)


def test_a_bad_body_is_not_retried_and_nothing_after_it_is_written(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = serve(make_server, Faults(non_json_starts=(9,)))
    run = run_cli(tmp_path, config_for(server, page_size=10, max_concurrency=1))
    assert_clean_failure(run, "HTTP 200", "not JSON")
    assert server.stats.requests == 2
    assert server.stats.non_json == 1
    written = [json.loads(line) for line in run.stdout.splitlines()]
    assert [m["record"]["id"] for m in written if m["type"] == "RECORD"] == server.ids()[:10]


def test_a_bad_page_past_the_end_is_discarded_unread(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    # Without recordsTotal the window asks past the end. The last page (at 99) is slow,
    # so the request at 109 surely goes out meanwhile; its HTML is never read.
    faults = Faults(
        total_form="absent", slow_starts=(99,), slow_seconds=0.5, non_json_starts=(109,)
    )
    server = make_server(100, faults=faults)
    run = run_cli(tmp_path, config_for(server, page_size=10, max_concurrency=4))
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert server.stats.non_json == 1


def test_body_without_data_ends_clearly(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = serve(make_server, Faults(no_data_every=1))
    run = run_cli(tmp_path, config_for(server), env=DEBUG)
    assert_clean_failure(run, "HTTP 200", "no 'data'", "recordsTotal", debug=True)
    assert run.records == []
    assert_no_secret(run, server)


def test_redirect_is_not_followed_and_names_the_new_host(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = serve(make_server, Faults(redirect_to="https://acme.invoca.net"))
    run = run_cli(tmp_path, config_for(server), env=DEBUG)
    assert_clean_failure(
        run, "HTTP 301", "https://acme.invoca.net/api/", "set base_url", debug=True
    )
    assert server.stats.requests == 1
    assert_no_secret(run, server)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_server_ignoring_start_ends_in_an_error_not_a_loop(
    tmp_path: Path, make_server: Callable[..., InvocaServer], concurrency: int
) -> None:
    server = serve(make_server, Faults(ignore_start=True))
    run = run_cli(
        tmp_path, config_for(server, page_size=10, max_concurrency=concurrency), timeout=60
    )
    assert_clean_failure(run, "start=", "the server ignores 'start'")
    assert server.stats.requests < 12


def test_successful_debug_run_never_shows_the_token(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = serve(make_server, Faults(fail_every=5, fail_status=500, drop_every=7))
    run = run_cli(tmp_path, config_for(server, page_size=10), env=DEBUG)
    assert run.returncode == 0, run.stderr
    assert "DEBUG" in run.stderr  # the run really logged at DEBUG
    assert_no_secret(run, server)
    assert all(TOKEN not in str(state) for state in run.states)


def test_log_lines_are_redacted_as_a_safety_net(server: InvocaServer) -> None:
    from tap_invoca_destinations.tap import TapInvocaDestinations  # noqa: PLC0415

    # Like the SDK's console handler: on the root logger before the tap starts.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        TapInvocaDestinations(config={**config_for(server), "api_token": TOKEN})
        logger = logging.getLogger("some.library")
        logger.warning("sending headers {'Authorization': '%s'}", TOKEN)
        try:
            int(f"bad token {TOKEN}")
        except ValueError:
            logger.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    text = stream.getvalue()
    assert "sending headers" in text
    assert "ValueError" in text
    assert TOKEN not in text
    assert text.count("<redacted>") == 2
