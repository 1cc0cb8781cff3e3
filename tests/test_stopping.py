"""Stopping: signals and a closed pipe end the sync fast, non-zero, with whole lines only."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
from frontends import SINGER
from helpers import clean_env, config_for, sigterm_once_asked, wait_until_blocked_writing
from invoca_server import Faults, InvocaServer

from tap_invoca_destinations.output import BufferedSingerWriter

if t.TYPE_CHECKING:
    from collections.abc import Callable

    from frontends import Frontend

TAP = str(Path(sys.executable).parent / "tap-invoca-destinations")


def read_slowly_then_signal(
    process: subprocess.Popen[bytes], signum: int, after_bytes: int
) -> tuple[bytes, float]:
    """Read stdout like a slow target; send the signal once `after_bytes` were read.

    Returns what stdout held in the end and the seconds from the signal to the exit.
    """
    assert process.stdout is not None
    out = bytearray()
    while len(out) < after_bytes:
        chunk = process.stdout.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            break
        out += chunk
        time.sleep(0.002)  # a target slower than the tap keeps the pipe full
    signalled = time.monotonic()
    process.send_signal(signum)
    out += process.stdout.read()
    process.wait(timeout=30)
    return bytes(out), time.monotonic() - signalled


def check_whole_lines_once(
    out: bytes, server: InvocaServer, frontend: Frontend
) -> list[dict[str, t.Any]]:
    assert out.endswith(b"\n"), "stdout ends in half a line"
    messages = frontend.parse(out)  # every line parses
    ids = [r["id"] for m in messages if (r := frontend.record_of(m)) is not None]
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert ids == server.ids()[: len(ids)], "records are not the list's first ones, in order"
    last_record = max(i for i, m in enumerate(messages) if m["type"] == "RECORD")
    after = [m for m in messages[last_record:] if m["type"] == "STATE"]
    if frontend.airbyte:  # a checkpoint may follow the last record, without a bookmark
        assert all(m["state"]["stream"]["stream_state"] == {} for m in after), after
    else:
        assert not after, "a STATE after the stop"
    return messages


@pytest.mark.parametrize(
    ("signum", "code", "unbuffered"),
    [
        (signal.SIGTERM, 143, False),
        (signal.SIGINT, 130, False),
        (signal.SIGTERM, 143, True),
        (signal.SIGINT, 130, True),
        (signal.SIGHUP, 129, False),  # a closed terminal or session
        (signal.SIGHUP, 129, True),
    ],
)
def test_signal_mid_sync_with_a_slow_target(  # noqa: PLR0913 - fixtures and parameters
    tmp_path: Path,
    make_server: Callable[..., InvocaServer],
    frontend: Frontend,
    *,
    signum: int,
    code: int,
    unbuffered: bool,
) -> None:
    server = make_server(20_000, faults=Faults(latency_ms=5))
    env = {"PYTHONUNBUFFERED": "1"} if unbuffered else {"PYTHONUNBUFFERED": ""}
    with frontend.start(tmp_path, config_for(server), env) as process:
        out, took = read_slowly_then_signal(process, signum, after_bytes=600_000)
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
    assert process.returncode == code, stderr
    assert took < 5, f"took {took:.1f} s to stop"
    messages = check_whole_lines_once(out, server, frontend)
    emitted = sum(m["type"] == "RECORD" for m in messages)
    assert 0 < emitted < 20_000
    assert signal.Signals(signum).name in stderr
    assert "Traceback" not in stderr


def test_signal_with_slow_requests_in_flight_stops_within_seconds(
    tmp_path: Path, make_server: Callable[..., InvocaServer], frontend: Frontend
) -> None:
    # Every page after the first takes 15 s: the sync is waiting on them. (By offset,
    # not by flipping a fault once the tap is up: a quick tap could read the whole
    # list before the flip.)
    faults = Faults(slow_starts=tuple(range(99, 2_000, 100)), slow_seconds=15)
    server = make_server(2_000, faults=faults)
    with frontend.start(tmp_path, config_for(server, page_size=100), {}) as process:
        assert process.stdout is not None
        first = process.stdout.readline()  # SCHEMA (Airbyte: STARTED): the tap is up
        assert json.loads(first)["type"] == ("TRACE" if frontend.airbyte else "SCHEMA")
        deadline = time.monotonic() + 20
        while server.stats.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats.in_flight > 0
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out = first + process.stdout.read()
        process.wait(timeout=30)
        took = time.monotonic() - signalled
    assert process.returncode == 143
    assert took < 8, f"took {took:.1f} s to stop with requests in flight"  # they take 15 s
    assert out.endswith(b"\n")
    assert all(json.loads(line)["type"] != "STATE" for line in out.splitlines())


def test_a_fatal_error_does_not_wait_for_slow_prefetches(
    tmp_path: Path, make_server: Callable[..., InvocaServer], frontend: Frontend
) -> None:
    # The second page (start=49) is refused (403) while the prefetches after it take
    # 15 s each (by offset, not by arrival order, which threads make a race).
    faults = Faults(fail_starts=(49,), fail_status=403, slow_starts=(99, 149, 199), slow_seconds=15)
    server = make_server(2_000, faults=faults)
    began = time.monotonic()
    with frontend.start(tmp_path, config_for(server, page_size=50), {}) as process:
        _, stderr = process.communicate(timeout=60)
    took = time.monotonic() - began
    assert process.returncode == 1
    assert took < 8, f"took {took:.1f} s to exit after a fatal error"
    assert "HTTP 403" in stderr.decode()


def test_a_target_gets_records_and_is_seen_to_stop_during_slow_pages(
    tmp_path: Path, make_server: Callable[..., InvocaServer], frontend: Frontend
) -> None:
    # 4 s a page of 10 records (~1 KB): held until 64 KiB filled, the first record
    # would take minutes to come out, and a target that stopped would be noticed
    # only then. While the tap waits, it writes out what it holds and looks at the pipe.
    server = make_server(100, faults=Faults(latency_ms=4000))  # ten pages: bounded if it regresses
    config = config_for(server, page_size=10, max_concurrency=1)
    began = time.monotonic()
    with frontend.start(tmp_path, config, {}) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        while frontend.record_of(json.loads(process.stdout.readline())) is None:
            pass
        first_record = time.monotonic() - began
        process.stdout.close()  # the target stops while the next page is on its way
        stopping = time.monotonic()
        process.wait(timeout=60)
        stopped = time.monotonic() - stopping
        stderr = process.stderr.read().decode()
    assert first_record < 12, f"the first record took {first_record:.1f} s"  # its page: 4 s
    assert process.returncode == 1
    assert stopped < 4, f"took {stopped:.1f} s to see the target had stopped"
    assert server.stats.requests <= 3  # no page read and thrown away long after
    assert "stdout was closed by its reader" in stderr
    assert "Traceback" not in stderr


def test_closed_pipe_ends_promptly_in_one_line(
    tmp_path: Path, make_server: Callable[..., InvocaServer], frontend: Frontend
) -> None:
    server = make_server(20_000)
    with frontend.start(tmp_path, config_for(server), {}) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.readline()
        process.stdout.close()  # the target exits early, like `tap ... | head -1`
        began = time.monotonic()
        process.wait(timeout=30)
        stderr = process.stderr.read().decode()
    assert process.returncode == 1
    assert time.monotonic() - began < 5
    assert "Traceback" not in stderr
    assert "Exception ignored" not in stderr
    stopped = [line for line in stderr.splitlines() if "stdout was closed" in line]
    assert len(stopped) == 1, stderr


def test_head_in_a_shell_pipeline(
    tmp_path: Path, make_server: Callable[..., InvocaServer], frontend: Frontend
) -> None:
    server = make_server(5_000)
    command = shlex.join(frontend.sync_command(tmp_path, config_for(server)))
    result = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command} | head -n 3"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert len(result.stdout.splitlines()) == 3
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "BrokenPipeError" not in result.stderr


def test_signal_while_the_target_reads_nothing_stops_after_the_grace_period(
    tmp_path: Path, make_server: Callable[..., InvocaServer], frontend: Frontend
) -> None:
    server = make_server(20_000)
    with frontend.start(tmp_path, config_for(server), {}) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        wait_until_blocked_writing(process)  # the pipe fills and the tap blocks writing to it
        assert process.poll() is None
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)  # nobody reads stdout until the tap is gone
        took = time.monotonic() - signalled
        out = process.stdout.read()
        stderr = process.stderr.read().decode()
    assert process.returncode == 143, stderr
    assert took < BufferedSingerWriter.STOP_GRACE_SECONDS + 3, f"took {took:.1f} s to stop"
    assert "SIGTERM" in stderr
    assert "Traceback" not in stderr
    # The abandoned write stopped at a line boundary, as the stop line says.
    assert "written so far is complete" in stderr
    assert len(check_whole_lines_once(out, server, frontend)) > 10


def nearly_full_pipe(room: int) -> tuple[int, int]:
    """A pipe (read end, write end) whose buffer has only ``room`` bytes left."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    os.write(write_end, b"-" * (fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) - room))
    os.set_blocking(write_end, True)
    return read_end, write_end


def wait_until_importing(process: subprocess.Popen[bytes]) -> None:
    """Return once ``process`` is inside the SDK's imports (its own handler not yet set)."""
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            if "_ssl" in maps.read_text():
                return
        time.sleep(0.001)


def test_a_stop_ends_the_sync_even_when_nobody_reads_stderr(
    tmp_path: Path, make_server: Callable[..., InvocaServer], frontend: Frontend
) -> None:
    # stderr's pipe is all but full and nobody reads it or stdout: the tap blocks
    # in a log line, the stop's own line blocks too, and only the backstop ends it.
    server = make_server(20_000)
    read_end, write_end = nearly_full_pipe(room=2000)
    try:
        with subprocess.Popen(
            frontend.sync_command(tmp_path, config_for(server)),
            stdout=subprocess.PIPE,
            stderr=write_end,
            env=clean_env(),
            cwd=tmp_path,
        ) as process:
            os.close(write_end)
            write_end = -1
            wait_until_blocked_writing(process)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.stdout is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)  # nobody reads stdout or stderr until it is gone
            took = time.monotonic() - signalled
            if process.poll() is None:
                process.kill()
            out = process.stdout.read()
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)
    writer = BufferedSingerWriter
    deadline = writer.STOP_GRACE_SECONDS + writer.EXIT_GRACE_SECONDS
    assert process.returncode == 143, f"exit {process.returncode} after {took:.1f} s"
    # Only the backstop could end it (the stop line cannot be written), at its deadline.
    assert deadline - 0.5 < took < deadline + 3, f"took {took:.1f} s"
    if out:  # whether records got out before stderr filled depends on the log lines' length
        check_whole_lines_once(out, server, frontend)


def test_sighup_during_start_up_is_one_line(tmp_path: Path, frontend: Frontend) -> None:
    config = {
        "api_token": "SECRET-hup-4c1d",
        "network_id": "1234",
        "base_url": "http://127.0.0.1:9",
    }
    with frontend.start(tmp_path, config) as process:
        wait_until_importing(process)
        process.send_signal(signal.SIGHUP)
        out, err = process.communicate(timeout=30)
    stderr = err.decode()
    program = "source-invoca-destinations" if frontend.airbyte else "tap-invoca-destinations"
    assert process.returncode == 129, stderr
    assert stderr.strip().splitlines() == [f"{program}: stopped by SIGHUP"]
    assert out == b""


def test_a_stop_during_start_up_with_no_room_in_stderr_skips_its_line(tmp_path: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"api_token": "x", "network_id": "1", "base_url": "x"}))
    read_end, write_end = nearly_full_pipe(room=0)
    try:
        with subprocess.Popen(
            [TAP, "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=write_end,
            env=clean_env(),
            cwd=tmp_path,
        ) as process:
            wait_until_importing(process)
            process.send_signal(signal.SIGHUP)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
            if process.poll() is None:
                process.kill()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert process.returncode == 129


def test_a_second_signal_changes_neither_the_grace_nor_the_exit_code(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    # The target reads nothing; SIGINT, then SIGTERM 3 s into the grace. The write is
    # abandoned 5 s after the first signal, with its code and the stop line; a second
    # signal restarting the grace let the backstop end the tap at 7 s, with no line.
    server = make_server(20_000)
    with SINGER.start(tmp_path, config_for(server)) as process:
        wait_until_blocked_writing(process)
        signalled = time.monotonic()
        process.send_signal(signal.SIGINT)
        time.sleep(3)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        took = time.monotonic() - signalled
    stderr = err.decode()
    assert process.returncode == 130, stderr
    assert "Sync stopped by SIGINT" in stderr
    assert took < BufferedSingerWriter.STOP_GRACE_SECONDS + 1.5, f"took {took:.1f} s"
    assert out.endswith(b"\n")


def test_a_signal_during_the_connection_test_is_one_line(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    # --test runs outside the sync (the SDK's CLI calls it directly).
    server = make_server(100, faults=Faults(slow_every=1, slow_seconds=20))
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_for(server)))
    run = sigterm_once_asked([TAP, "--config", str(config_path), "--test"], server, tmp_path)
    stderr = run.stderr.decode()
    assert run.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "tap-invoca-destinations: stopped by SIGTERM"


def test_a_non_blocking_stdout_with_a_slow_reader_gets_every_record(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    # The runner made the pipe non-blocking (O_NONBLOCK on the tap's end) and reads slowly.
    server = make_server(3_000)
    read_end, write_end = os.pipe()
    flags = fcntl.fcntl(write_end, fcntl.F_GETFL)
    fcntl.fcntl(write_end, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_for(server)))
    with subprocess.Popen(
        [TAP, "--config", str(config_path)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=tmp_path,
    ) as process:
        os.close(write_end)
        out = bytearray()
        with os.fdopen(read_end, "rb", buffering=0) as reader:
            while chunk := reader.read(8192):
                out += chunk
                time.sleep(0.001)  # slower than the tap: the pipe fills up
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        process.wait(timeout=60)
    assert process.returncode == 0, stderr
    assert "BlockingIOError" not in stderr
    assert out.endswith(b"\n")
    messages = [json.loads(line) for line in out.splitlines()]  # every line parses
    assert [m["record"]["id"] for m in messages if m["type"] == "RECORD"] == server.ids()
    assert messages[-1]["type"] == "STATE"
