"""The seam to singer-sdk: every use of its private names, in one place.

The rest of the package uses public SDK API only. Each override below says in
one line where the public API falls short; all were read against the singer-sdk
version in ``SDK_VERSION_CHECKED``. To upgrade the SDK, follow
``docs/sdk-upgrade.md``: re-read each override against the new SDK source, then
run ``tests/test_parity.py``, which compares the fast record path with the
SDK's own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import typing as t
from pathlib import Path

from dotenv import dotenv_values
from singer_sdk import Tap
from singer_sdk.exceptions import ConfigValidationError
from singer_sdk.helpers._classproperty import classproperty
from singer_sdk.mapper import SameRecordTransform
from singer_sdk.streams import RESTStream

from tap_invoca_destinations.output import (
    BACKSTOP,
    RECORD_PLACEHOLDER,
    BufferedSingerWriter,
    OutputClosed,
    SyncInterrupted,
    checkpoint_runs,
    exit_code,
)

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override

if t.TYPE_CHECKING:
    from types import FrameType

    from singer_sdk.helpers._batch import BatchConfig
    from singer_sdk.helpers.types import Context

SDK_VERSION_CHECKED = "0.54.9"


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


def _typed_env_value(kinds: set[str], value: str) -> tuple[t.Any, str | None]:  # noqa: PLR0911
    """Return the setting's value, or ``(None, what was expected)``."""
    text = value.strip()
    if "string" in kinds or not kinds & {"integer", "number", "boolean", "object", "array"}:
        return value, None
    if "integer" in kinds:
        return (int(text), None) if _INTEGER.match(text) else (None, "an integer")
    if "number" in kinds:
        if not _NUMBER.match(text) or not math.isfinite(float(text)):
            return None, "a number"
        number = float(text)
        return int(number) if number.is_integer() and abs(number) < 2**53 else number, None
    if "boolean" in kinds:
        lowered = text.lower()
        return (lowered in _TRUE, None) if lowered in _TRUE | _FALSE else (None, "true or false")
    try:
        return json.loads(value), None
    except ValueError:
        return None, f"JSON (an {'/'.join(sorted(kinds - {'null'}))})"


def environment_config(
    schema: dict[str, t.Any], prefix: str, cwd: Path | None = None
) -> tuple[dict[str, t.Any], list[str]]:
    """Read ``<PREFIX><SETTING>`` variables as typed settings, and name each bad one.

    The variables come from the environment and, for those it lacks, from a
    ``.env`` file in the working directory (the shell wins over the file).
    """
    dotenv = (cwd or Path.cwd()) / ".env"
    environ = {
        **(dotenv_values(dotenv) if dotenv.is_file() else {}),
        **os.environ,
    }
    config: dict[str, t.Any] = {}
    errors = []
    for key, prop in schema["properties"].items():
        name = f"{prefix}{key.upper()}"
        value = environ.get(name)
        if value is None:
            continue
        types = prop.get("type", [])
        typed, expected = _typed_env_value({types} if isinstance(types, str) else set(types), value)
        if expected is None:
            config[key] = typed
        else:
            errors.append(f"{name} must be {expected}")
    return config, errors


# SDK log lines that ask nothing of a user here: the bookmark of the unsorted
# stream is handed over once, complete; env settings are read with --config ENV.
_SDK_NOISE = (
    "Stream is assumed to be unsorted",
    "Skipping parse of env var settings",
    "Parsing env var for settings config",
)


def _drop_sdk_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_SDK_NOISE)


def setup_console_logging(plugin_name: str) -> None:
    """Log to stderr as the SDK's CLI does (its format; LOGLEVEL), for another front end."""
    # Imported here: a rename in a new SDK must not break the Singer tap's import.
    from singer_sdk._logging import _setup_console_logging  # noqa: PLC0415
    from singer_sdk.plugin_base import _plugin_log_level  # noqa: PLC0415

    _setup_console_logging(log_level=_plugin_log_level(plugin_name=plugin_name))


class SeamTap(Tap):
    """Tap base: config parsing and validation, and what a stop signal does."""

    message_writer_class = BufferedSingerWriter

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Create the tap, without the SDK's log lines that need no action."""
        for logger in (logging.getLogger("singer_sdk"), self.logger):
            if _drop_sdk_noise not in logger.filters:
                logger.addFilter(_drop_sdk_noise)
        super().__init__(*args, **kwargs)

    @classproperty
    def _env_var_config(cls) -> dict[str, t.Any]:  # noqa: N805
        # The SDK parses integers with a bare int() (a traceback), leaves numbers
        # as strings, takes any boolean it does not know ("maybe") as false, and
        # lets a .env found above its own package override the shell.
        config, errors = environment_config(cls.settings_schema(), cls._env_var_prefix)
        if errors:
            msg = "Config validation failed"
            raise ConfigValidationError(msg, errors=errors)
        return config

    @override
    def _validate_config(self, *, raise_errors: bool = True) -> list[str]:
        # The SDK's messages quote offending values (a mistyped api_token would be
        # printed) and cannot express cross-setting rules: see config_errors.
        self.normalize_config(self._config)
        errors = self.config_errors(self._config)
        if errors and raise_errors:
            msg = "Config validation failed"
            raise ConfigValidationError(msg, errors=errors)
        for error in errors:
            self.logger.warning("Config: %s", error)
        for warning in self.config_warnings(self._config):
            self.logger.warning("Config: %s", warning)
        return errors

    @override
    def _setup_signal_handlers(self) -> None:
        # The SDK handles SIGINT and SIGTERM; a closed terminal or session (SIGHUP)
        # would otherwise end the tap with no word and maybe half a line on stdout.
        super()._setup_signal_handlers()
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._handle_termination)

    @override
    def _handle_termination(self, signum: int, frame: FrameType | None) -> None:
        # The SDK writes a STATE from inside the handler (possibly in the middle of
        # a write) and exits 0; a stopped sync is not a success.
        writer = getattr(self, "message_writer", None)
        if not isinstance(writer, BufferedSingerWriter):  # the SDK sets the handler first
            BACKSTOP.trigger(exit_code(signum))
            raise SyncInterrupted(signum)
        writer.interrupt(signum)

    @classmethod
    def settings_schema(cls) -> dict[str, t.Any]:
        """The settings' JSON schema, with the SDK's built-in settings (stream maps, ...)."""
        cls.append_builtin_config(cls.config_jsonschema)  # adds only what is missing
        return cls.config_jsonschema

    def normalize_config(self, config: dict[str, t.Any]) -> None:
        """Tidy config values in place before validation (a hook for the tap)."""

    def config_errors(self, config: dict[str, t.Any]) -> list[str]:  # noqa: ARG002
        """Return one message per bad setting, naming the key (a hook for the tap)."""
        return []

    def config_warnings(self, config: dict[str, t.Any]) -> list[str]:  # noqa: ARG002
        """Return one message per doubtful but usable setting (a hook for the tap)."""
        return []


def _drop_sdk_unhandled_error_line(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("An unhandled error occurred while syncing")


class SeamStream(RESTStream[int]):
    """Stream base: the fast record path, bookmark hand-over and mirror-mode ordering.

    ``FAST_RECORD_PATH`` off sends every record through the SDK's own path; the
    parity tests compare both.
    """

    FAST_RECORD_PATH = True

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Initialise the stream and the seam's own state."""
        super().__init__(*args, **kwargs)
        # Stream.sync logs its own ERROR line before re-raising; the tap reports
        # every failure in one line of its own (TapInvocaDestinations.invoke).
        self.logger.addFilter(_drop_sdk_unhandled_error_line)
        self._direct_write: bool | None = None
        self._deferred_version: int | None = None
        self.time_extracted = ""  # RFC 3339; set by the stream per page
        self.committed_bookmark: str | None = None  # what commit_bookmark handed over

    @property
    def plugin_version(self) -> str:
        """The tap's version (for the User-Agent header)."""
        return str(self._tap.plugin_version)

    def output_idle(self) -> None:
        """Called while waiting for pages: see ``BufferedSingerWriter.idle``.

        Raises:
            OutputClosed: If the output has no reader any more.
        """
        writer = self._tap.message_writer
        if isinstance(writer, BufferedSingerWriter):
            writer.idle()

    # --- records -------------------------------------------------------------

    def record_pages(self, context: Context | None) -> t.Iterator[list[dict[str, t.Any]]]:
        """The stream's records, a page at a time (a stream's ``get_records`` flattens them).

        A stream that implements it has its pages written whole by the fast record path.
        """
        raise NotImplementedError

    @override
    def _write_record_message(self, record: dict[str, t.Any]) -> None:
        # The SDK copies and walks every record (deselection, conformance) and
        # builds a message object for it; shaped records need none of that, so
        # unless stream maps, flattening or deselection are in play they go out directly.
        if self._direct_write is None:
            self._direct_write = self._can_write_directly()
        if not self._direct_write:
            super()._write_record_message(record)
            return
        message: dict[str, t.Any] = {"type": "RECORD", "stream": self.name, "record": record}
        if self._stream_version is not None:
            message["version"] = self._stream_version
        message["time_extracted"] = self.time_extracted
        t.cast("BufferedSingerWriter", self._tap.message_writer).write_record(message)
        self.state_manager.is_flushed = False

    def _can_write_directly(self) -> bool:
        maps = self.stream_maps
        return (
            self.FAST_RECORD_PATH
            and isinstance(self._tap.message_writer, BufferedSingerWriter)
            and len(maps) == 1
            and type(maps[0]) is SameRecordTransform
            and maps[0].stream_alias == self.name
            and not self.config.get("flattening_enabled")
            and all(self.mask.get(("properties", name), True) for name in self.schema["properties"])
        )

    @override
    def _process_record(
        self,
        record: dict[str, t.Any],
        child_context: Context | None = None,
        partition_context: Context | None = None,
    ) -> None:
        # The SDK builds a child context per record for child streams and
        # partitions; a stream with neither has nothing to do here.
        if not self.FAST_RECORD_PATH or self.child_streams or partition_context:
            super()._process_record(record, child_context, partition_context)

    # --- bookmarks -----------------------------------------------------------

    @override
    def _increment_stream_state(
        self, latest_record: dict[str, t.Any], *, context: Context | None = None
    ) -> None:
        # Called per record; an unsorted stream's bookmark depends only on the
        # greatest value, which the stream tracks and hands over with commit_bookmark.
        self.observe_replication_value(latest_record.get(t.cast("str", self.replication_key)))

    def observe_replication_value(self, value: t.Any) -> None:  # noqa: ANN401
        """Note an emitted record's replication key value, or the greatest of a page's.

        A hook for the stream; None stands for no value.
        """

    def pages_for_another_front_end(self) -> t.Iterator[list[dict[str, t.Any]]]:
        """The stream's record pages, with its bookmark kept as the SDK's sync keeps it.

        For a front end other than the SDK's sync (the Airbyte source): Stream.sync
        first loads the state's bookmark (a private step), then notes each record's
        replication value; this does both around ``record_pages``.
        """
        self._write_starting_replication_value(None)
        incremental = self.replication_method == "INCREMENTAL"
        for records in self.record_pages(None):
            if incremental:
                self._observe_page(records)
            yield records

    def _observe_page(self, records: list[dict[str, t.Any]]) -> None:
        key = self.replication_key
        if key is not None:
            self.observe_replication_value(
                max((v for record in records if (v := record.get(key)) is not None), default=None)
            )

    def commit_bookmark(self, value: str) -> None:
        """Hand the sync's bookmark to the SDK's state machinery, once per sync."""
        key = t.cast("str", self.replication_key)
        self.committed_bookmark = value
        super()._increment_stream_state({key: value}, context=self.context)

    # --- mirror mode: ACTIVATE_VERSION only after a complete read ------------

    @override
    def _write_activate_version_message(self, full_table_version: int) -> None:
        # The SDK sends this before the records; a target that acts on it deletes
        # or flags live rows when the run then fails. Held until the list is read.
        self._deferred_version = full_table_version

    @override
    def _sync_records(
        self,
        context: Context | None = None,
        *,
        write_messages: bool = True,
    ) -> t.Generator[dict[str, t.Any], t.Any, t.Any]:
        # Wrapped to send the held ACTIVATE_VERSION once every record is out, and
        # to write out records buffered ahead of a failure or a stop (whole lines,
        # no STATE after them).
        try:
            if write_messages and self._can_sync_pages(context):
                yield from self._sync_pages()
            else:
                yield from super()._sync_records(context, write_messages=write_messages)
        finally:
            with contextlib.suppress(OutputClosed):
                t.cast("BufferedSingerWriter", self._tap.message_writer).flush()
        if write_messages:
            self._activate_held_version()

    def _can_sync_pages(self, context: Context | None) -> bool:
        return (
            context is None
            and type(self).record_pages is not SeamStream.record_pages
            and type(self).post_process is RESTStream.post_process
            and self.selected
            and not self.child_streams
            and not self.partitions
            and self.ABORT_AT_RECORD_COUNT is None
            and self._get_state_partition_context(None) is None
            and self._can_write_directly()
        )

    def _sync_pages(self) -> t.Iterator[dict[str, t.Any]]:
        """``Stream._sync_records`` for a plain stream, with its per-record steps done per page.

        The SDK's loop costs ~3 us a record in calls (limit check, hooks, counter,
        message); here a page is one write, one counter step and one bookmark note.
        """
        writer = t.cast("BufferedSingerWriter", self._tap.message_writer)
        every = self.STATE_MSG_FREQUENCY
        message: dict[str, t.Any] = {"type": "RECORD", "stream": self.name}
        message["record"] = RECORD_PLACEHOLDER
        if self._stream_version is not None:
            message["version"] = self._stream_version
        done = 0
        record_counter, timer = self.get_record_counter(), self.get_sync_timer()
        with record_counter, timer:
            record_counter.with_context({})
            timer.with_context({})
            self._write_starting_replication_value(None)
            for records in self.record_pages(None):
                message["time_extracted"] = self.time_extracted
                head, tail = writer.frame(message)
                for run, checkpoint in checkpoint_runs(records, done, every):
                    writer.write_records(run, head, tail)
                    self.state_manager.is_flushed = False
                    self._observe_page(run)
                    done += len(run)
                    record_counter.increment(len(run))
                    if checkpoint:
                        self._write_state_message()
                    yield from run
            self._finalize_state(self.get_context_state(None))
        self._finalize_state(self.stream_state)
        self._write_state_message()

    @override
    def _sync_batches(self, batch_config: BatchConfig, context: Context | None = None) -> None:
        # Wrapped likewise: after the last BATCH message.
        super()._sync_batches(batch_config, context=context)
        self._activate_held_version()

    def _activate_held_version(self) -> None:
        version, self._deferred_version = self._deferred_version, None
        if version is not None:
            super()._write_activate_version_message(version)
