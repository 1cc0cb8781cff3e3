"""Singer output: the message writer (msgspec encoding, block-buffered RECORD lines)."""

from __future__ import annotations

import datetime as dt
import sys
import typing as t

import msgspec
from singer_sdk.singerlib.encoding.base import GenericSingerWriter
from singer_sdk.singerlib.messages import Message, RecordMessage

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override


def _encode_other(value: object) -> str:
    return value.isoformat() if isinstance(value, dt.datetime) else str(value)


class BufferedSingerWriter(GenericSingerWriter[bytes, Message]):
    """Writes Singer messages with msgspec's JSON encoder, flushing only where it matters.

    The SDK's default writer encodes with simplejson and flushes stdout after
    every message. Here RECORD lines collect in a buffer of the writer's own
    (stdout itself may be unbuffered, as under ``PYTHONUNBUFFERED=1``, which
    would cost a system call per record) and go out in blocks; every other
    message (SCHEMA, STATE, ...) writes the buffer and flushes stdout, so a STATE
    is never visible ahead of the records it covers. msgspec is the SDK's own
    optional encoder (its ``msgspec`` extra), several times faster than the
    stdlib's on our records.
    """

    BLOCK_BYTES = 64 * 1024

    def __init__(self) -> None:
        """Create the encoder and the output buffer."""
        self._encoder = msgspec.json.Encoder(enc_hook=_encode_other)
        self._pending = bytearray()

    @override
    def serialize_message(self, message: Message) -> bytes:
        return self._encoder.encode(message.to_dict())

    @override
    def write_message(self, message: Message) -> None:
        self._write(message.to_dict(), flush=not isinstance(message, RecordMessage))

    def write_record(self, message: dict[str, t.Any]) -> None:
        """Write an already-built RECORD message dict (buffered; see class docstring)."""
        self._write(message, flush=False)

    def _write(self, message: dict[str, t.Any], *, flush: bool) -> None:
        self._encoder.encode_into(message, self._pending, -1)
        self._pending.extend(b"\n")
        if flush or len(self._pending) >= self.BLOCK_BYTES:
            self.flush(to_stdout=flush)

    def flush(self, *, to_stdout: bool = True) -> None:
        """Write out the buffered lines, and flush stdout itself unless told not to."""
        out = sys.stdout
        binary = getattr(out, "buffer", None)  # absent when stdout is redirected to a StringIO
        if self._pending:
            if binary is None:
                out.write(self._pending.decode())
            else:
                binary.write(self._pending)
            self._pending.clear()
        if to_stdout:
            (binary or out).flush()
