"""tap-invoca-destinations: settings, their checks, and the stream list."""

from __future__ import annotations

import atexit
import gc
import ipaddress
import logging
import os
import sys
import typing as t
from urllib.parse import urlparse

from jsonschema import Draft7Validator
from singer_sdk import Tap
from singer_sdk import typing as th
from singer_sdk.configuration._dict_config import parse_environment_config
from singer_sdk.exceptions import ConfigValidationError
from singer_sdk.helpers._classproperty import classproperty

from tap_invoca_destinations.client import DEFAULT_API_VERSION, DEFAULT_BASE_URL, InvocaError
from tap_invoca_destinations.output import BufferedSingerWriter
from tap_invoca_destinations.streams import DestinationsStream

if sys.version_info >= (3, 12):
    from typing import override
else:  # pragma: no cover
    from typing_extensions import override

if t.TYPE_CHECKING:
    from singer_sdk.streams import Stream

STATUSES = ["ignored", "tracked", "discovered"]
SECRET_KEYS = frozenset({"api_token"})


class RedactSecret(logging.Filter):
    """Replaces a secret in every log line (message, arguments and traceback).

    A safety net: the tap never logs the token on purpose, but libraries log
    what they like at DEBUG.
    """

    def __init__(self, secret: str) -> None:
        """Redact ``secret``."""
        super().__init__()
        self.secret = secret

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg, record.args = message.replace(self.secret, "<redacted>"), None
        if record.exc_info:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text = text.replace(self.secret, "<redacted>")
        return True


def redact_in_logs(secret: str) -> None:
    """Install a RedactSecret filter for ``secret`` on every root log handler."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecret) and f.secret == secret for f in handler.filters):
            handler.addFilter(RedactSecret(secret))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TapInvocaDestinations(Tap):
    """Singer tap for Invoca Destinations (the API's ``customer_phone_numbers``)."""

    name = "tap-invoca-destinations"
    package_name = "tap-invoca-destinations"
    message_writer_class = BufferedSingerWriter

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
            th.StringType(nullable=False, pattern=r"^[0-9]+$"),
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
            th.StringType(pattern=r"^\d{4}-\d{2}-\d{2}$"),
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
            th.IntegerType(minimum=1),
            default=100,
            title="Page size",
            description="New records asked for per request (`limit`). Requests after "
            "the first ask for one more, to re-read the previous page's last record.",
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
            default=4,
            title="Max concurrency",
            description="Page requests in flight at once (1 turns prefetching off). "
            "Halved for the rest of the run whenever Invoca answers 429.",
        ),
        th.Property(
            "request_timeout",
            th.NumberType(exclusive_minimum=0),
            default=60,
            title="Request timeout",
            description="Seconds to wait for a connection or for response bytes before "
            "the request is retried.",
        ),
        th.Property(
            "max_tries",
            th.IntegerType(minimum=1),
            default=6,
            title="Max tries",
            description="Attempts per request (the first plus retries) on 429, 5xx, "
            "timeouts and dropped connections.",
        ),
        th.Property(
            "max_retry_seconds",
            th.NumberType(minimum=0),
            default=300,
            title="Max retry seconds",
            description="Total seconds one request may spend waiting between retries "
            "before the tap gives up.",
        ),
        th.Property(
            "retry_initial_wait",
            th.NumberType(minimum=0),
            default=1.0,
            title="Initial retry wait",
            description="First backoff wait in seconds; doubles on each retry (with "
            "jitter, each wait capped at 120 s). `Retry-After` overrides it.",
        ),
        th.Property(
            "user_agent",
            th.StringType,
            title="User agent",
            description="User-Agent header sent to Invoca. Default: "
            "`tap-invoca-destinations/<version>`.",
        ),
    ).to_dict()

    @classproperty
    def _env_var_config(cls) -> dict[str, t.Any]:  # noqa: N805
        # The SDK parses integer settings from the environment with a bare int():
        # name the variable instead of crashing with a traceback.
        schema = cls._config_schema()
        prefix = cls._env_var_prefix
        try:
            return parse_environment_config(schema, prefix)
        except ValueError:
            bad = sorted(
                f"{prefix}{key.upper()} must be an integer"
                for key, prop in schema["properties"].items()
                if "integer" in str(prop.get("type"))
                and not os.environ.get(f"{prefix}{key.upper()}", "0").strip().lstrip("-").isdigit()
            )
            msg = "Config validation failed"
            raise ConfigValidationError(
                msg,
                errors=bad or ["an environment setting has a bad value"],
            ) from None

    @override
    def _validate_config(self, *, raise_errors: bool = True) -> list[str]:
        # The SDK's messages quote offending values (a mistyped api_token would be
        # printed) and cannot express cross-setting rules; ours name keys only.
        config = self._config
        if isinstance(config.get("network_id"), int) and not isinstance(config["network_id"], bool):
            config["network_id"] = str(config["network_id"])
        errors = [*self._schema_errors(), *self._rule_errors()]
        if errors and raise_errors:
            msg = "Config validation failed"
            raise ConfigValidationError(msg, errors=errors)
        for error in errors:
            self.logger.warning("Config: %s", error)
        return errors

    @classmethod
    def _config_schema(cls) -> dict[str, t.Any]:
        """The settings' JSON schema, with the SDK's built-in settings (stream maps, ...)."""
        cls.append_builtin_config(cls.config_jsonschema)  # adds only what is missing
        return cls.config_jsonschema

    def _schema_errors(self) -> list[str]:
        errors = []
        for error in Draft7Validator(self._config_schema()).iter_errors(self._config):
            if error.validator == "required":
                errors.append(error.message.replace(" is a required property", ": is required"))
                continue
            key = ".".join(str(part) for part in error.path) or "config"
            if key in SECRET_KEYS:
                errors.append(f"{key}: must be a non-empty string (value not shown)")
            elif key == "network_id":
                errors.append(f"network_id: must be a string of digits, got {error.instance!r}")
            else:
                errors.append(f"{key}: {error.message}")
        return errors

    def _rule_errors(self) -> list[str]:
        config = self._config
        errors = []
        base_url = config.get("base_url", DEFAULT_BASE_URL)
        if isinstance(base_url, str):
            parsed = urlparse(base_url)
            host = parsed.hostname or ""
            if parsed.scheme not in {"http", "https"} or not host:
                errors.append(f"base_url: must be an https:// URL with a host, got {base_url!r}")
            elif parsed.scheme == "http" and not _is_loopback(host):
                errors.append(
                    "base_url: plain http is refused for non-loopback hosts (the token "
                    "would travel in clear text); use https://",
                )
        status = config.get("status")
        if config.get("include_inactive") is False and status in {"ignored", "discovered"}:
            errors.append(
                f"include_inactive: false (only destinations with a RingPool) contradicts "
                f"status '{status}'; drop one of them",
            )
        start_date = config.get("start_date")
        if isinstance(start_date, str):
            import pendulum  # noqa: PLC0415 - only needed here and for odd timestamps

            try:
                pendulum.parse(start_date)
            except (ValueError, TypeError):
                errors.append(f"start_date: not a date-time: {start_date!r}")
        return errors

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Create the tap; from here on the token is redacted from every log line."""
        super().__init__(*args, **kwargs)
        token = self.config.get("api_token")
        if isinstance(token, str) and token:
            redact_in_logs(token)

    @override
    def discover_streams(self) -> list[Stream]:
        return [DestinationsStream(tap=self)]

    @classmethod
    @override
    def invoke(cls, **kwargs: t.Any) -> None:
        # At exit the interpreter's GC passes walk every object of the SDK's ~650
        # modules (0.2-0.3 s a run); freezing them first makes those passes skip them.
        atexit.register(gc.freeze)
        try:
            super().invoke(**kwargs)
        except InvocaError as exc:
            # One readable line at the default level; the traceback only at DEBUG.
            sys.stdout.flush()
            cls.logger.debug("Traceback of the failure below", exc_info=True)
            cls.logger.error("Sync failed: %s", exc)  # noqa: TRY400
            sys.exit(1)
