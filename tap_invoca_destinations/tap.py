"""tap-invoca-destinations: settings, their checks, and the stream list."""

from __future__ import annotations

import atexit
import contextlib
import difflib
import gc
import io
import json
import logging
import math
import os
import re
import signal
import sys
import typing as t
from decimal import Decimal
from urllib.parse import urlparse

from jsonschema import Draft7Validator
from singer_sdk import typing as th
from singer_sdk.exceptions import ConfigValidationError

from tap_invoca_destinations.client import (
    DEFAULT_API_VERSION,
    DEFAULT_BASE_URL,
    InvocaError,
    is_loopback,
    secret_forms,
)
from tap_invoca_destinations.output import (
    BACKSTOP,
    BufferedSingerWriter,
    OutputClosed,
    SyncInterrupted,
)
from tap_invoca_destinations.records import parse_instant
from tap_invoca_destinations.sdk_seam import SeamTap
from tap_invoca_destinations.streams import DestinationsStream

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override

if t.TYPE_CHECKING:
    from singer_sdk.streams import Stream


STATUSES = ["ignored", "tracked", "discovered"]
SECRET_KEYS = frozenset({"api_token"})
# String settings are stripped before validation, so `$` cannot match before a
# final newline; [0-9], not \d, which takes any script's digits.
DIGITS = r"^[0-9]+$"
API_VERSION = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
# About 1 KB a destination: 1000 make a 1 MB page, already more than a gateway or
# proxy in front of an API is sure to serve in time, for no gain in requests saved.
MAX_PAGE_SIZE = 1000
PLACEHOLDER = "REPLACE_WITH_"  # sample_config.json's placeholder values start so
SHORT_SECRET = 8  # below this many characters a secret is redacted as a whole word only
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+\Z")
_NUMBER_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


class RedactSecret(logging.Filter):
    """Replaces a secret, in every form it may be printed in, in every log line.

    A safety net: the tap never logs the token on purpose, but libraries log
    what they like at DEBUG, and quote values in their errors (``repr``,
    JSON, URL-encoded).
    """

    def __init__(self, secret: str) -> None:
        """Redact ``secret`` and its quoted, escaped and URL-encoded forms."""
        super().__init__()
        self.secret = secret
        self.forms = secret_forms(secret)
        # A short secret ("x") also occurs inside ordinary words: replace it only
        # where it stands alone, or every log line would be mangled.
        self.word: re.Pattern[str] | None = None
        if len(secret) < SHORT_SECRET:
            alternatives = "|".join(re.escape(form) for form in self.forms)
            self.word = re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")

    def redact(self, text: str) -> str:
        """Return ``text`` with every form of the secret replaced."""
        if self.word is not None:
            return self.word.sub("<redacted>", text)
        for form in self.forms:
            if form in text:
                text = text.replace(form, "<redacted>")
        return text

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.redact(text)
        return True


def redact_in_logs(secret: str) -> None:
    """Install a RedactSecret filter for ``secret`` on every root log handler."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecret) and f.secret == secret for f in handler.filters):
            handler.addFilter(RedactSecret(secret))


class TapInvocaDestinations(SeamTap):
    """Singer tap for Invoca Destinations (the API's ``customer_phone_numbers``)."""

    name = "tap-invoca-destinations"
    package_name = "tap-invoca-destinations"

    config_jsonschema = th.PropertiesList(
        th.Property(
            "api_token",
            th.StringType(nullable=False, min_length=1),
            required=True,
            secret=True,
            title="API token",
            description="Invoca API token (Integrations > Invoca APIs). Sent only as the "
            "`Authorization` header; never logged.",
        ),
        th.Property(
            "network_id",
            th.StringType(nullable=False, pattern=DIGITS),
            required=True,
            title="Network ID",
            description="The Invoca network's numeric id, as a string of digits "
            "(an integer is accepted too).",
            examples=["1234"],
        ),
        th.Property(
            "base_url",
            th.StringType,
            default=DEFAULT_BASE_URL,
            title="Base URL",
            description="Invoca host, e.g. `https://mynetwork.invoca.net`. Plain `http` is "
            "refused unless the host is a loopback address.",
        ),
        th.Property(
            "api_version",
            th.StringType(pattern=API_VERSION),
            default=DEFAULT_API_VERSION,
            title="API version",
            description="The dated network API version in the path.",
        ),
        th.Property(
            "status",
            th.StringType,
            allowed_values=STATUSES,
            title="Status filter",
            description="Only destinations with this status: `ignored`, `tracked` (has a "
            "RingPool) or `discovered` (neither). Unset: all.",
        ),
        th.Property(
            "include_inactive",
            th.BooleanType,
            default=True,
            title="Include inactive",
            description="`false`: only destinations that have a RingPool (sends "
            "`include_inactive=false` and `status=tracked`, and drops any record "
            "without a RingPool).",
        ),
        th.Property(
            "query",
            th.StringType,
            title="Phone number search",
            description="Server-side search by phone number.",
        ),
        th.Property(
            "page_size",
            th.IntegerType(minimum=1, maximum=MAX_PAGE_SIZE),
            default=100,
            title="Page size",
            description="New records asked for per request (`limit`), 1 to 1000. Requests "
            "after the first ask for one more, to re-read the previous page's last record.",
        ),
        th.Property(
            "start_date",
            th.DateTimeType,
            title="Start date",
            description="Lower bound on `updated_at` for the first incremental run "
            "(inclusive). Later runs start from the bookmark.",
        ),
        th.Property(
            "max_concurrency",
            th.IntegerType(minimum=1, maximum=16),
            default=8,
            title="Max concurrency",
            description="Ceiling on page requests in flight (1 turns prefetching off). The "
            "window starts at 4 (or this, if lower), widens while pages come back promptly, "
            "halves on 429, 5xx or a timeout and then stays below the size that met trouble. "
            "8 by default: Invoca does not document its rate limits, so the tap asks for no "
            "more than a browser's handful of connections per host, and backs off on its own.",
        ),
        th.Property(
            "request_timeout",
            th.NumberType(exclusive_minimum=0, maximum=3600),
            default=60,
            title="Request timeout",
            description="Seconds one request may take in all (at most 3600): connecting, the "
            "headers and the whole body (a server that trickles bytes is cut off too); for a "
            "request sent ahead, from when the tap starts waiting for its response. A request "
            "that runs out of time is retried like a dropped connection.",
        ),
        th.Property(
            "max_tries",
            th.IntegerType(minimum=1, maximum=100),
            default=6,
            title="Max tries",
            description="Attempts per request (the first plus retries, 1 to 100) on 408, 429, "
            "5xx, timeouts and dropped connections.",
        ),
        th.Property(
            "max_retry_seconds",
            th.NumberType(minimum=0, maximum=86400),
            default=300,
            title="Max retry seconds",
            description="Total seconds one request may spend waiting between retries "
            "before the tap gives up (at most 86400).",
        ),
        th.Property(
            "retry_initial_wait",
            th.NumberType(minimum=0, maximum=120),
            default=1.0,
            title="Initial retry wait",
            description="First backoff wait in seconds (at most 120); doubles on each retry (with "
            "jitter, each wait capped at 120 s). A longer `Retry-After` overrides it.",
        ),
        th.Property(
            "emit_activate_version_messages",
            th.BooleanType,
            default=False,
            title="Emit ACTIVATE_VERSION (mirror mode)",
            description="With FULL_TABLE replication: stamp records with a table version "
            "and, only after the whole list was read, send ACTIVATE_VERSION so that the "
            "target deletes or flags rows Invoca no longer has. A failed or stopped run "
            "sends none.",
        ),
        th.Property(
            "user_agent",
            th.StringType,
            title="User agent",
            description="User-Agent header sent to Invoca. Default: "
            "`tap-invoca-destinations/<version>`.",
        ),
    ).to_dict()
    # The tap's own settings (settings_schema() adds the SDK's built-ins later).
    own_settings: t.ClassVar[dict[str, dict[str, t.Any]]] = dict(config_jsonschema["properties"])

    @override
    def normalize_config(self, config: dict[str, t.Any]) -> None:
        network_id = config.get("network_id")
        if isinstance(network_id, int) and not isinstance(network_id, bool):
            config["network_id"] = str(network_id)
        for key, prop in self.own_settings.items():
            value, kinds = config.get(key), _types(prop)
            if isinstance(value, Decimal) and "number" in kinds:
                value = str(value)  # the SDK reads JSON numbers as Decimal; NaN breaks jsonschema
            if not isinstance(value, str):
                continue
            if "string" in kinds and value != value.strip():
                # Secret files, env vars and .env values often end in a newline.
                if key in SECRET_KEYS:
                    self.secret_forms.add(value)
                config[key] = value.strip()
            elif "integer" in kinds and _INTEGER_TEXT.match(value.strip()):
                config[key] = int(value)
            elif "number" in kinds and (
                _NUMBER_TEXT.match(value.strip()) or value in {"NaN", "Infinity", "-Infinity"}
            ):
                # Meltano passes decimal settings as strings (see meltano.yml).
                number = float(value)
                config[key] = int(number) if number.is_integer() and abs(number) < 2**53 else number

    @override
    def config_errors(self, config: dict[str, t.Any]) -> list[str]:
        # Messages name the key; only non-secret values are quoted.
        placeholders = [
            key
            for key in self.own_settings
            if isinstance(config.get(key), str) and config[key].startswith(PLACEHOLDER)
        ]
        return [
            *(
                f"{key}: still the placeholder from sample_config.json; put your own value there"
                for key in placeholders
            ),
            *(
                error
                for error in self._schema_errors(config)
                if not error.startswith(tuple(f"{key}:" for key in placeholders))
            ),
            *self._rule_errors(config),
        ]

    @override
    def config_warnings(self, config: dict[str, t.Any]) -> list[str]:
        known = list(self.settings_schema()["properties"])
        warnings = []
        for key in config:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                warnings.append(f"unknown setting '{key}' is ignored{hint}")
        return warnings

    def _schema_errors(self, config: dict[str, t.Any]) -> list[str]:
        errors = []
        for error in Draft7Validator(self.settings_schema()).iter_errors(config):
            if error.validator == "required":
                errors.append(error.message.replace(" is a required property", ": is required"))
                continue
            key = ".".join(str(part) for part in error.path) or "config"
            if key in SECRET_KEYS:
                errors.append(f"{key}: must be a non-empty string (value not shown)")
            elif error.validator in {"maximum", "minimum", "exclusiveMinimum"}:
                bound = {"maximum": "at most", "minimum": "at least"}.get(
                    error.validator, "more than"
                )
                errors.append(
                    f"{key}: must be {bound} {error.validator_value}, got {error.instance}"
                )
            elif key == "network_id":
                errors.append(f"network_id: must be a string of digits, got {error.instance!r}")
            else:
                errors.append(f"{key}: {error.message}")
        return errors

    def _rule_errors(self, config: dict[str, t.Any]) -> list[str]:
        errors = []
        base_url = config.get("base_url", DEFAULT_BASE_URL)
        if isinstance(base_url, str):
            errors += _base_url_errors(base_url)
        for key, prop in self.own_settings.items():
            value = config.get(key)
            if "number" in _types(prop) and isinstance(value, float) and math.isnan(value):
                errors.append(f"{key}: must be a number, got NaN")
        status = config.get("status")
        if config.get("include_inactive") is False and status in {"ignored", "discovered"}:
            errors.append(
                f"include_inactive: false (only destinations with a RingPool) contradicts "
                f"status '{status}'; drop one of them",
            )
        start_date = config.get("start_date")
        if isinstance(start_date, str):
            try:
                parse_instant(start_date)
            except ValueError:
                errors.append(
                    f"start_date: not an ISO 8601 calendar date or date-time (e.g. 2023-10-19, "
                    f"2023-10-19T00:00:00Z or 20231019T000000Z): {start_date!r}",
                )
        token = config.get("api_token")
        if isinstance(token, str) and not token.isprintable():
            errors.append("api_token: contains control characters (value not shown)")
        elif isinstance(token, str) and not token.isascii():
            errors.append(
                "api_token: contains characters an HTTP header cannot carry (value not shown)"
            )
        return errors

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Create the tap; from here on the token is redacted from every log line."""
        self.secret_forms: set[str] = set()  # the token as configured, if tidied
        super().__init__(*args, **kwargs)
        token = self.config.get("api_token")
        for secret in {token, *self.secret_forms}:
            if isinstance(secret, str) and secret.strip():
                redact_in_logs(secret)

    @override
    def discover_streams(self) -> list[Stream]:
        return [DestinationsStream(tap=self)]

    @classmethod
    @override
    def invoke(
        cls,
        *,
        state: t.IO[str] | None = None,
        catalog: t.IO[str] | None = None,
        **kwargs: t.Any,
    ) -> None:
        # At exit the interpreter's GC passes walk every object of the SDK's ~650
        # modules (0.2-0.3 s a run); freezing them first makes those passes skip them.
        atexit.register(gc.freeze)
        try:
            super().invoke(
                state=None if state is None else checked_state_file(state),
                catalog=None if catalog is None else checked_catalog_file(catalog),
                **kwargs,
            )
        except SyncInterrupted as exc:
            written = (
                "the last line on stdout is cut (a record longer than the pipe writes whole)"
                if exc.cut_line
                else "every record written so far is complete"
            )
            cls.logger.error(  # noqa: TRY400 - one line; the traceback helps nobody
                "Sync stopped by %s: %s; no final STATE was written, so the next run "
                "starts from the previous bookmark",
                exc.signal_name,
                written,
            )
            _exit_now(exc.exit_code)
        except OutputClosed as exc:
            cls.logger.error("Sync stopped: %s", exc)  # noqa: TRY400
            _exit_now(1)
        except ConfigValidationError:
            raise  # the SDK's CLI prints one line per bad key
        except Exception as exc:
            # One readable line at the default level; the traceback only at DEBUG.
            cls.logger.debug("Traceback of the failure below", exc_info=True)
            known = isinstance(exc, (InvocaError, InputFileError))
            detail = str(exc) if known else f"{type(exc).__name__}: {exc}"
            cls.logger.error("Sync failed: %s", detail)  # noqa: TRY400
            _exit_now(1)


def _types(prop: dict[str, t.Any]) -> set[str]:
    kinds = prop.get("type", [])
    return {kinds} if isinstance(kinds, str) else set(kinds)


def _base_url_errors(base_url: str) -> list[str]:
    try:
        parsed = urlparse(base_url)
        host = parsed.hostname or ""
    except ValueError:
        return ["base_url: not a URL (value not shown)"]
    if parsed.username is not None or parsed.password is not None:
        # requests would send them as Basic auth in place of the token.
        return ["base_url: must not carry a user name or password (value not shown)"]
    errors = []
    if parsed.scheme not in {"http", "https"} or not host:
        errors.append(f"base_url: must be an https:// URL with a host, got {base_url!r}")
    elif parsed.scheme == "http" and not is_loopback(base_url):
        errors.append(
            "base_url: plain http is refused for non-loopback hosts (the token "
            "would travel in clear text); use https://",
        )
    if parsed.query or base_url.rstrip().endswith("?"):
        errors.append("base_url: must not have a query string ('?...'); give the host only")
    if parsed.fragment or "#" in base_url:
        errors.append("base_url: must not have a fragment ('#...'); give the host only")
    return errors


class InputFileError(Exception):
    """A --state or --catalog file cannot be used."""


def _refuse_constant(name: str) -> t.NoReturn:
    msg = f"{name} is not a JSON value"
    raise ValueError(msg)


def read_json_object(file: t.IO[str], option: str) -> tuple[str, dict[str, t.Any]]:
    """Read a ``--state``/``--catalog`` file as a JSON object, or fail in one line naming it.

    Raises:
        InputFileError: If the file is not UTF-8 JSON holding an object.
    """
    name = getattr(file, "name", "the file")
    try:
        text = file.read()
        value = json.loads(text, parse_constant=_refuse_constant) if text.strip() else {}
    except (UnicodeDecodeError, ValueError) as exc:
        msg = f"{option} {name}: not a JSON file ({type(exc).__name__}: {exc})"
        raise InputFileError(msg) from None
    if not isinstance(value, dict):
        msg = f"{option} {name}: expected a JSON object, got {type(value).__name__}"
        raise InputFileError(msg)
    return text, value


def checked_state_file(state: t.IO[str]) -> t.IO[str]:
    """Check a ``--state`` file's shape, so that a bad one fails in one line naming it.

    Raises:
        InputFileError: If it is not a JSON object whose ``bookmarks`` (if any) map
            streams to objects, with ``partitions`` (if any) a list of objects.
    """
    text, value = read_json_object(state, "--state")
    name = getattr(state, "name", "the state file")
    bookmarks = value.get("bookmarks", {})
    if not isinstance(bookmarks, dict):
        msg = f'--state {name}: expected a JSON object like {{"bookmarks": {{...}}}}'
        raise InputFileError(msg)
    for stream, entry in bookmarks.items():
        partitions = entry.get("partitions", []) if isinstance(entry, dict) else None
        if not isinstance(partitions, list) or not all(isinstance(p, dict) for p in partitions):
            msg = (
                f"--state {name}: bookmarks.{stream} must be an object (with 'partitions', "
                "if any, a list of objects)"
            )
            raise InputFileError(msg)
    return io.StringIO(text)


def checked_catalog_file(catalog: t.IO[str]) -> t.IO[str]:
    """Check that a ``--catalog`` file is a JSON object, naming it if not.

    Raises:
        InputFileError: If it is not.
    """
    text, _ = read_json_object(catalog, "--catalog")
    return io.StringIO(text)


def start_backstop() -> None:
    """Let a stop signal end this process within the writer's graces, whatever blocks it."""
    writer = BufferedSingerWriter
    BACKSTOP.start(writer.STOP_GRACE_SECONDS + writer.EXIT_GRACE_SECONDS)


def _exit_now(code: int) -> t.NoReturn:
    """Exit without waiting for request threads still running (they hold nothing of value)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the exit
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)
