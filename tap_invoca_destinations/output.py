"""Singer output: the message writer (msgspec, block-buffered RECORD lines, clean stops)."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import io
import os
import select
import signal
import stat
import sys
import termios
import threading
import time
import typing as t

import msgspec
from singer_sdk.singerlib.encoding.base import GenericSingerWriter
from singer_sdk.singerlib.messages import Message, RecordMessage

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override


def exit_code(signum: int) -> int:
    """The shell convention for a process ended by signal ``signum``: 128 + its number."""
    return 128 + signum


class SyncInterrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP arrived: the sync stops, exits 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        """Remember which signal stopped the sync."""
        super().__init__(signum)
        self.signum = signum
        self.cut_line = False  # an abandoned write left a line longer than PIPE_BUF cut

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by this signal (143, 130, 129)."""
        return exit_code(self.signum)

    @property
    def signal_name(self) -> str:
        """``SIGTERM``, ``SIGINT``, ..."""
        return signal.Signals(self.signum).name


class OutputClosed(Exception):  # noqa: N818 - it is a state of the world, not a bug
    """The reader of stdout (the target) went away: nothing more can be written."""


class Backstop:
    """Ends the process at a deadline once a stop signal came, whatever blocks its threads.

    A stop's last words go to readers that may have stopped reading: a write to a
    full stderr (or stdout) pipe, or a log call waiting for a thread stuck in one,
    never returns. ``trigger`` is safe in a signal handler: it takes no lock and
    writes one byte (the exit code) to a pipe. The thread reading that pipe,
    started beforehand by ``start``, then gives the process ``seconds`` to end on
    its own and calls ``os._exit(code)``. Only the first trigger counts.

    Only a process that is the tap should start it (the CLIs do): in a host that
    merely creates a tap, a Ctrl-C would otherwise end the host too.
    """

    def __init__(self) -> None:
        """Not started: ``trigger`` does nothing until ``start``."""
        self._write_fd: int | None = None
        self._owner = 0  # the pid that started it: a forked child's trigger is not its own

    def start(self, seconds: float) -> None:
        """Start the waiting thread with its deadline (once; before any handler may trigger it)."""
        if self._write_fd is not None and self._owner == os.getpid():
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._write_fd, self._owner = write_fd, os.getpid()  # the pipe keeps an early trigger
        threading.Thread(
            target=self._wait, args=(read_fd, seconds), name="invoca-backstop", daemon=True
        ).start()

    def trigger(self, code: int) -> None:
        """Exit with ``code`` at the deadline unless the process has ended by then."""
        if self._write_fd is None or self._owner != os.getpid():
            return
        with contextlib.suppress(OSError):  # full after ~64,000 signals: the first one counts
            os.write(self._write_fd, bytes([code]))

    @staticmethod
    def _wait(read_fd: int, seconds: float) -> None:
        code = os.read(read_fd, 1)
        if code:
            time.sleep(seconds)
            os._exit(code[0])


BACKSTOP = Backstop()


RECORD_PLACEHOLDER = "\0record\0"  # stands for each record in BufferedSingerWriter.frame


def checkpoint_runs(
    records: list[dict[str, t.Any]], done: int, every: int
) -> t.Iterator[tuple[list[dict[str, t.Any]], bool]]:
    """Cut a page of records (``done`` came before) where the count reaches a multiple of ``every``.

    Yields each run and whether a checkpoint falls right after it.
    """
    start, size = 0, len(records)
    while start < size:
        stop = min(size, start + every - (done + start) % every)
        yield (
            (records if start == 0 and stop == size else records[start:stop]),
            ((done + stop) % every == 0),
        )
        start = stop


def _encode_other(value: object) -> str:
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _PipeRoom:
    """How many bytes a pipe takes now without blocking (0 if unknown: a socket, say).

    The pipe is widened to 1 MiB where the system allows it, so that a block of
    lines usually fits and goes out in one write.
    """

    WANTED_CAPACITY = 1 << 20

    def __init__(self, fd: int) -> None:
        """Measure (and widen) the pipe behind ``fd``."""
        self.fd = fd
        self.capacity = 0
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, self.WANTED_CAPACITY)
        with contextlib.suppress(OSError, AttributeError):
            self.capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)

    def __call__(self) -> int:
        """Free bytes in the pipe: its capacity less what the reader has not read yet."""
        if not self.capacity:
            return 0
        try:
            waiting = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return self.capacity - int.from_bytes(waiting, sys.byteorder)


def _line_chunks(data: bytes, size: int) -> t.Iterator[memoryview]:
    """Cut ``data`` (whole lines) into runs of whole lines of at most ``size`` bytes.

    A line longer than ``size`` is a run of its own.
    """
    view = memoryview(data)
    start, end = 0, len(data)
    while start < end:
        stop = data.rfind(b"\n", start, start + size) + 1
        if stop <= start:  # one line longer than size
            stop = data.find(b"\n", start + size) + 1 or end
        yield view[start:stop]
        start = stop


def _fileno(stream: object) -> int | None:
    try:
        return t.cast("io.TextIOBase", stream).fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None  # a StringIO or test stand-in: write through its own methods


class BufferedSingerWriter(GenericSingerWriter[bytes, Message]):
    """Writes Singer messages with msgspec's JSON encoder, flushing only where it matters.

    The SDK's default writer encodes with simplejson and flushes stdout after
    every message. Here RECORD lines collect in a buffer of the writer's own
    and go out in blocks of whole lines; every other message (SCHEMA, STATE,
    ...) writes the buffer out first, so a STATE is never visible ahead of the
    records it covers. Blocks are written to stdout's file descriptor until
    every byte is out: with ``PYTHONUNBUFFERED=1`` stdout is a raw file whose
    writes may be partial, and a runner may have made it non-blocking. To a pipe
    or socket, each write holds whole lines and at most ``PIPE_BUF`` bytes, which
    a pipe takes whole or not at all. A stop signal that arrives while a block
    is being written is held until the current write is complete (see
    ``interrupt``), so stdout never holds half a line or a line twice; a target
    that has stopped reading altogether gets ``STOP_GRACE_SECONDS``, then the
    write is abandoned, still at a line boundary.
    """

    BLOCK_BYTES = 64 * 1024
    STOP_GRACE_SECONDS = 5.0  # how long a held stop waits for a target that has stopped reading
    EXIT_GRACE_SECONDS = 2.0  # then for the last log lines, before ``BACKSTOP`` ends the process

    def __init__(self) -> None:
        """Create the encoder and the output buffer."""
        self._fd: int | None = None  # stdout's file descriptor, as last seen
        self._pipe = False  # it is a pipe or a socket
        self._room: _PipeRoom | None = None
        self._encoder = msgspec.json.Encoder(enc_hook=_encode_other)
        self._placeholder = self._encoder.encode(RECORD_PLACEHOLDER)
        self._pending = bytearray()
        self._writing = False
        self._held_signal: int | None = None
        self._stopping: int | None = None  # the signal that stopped the sync, once one did
        self._closed = False

    @override
    def serialize_message(self, message: Message) -> bytes:
        return self._encoder.encode(message.to_dict())

    @override
    def write_message(self, message: Message) -> None:
        self._write(message.to_dict(), flush=not isinstance(message, RecordMessage))

    def write_record(self, message: dict[str, t.Any]) -> None:
        """Write an already-built RECORD message dict (buffered; see class docstring)."""
        self._write(message, flush=False)

    def write_records(self, records: list[dict[str, t.Any]], head: bytes, tail: bytes) -> None:
        """Write one line per record, ``head`` + the record's JSON + ``tail`` (buffered).

        A page's records are encoded in one call: ``head`` and ``tail`` are the
        JSON of the message around the record (``{"type":"RECORD",...,"record":``
        and ``,"time_extracted":...}``), the same for every record of the page.
        """
        if not records:
            return
        lines = self._encoder.encode_lines(records)
        # Compact JSON never holds a raw newline, so each one ends a record.
        self._pending += head + lines[:-1].replace(b"\n", tail + b"\n" + head) + tail + b"\n"
        if len(self._pending) >= self.BLOCK_BYTES:
            self.flush(to_stdout=False)

    def frame(self, message: dict[str, t.Any]) -> tuple[bytes, bytes]:
        """``message``'s JSON cut around its ``RECORD_PLACEHOLDER``: the ``head`` and ``tail``."""
        placeholder = self._placeholder
        head, found, tail = self._encoder.encode(message).partition(placeholder)
        if not found or placeholder in tail:
            msg = "the message must hold RECORD_PLACEHOLDER exactly once"
            raise ValueError(msg)
        return head, tail

    def _write(self, message: dict[str, t.Any], *, flush: bool) -> None:
        pending = self._pending
        mark = len(pending)
        try:
            self._encoder.encode_into(message, pending, -1)
            pending.extend(b"\n")
        except BaseException:
            del pending[mark:]  # an interrupted or failed encode leaves no partial line
            raise
        if flush or len(pending) >= self.BLOCK_BYTES:
            self.flush(to_stdout=flush)

    def flush(self, *, to_stdout: bool = True) -> None:
        """Write out the buffered lines, and flush stdout itself unless told not to.

        Raises:
            OutputClosed: If stdout's reader has gone away (a broken pipe).
        """
        if self._closed:
            return
        self._writing = True
        try:
            if self._pending:
                self._write_out(bytes(self._pending))
                self._pending.clear()
            out = sys.stdout
            if to_stdout and out is not None and _fileno(out) is None:
                t.cast("t.IO[bytes]", getattr(out, "buffer", out)).flush()
        except BrokenPipeError:
            self._reader_gone()
        except (SyncInterrupted, OutputClosed):
            self._closed = True  # the write was abandoned: nothing more may follow it
            self._pending.clear()
            raise
        finally:
            self._writing = False
        self._raise_held_signal()

    def idle(self) -> None:
        """While the tap waits (a slow page, a backoff): write out the lines held, see the reader.

        A target then gets its records without waiting for a full block, and a
        reader that has gone is noticed within the wait rather than at the next
        block of lines (stdout a pipe or a Unix socket: polled, nothing written; a
        TCP peer's close shows only when a write meets it).

        Raises:
            OutputClosed: If stdout's reader has gone away.
        """
        if self._pending:
            self.flush(to_stdout=False)
        fd = _fileno(sys.stdout)
        if self._closed or fd is None or not _is_pipe(fd) or not hasattr(select, "poll"):
            return
        watch = select.poll()
        watch.register(fd, 0)  # POLLERR and POLLHUP are always reported
        if any(events & (select.POLLERR | select.POLLHUP) for _, events in watch.poll(0)):
            self._reader_gone()

    def _reader_gone(self) -> t.NoReturn:
        self._closed = True
        self._pending.clear()
        _silence_stdout()
        msg = "stdout was closed by its reader (the target stopped)"
        raise OutputClosed(msg) from None

    def _write_out(self, data: bytes) -> None:
        out = sys.stdout
        if out is None:  # started with stdout closed (`>&-`)
            msg = "stdout is closed: there is nothing to write the Singer messages to"
            raise OutputClosed(msg)
        fd = _fileno(out)
        if fd is None:
            binary = getattr(out, "buffer", None)
            if binary is None:
                out.write(data.decode())
            else:
                binary.write(data)
            return
        out.flush()  # anything written through sys.stdout itself goes first
        if self._fd != fd:
            self._fd, self._pipe = fd, _is_pipe(fd)
            self._room = _PipeRoom(fd) if self._pipe else None
        # A file or a terminal: a signal does not cut a write short. A pipe with room
        # for the whole block takes it at once, without blocking, so nothing can cut it.
        if not self._pipe or (self._room is not None and self._room() >= len(data)):
            self._write_all(fd, memoryview(data))
            return
        for chunk in _line_chunks(data, select.PIPE_BUF):
            self._write_all(fd, chunk)
            if self._held_signal is not None:
                return  # stop now, at a line boundary: the rest is not sent

    @staticmethod
    def _write_all(fd: int, view: memoryview) -> None:
        size = len(view)
        try:
            while view:
                try:
                    view = view[os.write(fd, view) :]  # os.write may write only part
                except BlockingIOError:  # a non-blocking stdout that is full: wait for room
                    select.select([], [fd], [])
        except SyncInterrupted as exc:
            exc.cut_line = 0 < len(view) < size
            raise

    def interrupt(self, signum: int) -> None:
        """Stop the sync for a signal; called from the signal handler.

        Raises ``SyncInterrupted`` at once, unless a block is being written: then
        the signal is held and raised as soon as the block is complete. Either
        way ``BACKSTOP`` ends the process ``STOP_GRACE_SECONDS`` +
        ``EXIT_GRACE_SECONDS`` after the signal if it has not ended by then.
        Only the first signal counts: a second one neither restarts the grace
        nor changes the exit code.

        Raises:
            SyncInterrupted: When it is safe to stop.
        """
        if self._stopping is not None:
            return  # a stop is under way: its signal, its grace and its exit code stand
        self._stopping = signum
        BACKSTOP.trigger(exit_code(signum))
        if self._writing:
            self._held_signal = signum
            # A target that has stopped reading would hold the write, and so the
            # stop, forever: give it STOP_GRACE_SECONDS, then abandon the write.
            signal.signal(signal.SIGALRM, self._abandon_write)
            signal.setitimer(signal.ITIMER_REAL, self.STOP_GRACE_SECONDS)
            return
        raise SyncInterrupted(signum)

    def _abandon_write(self, _alarm: int, _frame: object) -> None:
        signum, self._held_signal = self._held_signal, None
        raise SyncInterrupted(signum or signal.SIGTERM)

    def _raise_held_signal(self) -> None:
        signum, self._held_signal = self._held_signal, None
        if signum is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise SyncInterrupted(signum)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's exit flush does not fail again."""
    fd = _fileno(sys.stdout)
    if fd is not None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
