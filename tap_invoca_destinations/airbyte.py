"""source-invoca-destinations: the tap's engine behind the Airbyte protocol (v0).

``spec``, ``check``, ``discover`` and ``read`` translate between Airbyte messages
and the Singer tap's own settings, validation, stream, paging and bookmark rules:
nothing here pages, shapes records or declares a setting. Messages are plain
dicts written by the tap's ``BufferedSingerWriter`` (whole lines, stop signals
held until a block is out). stdout carries only Airbyte messages; logs go to
stderr, as for the Singer tap.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import datetime as dt
import gc
import json
import logging
import sys
import time
import typing as t

from singer_sdk.exceptions import ConfigValidationError

from tap_invoca_destinations.client import (
    TRANSPORT_FAILURES,
    InvocaError,
    InvocaStream,
    RetriableReply,
    check_status,
    decode_page,
)
from tap_invoca_destinations.output import (
    RECORD_PLACEHOLDER,
    BufferedSingerWriter,
    OutputClosed,
    SyncInterrupted,
    checkpoint_runs,
)
from tap_invoca_destinations.records import parse_instant
from tap_invoca_destinations.sdk_seam import setup_console_logging
from tap_invoca_destinations.streams import DestinationsStream
from tap_invoca_destinations.tap import (
    RedactSecret,
    TapInvocaDestinations,
    _exit_now,
    start_backstop,
)

if t.TYPE_CHECKING:
    from collections.abc import Callable

STREAM = DestinationsStream.name
CURSOR: str = DestinationsStream.replication_key
STATE_EVERY_RECORDS = 10_000  # records between checkpoint STATE messages
# Singer-only: Airbyte mirrors through full_refresh + overwrite, not ACTIVATE_VERSION.
SINGER_ONLY_SETTINGS = frozenset({"emit_activate_version_messages"})
CONFIG_ERROR = "config_error"
TRANSIENT_ERROR = "transient_error"
SYSTEM_ERROR = "system_error"

Message = dict[str, t.Any]
# The tap's own logger: stderr lines look the same from both front ends.
logger = logging.getLogger(TapInvocaDestinations.name)


class SourceError(Exception):
    """A failure reported as one TRACE ERROR message, with Airbyte's failure type."""

    def __init__(self, message: str, failure_type: str = CONFIG_ERROR) -> None:
        """Keep the one-line message and its failure type."""
        super().__init__(message)
        self.failure_type = failure_type


def now_ms() -> int:
    """Now, in integer milliseconds since the epoch (Airbyte's ``emitted_at``)."""
    return time.time_ns() // 1_000_000


# --- messages -------------------------------------------------------------------


def connection_specification() -> dict[str, t.Any]:
    """The tap's own settings (not the SDK's built-ins) as a draft-07 JSON Schema."""
    builtins: dict[str, t.Any] = {"type": "object", "properties": {}}
    TapInvocaDestinations.append_builtin_config(builtins)
    skip = set(builtins["properties"]) | SINGER_ONLY_SETTINGS
    schema = copy.deepcopy(TapInvocaDestinations.config_jsonschema)
    properties = {k: v for k, v in schema["properties"].items() if k not in skip}
    for order, prop in enumerate(properties.values()):
        prop["order"] = order  # the Airbyte UI's field order
    properties["api_token"]["airbyte_secret"] = True
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Invoca Destinations",
        "type": "object",
        "required": [k for k in schema.get("required", []) if k in properties],
        "properties": properties,
        "additionalProperties": True,
    }


def spec_message() -> Message:
    """The SPEC message."""
    return {
        "type": "SPEC",
        "spec": {
            "connectionSpecification": connection_specification(),
            "supportsIncremental": True,
            "supported_destination_sync_modes": ["overwrite", "append", "append_dedup"],
        },
    }


def airbyte_stream() -> dict[str, t.Any]:
    """The ``destinations`` stream as Airbyte declares it (the Singer stream's schema)."""
    return {
        "name": STREAM,
        "json_schema": copy.deepcopy(DestinationsStream.schema),
        "supported_sync_modes": ["full_refresh", "incremental"],
        "source_defined_cursor": True,
        "default_cursor_field": [CURSOR],
        "source_defined_primary_key": [[key] for key in DestinationsStream.primary_keys],
        "is_resumable": False,  # records come in id order: only a whole read moves the cursor
    }


def state_message(stream_state: dict[str, t.Any], record_count: int) -> Message:
    """A per-stream STATE message; ``record_count`` counts records since the previous one."""
    return {
        "type": "STATE",
        "state": {
            "type": "STREAM",
            "stream": {"stream_descriptor": {"name": STREAM}, "stream_state": stream_state},
            "sourceStats": {"recordCount": float(record_count)},
        },
    }


def status_message(status: str) -> Message:
    """A stream status TRACE message (STARTED, RUNNING, COMPLETE, INCOMPLETE)."""
    return {
        "type": "TRACE",
        "trace": {
            "type": "STREAM_STATUS",
            "emitted_at": now_ms(),
            "stream_status": {"stream_descriptor": {"name": STREAM}, "status": status},
        },
    }


def error_message(message: str, failure_type: str, internal: str | None = None) -> Message:
    """A TRACE ERROR message."""
    error: dict[str, t.Any] = {"message": message, "failure_type": failure_type}
    if internal:
        error["internal_message"] = internal
    return {
        "type": "TRACE",
        "trace": {"type": "ERROR", "emitted_at": now_ms(), "error": error},
    }


def connection_status(message: str | None = None) -> Message:
    """CONNECTION_STATUS: SUCCEEDED without a message, FAILED with one."""
    if message is None:
        return {"type": "CONNECTION_STATUS", "connectionStatus": {"status": "SUCCEEDED"}}
    return {
        "type": "CONNECTION_STATUS",
        "connectionStatus": {"status": "FAILED", "message": message},
    }


# --- inputs ---------------------------------------------------------------------


def read_json(path: str, option: str) -> t.Any:  # noqa: ANN401 - any JSON value
    """Read a JSON file named on the command line.

    Raises:
        SourceError: If it cannot be read or is not JSON (config_error).
    """
    try:
        with open(path, encoding="utf-8") as file:  # noqa: PTH123
            return json.load(file)
    except OSError as exc:
        msg = f"{option} {path}: {exc.strerror or exc}"
        raise SourceError(msg) from None
    except (UnicodeDecodeError, ValueError) as exc:
        msg = f"{option} {path}: not a JSON file ({type(exc).__name__}: {exc})"
        raise SourceError(msg) from None


def read_config(path: str) -> dict[str, t.Any]:
    """The ``--config`` file's object.

    Raises:
        SourceError: If it is not a JSON object.
    """
    config = read_json(path, "--config")
    if not isinstance(config, dict):
        msg = f"--config {path}: expected a JSON object, got {type(config).__name__}"
        raise SourceError(msg)
    return config


def make_tap(
    config: dict[str, t.Any], state: dict[str, t.Any] | None = None
) -> TapInvocaDestinations:
    """The Singer tap, its settings validated by its own rules.

    Raises:
        SourceError: With the tap's one-line message per bad setting (config_error).
    """
    try:
        return TapInvocaDestinations(config=config, state=state, validate_config=True)
    except ConfigValidationError as exc:
        errors = getattr(exc, "errors", None) or [str(exc)]
        msg = "Config validation failed: " + "; ".join(map(str, errors))
        raise SourceError(msg) from None


def sync_mode_of(catalog: t.Any, path: str) -> str | None:  # noqa: ANN401 - any JSON value
    """The sync mode the configured catalog asks for ``destinations``, or None if unselected.

    Raises:
        SourceError: On a catalog that is not a ConfiguredAirbyteCatalog of this source.
    """
    streams = catalog.get("streams") if isinstance(catalog, dict) else None
    if not isinstance(streams, list) or not all(isinstance(s, dict) for s in streams):
        msg = f"--catalog {path}: expected a configured catalog, an object with a 'streams' list"
        raise SourceError(msg)
    mode = None
    for entry in streams:
        name = (entry.get("stream") or {}).get("name")
        if name != STREAM:
            msg = f"--catalog {path}: this source has no stream {name!r} (only {STREAM!r})"
            raise SourceError(msg)
        mode = entry.get("sync_mode")
        if mode not in {"full_refresh", "incremental"}:
            msg = f"--catalog {path}: sync_mode must be full_refresh or incremental, got {mode!r}"
            raise SourceError(msg)
        cursor = entry.get("cursor_field")
        if mode == "incremental" and cursor not in (None, [], [CURSOR]):
            msg = f"--catalog {path}: the cursor is source-defined ({[CURSOR]}), got {cursor!r}"
            raise SourceError(msg)
    return mode


def _unusable(path: str, why: str) -> t.NoReturn:
    msg = f"--state {path}: {why}; remove it to read everything again"
    raise SourceError(msg)


def _named(item: t.Any) -> bool:  # noqa: ANN401 - any JSON value
    descriptor = item.get("stream_descriptor") if isinstance(item, dict) else None
    return isinstance(descriptor, dict) and descriptor.get("name") == STREAM


def _stream_states(state: t.Any, path: str) -> list[t.Any]:  # noqa: ANN401
    """Every state of ``destinations`` that ``state`` holds, in any accepted form."""
    if isinstance(state, dict) and "type" not in state and not {"stream", "data"} & set(state):
        # The legacy form, {stream: stream_state}, or {} for no state.
        return [state[STREAM]] if STREAM in state else []
    found = []
    for entry in state if isinstance(state, list) else [state]:
        if not isinstance(entry, dict):
            _unusable(path, f"expected state messages (objects), got {type(entry).__name__}")
        kind = entry.get("type") or ("STREAM" if "stream" in entry else "LEGACY")
        if kind == "STREAM":
            stream = entry.get("stream")
            if not isinstance(stream, dict) or not isinstance(
                stream.get("stream_descriptor"), dict
            ):
                _unusable(path, "a STREAM state has no stream.stream_descriptor")
            if _named(stream):
                found.append(stream.get("stream_state"))
        elif kind == "GLOBAL":
            shared = entry.get("global") or entry.get("global_") or {}
            items = shared.get("stream_states") if isinstance(shared, dict) else None
            found += [item.get("stream_state") for item in items or [] if _named(item)]
        elif kind == "LEGACY":
            data = entry.get("data")
            if isinstance(data, dict) and STREAM in data:
                found.append(data[STREAM])
        else:
            _unusable(path, f"unknown state type {kind!r}")
    return found


def bookmark_from_state(state: t.Any, path: str) -> str | None:  # noqa: ANN401 - any JSON value
    """The ``updated_at`` bookmark held by a ``--state`` value, or None for no bookmark.

    Takes the JSON array of state messages that Airbyte and PyAirbyte pass back
    (per-stream, global or legacy entries; PyAirbyte's dump with ``"global_": null``),
    one state message alone, a legacy ``{"destinations": {...}}`` object, and an
    empty array or object.

    Raises:
        SourceError: If the state cannot be used: never a silent full resync.
    """
    found = _stream_states(state, path)
    if len(found) > 1:
        _unusable(path, f"it holds {len(found)} states of stream {STREAM!r}")
    stream_state = found[0] if found else None
    if stream_state in (None, {}):
        return None
    if not isinstance(stream_state, dict) or CURSOR not in stream_state:
        _unusable(path, f"the state of stream {STREAM!r} has no {CURSOR!r}: {stream_state!r}")
    value = stream_state[CURSOR]
    try:
        moment = parse_instant(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None:
        _unusable(path, f"{CURSOR} is not a timestamp: {value!r}")
    return t.cast("str", value)


def singer_state(bookmark: str | None) -> dict[str, t.Any] | None:
    """The Singer state that hands ``bookmark`` to the tap's stream."""
    if bookmark is None:
        return None
    entry = {"replication_key": CURSOR, "replication_key_value": bookmark}
    return {"bookmarks": {STREAM: entry}}


def is_trusted(bookmark: str | None) -> bool:
    """A bookmark a checkpoint may repeat: not in the future (the stream distrusts those)."""
    return bookmark is not None and parse_instant(bookmark) <= dt.datetime.now(dt.UTC)


# --- commands -------------------------------------------------------------------


class Source:
    """One command's run: where messages go and how the token is kept out of them."""

    def __init__(self, writer: BufferedSingerWriter) -> None:
        """Write through ``writer``."""
        self.writer = writer
        self.redact: Callable[[str], str] = lambda text: text
        self.stream_started = False

    def emit(self, message: Message) -> None:
        """Write one message and flush (records use ``writer.write_records`` directly)."""
        self.writer.write_record(message)
        self.writer.flush()

    def hide_token(self, config: dict[str, t.Any]) -> None:
        """Redact the configured token from every message text from here on."""
        token = config.get("api_token")
        if isinstance(token, str) and token.strip():
            filters = [RedactSecret(token), RedactSecret(token.strip())]

            def redact(text: str) -> str:
                for one in filters:
                    text = one.redact(text)
                return text

            self.redact = redact

    def fail(self, message: str, failure_type: str, internal: str | None = None) -> t.NoReturn:
        """Report a failure: INCOMPLETE if the stream had started, a TRACE ERROR, exit 1."""
        message = self.redact(" ".join(message.split()))
        logger.error("Sync failed: %s", message)
        try:
            if self.stream_started:
                self.emit(status_message("INCOMPLETE"))
            self.emit(error_message(message, failure_type, internal and self.redact(internal)))
        except OutputClosed:
            pass  # nothing to tell it to; the log line above says what went wrong
        _exit_now(1)

    def check(self, config_path: str) -> None:
        """One cheap request (within request_timeout, no retries), then CONNECTION_STATUS."""
        try:
            config = read_config(config_path)
            self.hide_token(config)
            tap = make_tap(config)
        except SourceError as exc:
            self.emit(connection_status(self.redact(str(exc))))
            return
        stream = t.cast("InvocaStream", tap.streams[STREAM])
        params = {**stream.filter_params(), "limit": 1, "start": 0}
        try:
            reply = stream.send(params)
            check_status(reply)
            decode_page(reply)
        except (RetriableReply, InvocaError) as exc:
            reason = str(exc)
        except TRANSPORT_FAILURES as exc:
            try:
                _, reason = stream.transport_failure(exc)
            except InvocaError as fatal:
                reason = str(fatal)
        else:
            self.emit(connection_status())
            return
        logger.error("Check failed: %s", self.redact(reason))
        self.emit(connection_status(self.redact(reason)))

    def discover(self, config_path: str) -> None:
        """Validate the settings, then one CATALOG message."""
        config = read_config(config_path)
        self.hide_token(config)
        make_tap(config)
        self.emit({"type": "CATALOG", "catalog": {"streams": [airbyte_stream()]}})

    def read(self, config_path: str, catalog_path: str, state_path: str | None) -> None:
        """Read ``destinations``: RECORDs, checkpoint STATEs, a final STATE, stream statuses."""
        config = read_config(config_path)
        self.hide_token(config)
        mode = sync_mode_of(read_json(catalog_path, "--catalog"), catalog_path)
        bookmark = None
        if state_path is not None:
            bookmark = bookmark_from_state(read_json(state_path, "--state"), state_path)
        incremental = mode == "incremental"
        tap = make_tap(config, singer_state(bookmark) if incremental else None)
        writer = tap.message_writer
        if isinstance(writer, BufferedSingerWriter):  # its signal handler interrupts this one
            self.writer = writer
        if mode is None:
            logger.info("No stream selected in %s: nothing to read", catalog_path)
            return
        stream = t.cast("DestinationsStream", tap.streams[STREAM])
        if not incremental:
            stream.forced_replication_method = "FULL_TABLE"
        safe_state = {CURSOR: bookmark} if incremental and is_trusted(bookmark) else {}
        self.stream_started = True
        self.emit(status_message("STARTED"))
        count = self.read_records(stream, safe_state)
        final: dict[str, t.Any] = {}
        if incremental:
            committed = stream.committed_bookmark
            final = {CURSOR: committed} if committed is not None else safe_state
        self.emit(state_message(final, count))
        self.emit(status_message("COMPLETE"))

    def read_records(self, stream: DestinationsStream, safe_state: dict[str, t.Any]) -> int:
        """Write the stream's records; return how many came after the last checkpoint.

        Checkpoints repeat the starting bookmark: records come in id order, so only
        the final STATE, after the whole list was read, may move it.
        """
        writer = self.writer
        count = 0
        running = False
        for records in stream.pages_for_another_front_end():
            if not records:
                continue
            if not running:
                running = True
                self.emit(status_message("RUNNING"))
            data = {"stream": STREAM, "data": RECORD_PLACEHOLDER, "emitted_at": now_ms()}
            head, tail = writer.frame({"type": "RECORD", "record": data})
            for run, checkpoint in checkpoint_runs(records, count, STATE_EVERY_RECORDS):
                writer.write_records(run, head, tail)
                count += len(run)
                if checkpoint:
                    self.emit(state_message(safe_state, count))
                    count = 0
        return count


# --- entry point ----------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The Airbyte protocol's command line."""
    parser = argparse.ArgumentParser(
        prog="source-invoca-destinations",
        description="Invoca Destinations as an Airbyte source (protocol v0).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("spec", help="print the SPEC message")
    for name in ("check", "discover", "read"):
        command = commands.add_parser(name, help=f"{name} (see the README's Airbyte section)")
        command.add_argument("--config", required=True, help="the config JSON file")
        if name == "read":
            command.add_argument("--catalog", required=True, help="the configured catalog")
            command.add_argument("--state", help="the state: a JSON array of state messages")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run one Airbyte command; exit 0 only when it completed."""
    args = parse_args(argv)
    start_backstop()
    setup_console_logging(TapInvocaDestinations.name)
    atexit.register(gc.freeze)  # see TapInvocaDestinations.invoke
    source = Source(BufferedSingerWriter())
    try:
        if args.command == "spec":
            source.emit(spec_message())
        elif args.command == "check":
            source.check(args.config)
        elif args.command == "discover":
            source.discover(args.config)
        else:
            source.read(args.config, args.catalog, args.state)
        source.writer.flush()
    except SourceError as exc:
        source.fail(str(exc), exc.failure_type)
    except InvocaError as exc:
        source.fail(str(exc), exc.failure_type)
    except SyncInterrupted as exc:
        # As for the Singer tap: nothing more on stdout, whose reader may be gone.
        if args.command == "read":
            logger.error(  # noqa: TRY400 - one line; the traceback helps nobody
                "Sync stopped by %s: every message written so far is complete; no final "
                "STATE was written, so the next sync starts from the previous one",
                exc.signal_name,
            )
        else:
            logger.error("%s stopped by %s", args.command.capitalize(), exc.signal_name)  # noqa: TRY400
        _exit_now(exc.exit_code)
    except OutputClosed as exc:
        logger.error("Sync stopped: %s", exc)  # noqa: TRY400
        _exit_now(1)
    except Exception as exc:
        logger.debug("Traceback of the failure below", exc_info=True)
        source.fail(f"{type(exc).__name__}: {exc}", SYSTEM_ERROR)


if __name__ == "__main__":
    main(sys.argv[1:])
