"""The Singer output: records go out in blocks, never behind a STATE, never lost on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as t

import pytest
from helpers import config_for, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from singer_sdk.singerlib.messages import StateMessage

from tap_invoca_destinations import output
from tap_invoca_destinations.output import BufferedSingerWriter, _line_chunks

if t.TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from invoca_server import InvocaServer


class RecordingStdout:
    """A stand-in for sys.stdout that keeps every write and flush, in order."""

    def __init__(self) -> None:
        self.buffer = self
        self.events: list[bytes | str] = []

    def write(self, data: bytes) -> int:
        self.events.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        self.events.append("flush")

    def lines(self) -> list[dict[str, t.Any]]:
        text = b"".join(e for e in self.events if isinstance(e, bytes)).decode()
        return [json.loads(line) for line in text.splitlines()]


def record_message(number: int) -> dict[str, t.Any]:
    return {"type": "RECORD", "stream": "destinations", "record": {"id": number, "pad": "x" * 900}}


def test_records_are_written_in_blocks_and_state_flushes_them_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = RecordingStdout()
    monkeypatch.setattr("sys.stdout", out)
    writer = BufferedSingerWriter()
    for number in range(10):
        writer.write_record(record_message(number))
    assert out.events == []  # ten small lines stay buffered
    for number in range(10, 300):
        writer.write_record(record_message(number))
    blocks = [e for e in out.events if isinstance(e, bytes)]
    assert 2 <= len(blocks) < 10  # about 280 KB in 64 KiB blocks, not a write per line
    assert all(len(b) >= BufferedSingerWriter.BLOCK_BYTES for b in blocks)
    assert all(b.endswith(b"\n") for b in blocks)  # blocks end on whole lines
    writer.write_message(StateMessage(value={"bookmarks": {}}))
    assert out.events[-1] == "flush"
    messages = out.lines()
    assert [m["record"]["id"] for m in messages[:-1]] == list(range(300))
    assert messages[-1]["type"] == "STATE"


def test_records_before_a_failure_are_written_without_a_state_after_them(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    server = make_server(250)
    victim = server.ids()[120]
    wire = server.wire_record(victim)
    wire["dynamic_number_pool"] = {"max_pool_size": "twelve"}
    server.set_wire(victim, wire)
    run = run_cli(
        tmp_path,
        config_for(server, page_size=50, max_concurrency=1),
        env={"PYTHONUNBUFFERED": "1"},  # stdout unbuffered: only the writer's own buffer holds them
    )
    assert run.returncode == 1
    messages = [json.loads(line) for line in run.stdout.splitlines()]
    records = [m["record"]["id"] for m in messages if m["type"] == "RECORD"]
    assert records == server.ids()[:120]
    last_record = max(i for i, m in enumerate(messages) if m["type"] == "RECORD")
    assert all(m["type"] != "STATE" for m in messages[last_record:])


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=300), max_size=60),
    size=st.integers(min_value=1, max_value=512),
)
def test_pipe_writes_are_runs_of_whole_lines_within_the_atomic_size(
    lengths: list[int], size: int
) -> None:
    data = b"".join(b"x" * n + b"\n" for n in lengths)
    chunks = [bytes(chunk) for chunk in _line_chunks(data, size)]
    assert b"".join(chunks) == data
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= size or chunk.count(b"\n") == 1  # only a long line alone


def test_a_block_goes_to_a_pipe_with_room_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # Writes of PIPE_BUF each cost a system call (and a GIL hand-over) per 4 KiB;
    # a pipe with room for the block takes it whole, so nothing can cut it short.
    read_end, write_end = os.pipe()
    sizes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        sizes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(output.os, "write", counting_write)
    with open(write_end, "w", closefd=True) as pipe:  # noqa: PTH123 - a pipe, not a path
        monkeypatch.setattr(sys, "stdout", pipe)
        writer = BufferedSingerWriter()
        record = {"id": 1, "name": "x" * 500}
        for _ in range(200):  # about 100 KB: more than one block
            writer.write_record({"type": "RECORD", "stream": "s", "record": record})
        writer.flush()
    with open(read_end, "rb") as reader:  # noqa: PTH123
        lines = reader.read().splitlines()
    assert len(lines) == 200
    assert max(sizes) > BufferedSingerWriter.BLOCK_BYTES // 2
    assert len(sizes) <= 3


def test_idle_writes_out_the_lines_held_and_sees_a_reader_that_has_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with open(write_end, "w", closefd=True) as pipe:  # noqa: PTH123 - a pipe, not a path
        monkeypatch.setattr(sys, "stdout", pipe)
        writer = BufferedSingerWriter()
        writer.write_record(record_message(1))
        with pytest.raises(BlockingIOError):
            os.read(read_end, 65536)  # held: less than a block
        writer.idle()
        assert json.loads(os.read(read_end, 65536))["record"]["id"] == 1
        writer.idle()  # nothing held, the reader still there: nothing happens
        with pytest.raises(BlockingIOError):
            os.read(read_end, 65536)
        os.close(read_end)  # the target stops
        with pytest.raises(output.OutputClosed, match="closed by its reader"):
            writer.idle()  # seen without writing a byte
        writer.write_record(record_message(2))
        writer.flush()  # closed: nothing more is written, nothing raised


BACKSTOP_SCRIPT = """
import sys, time
from tap_invoca_destinations.output import Backstop
import os
backstop = Backstop()
case = sys.argv[1]
if case != "not started":
    backstop.start(0.2)
if case == "forked":
    child = os.fork()
    if child == 0:  # the child's stop is not the parent's
        backstop.trigger(59)
        os._exit(0)
    os.waitpid(child, 0)
else:
    backstop.trigger(57)
    backstop.trigger(58)  # a second signal: the first one's code stands
time.sleep(3 if case == "started" else 0.5)
print("slept")
"""


@pytest.mark.parametrize(("case", "code"), [("started", 57), ("not started", 0), ("forked", 0)])
def test_the_backstop_ends_only_its_own_process_at_its_deadline_once_started(
    case: str, code: int
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", BACKSTOP_SCRIPT, case],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == code, run.stderr
    if code:
        assert run.stdout == ""  # it ended the process 0.2 s into a 3 s sleep
    else:
        assert run.stdout == "slept\n"


def test_a_stop_before_the_tap_has_its_writer_stops_the_sync() -> None:
    # The SDK installs the tap's signal handler before it creates the message writer.
    import signal  # noqa: PLC0415 - only this test needs it

    from tap_invoca_destinations.tap import TapInvocaDestinations  # noqa: PLC0415

    tap = object.__new__(TapInvocaDestinations)
    with pytest.raises(output.SyncInterrupted) as stopped:
        tap._handle_termination(signal.SIGTERM, None)
    assert stopped.value.exit_code == 143
