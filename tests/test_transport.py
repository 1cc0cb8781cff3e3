"""The request path's bounds: whose credentials go out, how long to back off, how much to read."""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
import typing as t
import zlib
from pathlib import Path

import pytest
from helpers import clean_env, config_for, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from invoca_server import Faults, InvocaServer

from tap_invoca_destinations.client import BodyBudget, Inflater, retry_after_seconds
from tap_invoca_destinations.paging import RetryPolicy

if t.TYPE_CHECKING:
    from collections.abc import Callable

TAP = str(Path(sys.executable).parent / "tap-invoca-destinations")
MIB = 1024 * 1024


# --- ~/.netrc never replaces the token ----------------------------------------


def test_a_netrc_entry_for_the_host_never_replaces_the_token(
    tmp_path: Path, tls_server: InvocaServer, certificate: tuple[str, str]
) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1\n  login someone\n  password netrc-password-5e1\n")
    netrc.chmod(0o600)
    env = {"HOME": str(tmp_path), "NETRC": str(netrc), "REQUESTS_CA_BUNDLE": certificate[0]}
    run = run_cli(tmp_path, config_for(tls_server, page_size=25), env=env)
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == tls_server.ids()
    assert tls_server.stats.other_auth == {}, "an Authorization header other than the token"
    assert "netrc-password-5e1" not in run.stdout + run.stderr


# --- Retry-After: invalid values keep the usual backoff -----------------------


@pytest.mark.parametrize("value", ["-5", "nan", "NaN", "inf", "-inf", "1e400", "-0.5"])
def test_an_invalid_retry_after_keeps_the_backoff(
    tmp_path: Path, make_server: Callable[..., InvocaServer], value: str
) -> None:
    faults = Faults(fail_every=2, fail_status=429, retry_after=value, fail_times=2)
    server = make_server(100, faults=faults)
    settings_ = config_for(server, page_size=20, max_concurrency=1, retry_initial_wait=0.2)
    run = run_cli(tmp_path, settings_, env={"LOGLEVEL": "INFO"})
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    waits = [float(w) for w in re.findall(r"waiting (\d+\.\d+) s", run.stderr)]
    assert len(waits) == 2, run.stderr
    assert all(w >= 0.1 for w in waits), f"backoff switched off: {waits}"  # 0.2 s x [0.5, 1)


@pytest.mark.parametrize(
    ("header", "expected"),
    [("-5", None), ("nan", None), ("inf", None), ("1e400", None), ("-0", 0.0), ("7", 7.0),
     ("2.5", 2.5), ("soon", None), ("", None), (None, None)],
)  # fmt: skip
def test_retry_after_values(header: str | None, expected: float | None) -> None:
    assert retry_after_seconds(header) == expected


@settings(max_examples=300, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=12),
    retry_after=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    jitter=st.floats(min_value=0, max_value=0.999),
)
def test_retry_after_never_shortens_the_backoff(
    attempt: int, retry_after: float | None, jitter: float
) -> None:
    policy = RetryPolicy(max_tries=99, budget_seconds=1e12, initial_wait=1.0, jitter=lambda: jitter)
    backoff = policy.wait(attempt, 0, None)
    wait = policy.wait(attempt, 0, retry_after)
    assert backoff is not None
    assert wait is not None
    assert math.isfinite(wait)
    assert backoff <= wait <= policy.max_single_wait
    if retry_after is not None and math.isfinite(retry_after) and retry_after > backoff:
        assert wait == min(retry_after, policy.max_single_wait)


# --- Compressed bodies: bounded by the page asked for, and in total ------------


# Started from a small interpreter of its own: a child's peak RSS (ru_maxrss) includes
# the memory of the process it was forked from, and a pytest worker grows large.
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def run_measured(tmp_path: Path, config: dict[str, t.Any]) -> tuple[int, str, float]:
    """Run the tap; return its exit code, stderr and its own peak RSS in MiB."""
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, TAP, "--config", str(config_path)],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    code, peak_kib = result.stdout.split()
    return int(code), result.stderr, int(peak_kib) / 1024


def test_a_gzip_bomb_is_stopped_early_naming_compression(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    # After the first page, every response is 300 KB of gzip that inflates to
    # 300 MB (valid JSON): one per request in flight.
    server = make_server(1_000, faults=Faults(gzip_bomb_bytes=300_000_000))
    server.faults.on_list_page = lambda _: setattr(server.faults, "gzip_bomb_every", 1)
    code, stderr, peak_mib = run_measured(tmp_path, config_for(server, max_tries=1))
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if "| ERROR" in line]
    assert len(errors) == 1, stderr
    assert "gzip-compressed body inflated past" in errors[0]
    assert "far more than the 101 destinations asked for need" in errors[0]  # 100 + the anchor
    assert "lower page_size" not in errors[0]
    assert peak_mib < 150, f"peak RSS {peak_mib:.0f} MiB"


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=10_000),
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0, max_value=4_000)), max_size=40
    ),
)
def test_the_body_budget_never_counts_past_its_limit(
    limit: int, steps: list[tuple[bool, int]]
) -> None:
    budget = BodyBudget(limit)
    held: list[int] = []
    for take, size in steps:
        if take:
            fits = sum(held) + size <= limit
            assert budget.take(size) is fits
            if fits:
                held.append(size)
        elif held:
            budget.give_back(held.pop())
    for size in held:
        budget.give_back(size)
    assert budget.take(limit)  # everything given back: the whole budget is free again


@settings(max_examples=200, deadline=None)
@given(
    members=st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
    cut=st.integers(min_value=1, max_value=700),
    most=st.integers(min_value=1, max_value=5000),
    zlib_form=st.booleans(),
)
def test_the_bounded_inflater_gives_back_exactly_what_was_compressed(
    members: list[bytes],
    cut: int,
    most: int,
    zlib_form: bool,  # noqa: FBT001
) -> None:
    # Concatenated gzip members (or one zlib stream), fed in network-sized pieces,
    # inflated in steps of at most `most` bytes: the same bytes, none twice.
    if zlib_form:
        members = [b"".join(members)]
        wire = zlib.compress(members[0])
    else:
        wire = b"".join(gzip.compress(member) for member in members)
    inflater = Inflater()
    out = bytearray()
    for start in range(0, len(wire), cut):
        data = wire[start : start + cut]
        while data:
            chunk, data = inflater.inflate(data, most)
            assert len(chunk) <= most
            out += chunk
    out += inflater.finish()
    assert bytes(out) == b"".join(members)


def test_gzip_pages_are_read_whole(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    # Invoca's front end compresses; the tap inflates in bounded steps itself.
    server = make_server(1_000, faults=Faults(gzip_pages=True))
    run = run_cli(tmp_path, config_for(server, page_size=300))
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert run.records == server.expected_records()
