"""The two front ends of one engine, for scenario tests that run either.

``SINGER`` runs ``tap-invoca-destinations``; ``AIRBYTE`` runs
``source-invoca-destinations read`` with ``destinations`` selected for an
incremental sync (what the Singer tap does without a catalog). The ``frontend``
fixture (conftest.py) parametrizes a test over both. Every line the Airbyte source
prints is validated with the official protocol models, and its runs are checked
against the protocol's rules (a TRACE ERROR and INCOMPLETE on failure; a final
STATE and COMPLETE on success).
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing as t
from dataclasses import dataclass
from pathlib import Path

from airbyte_protocol.models import AirbyteMessage
from helpers import TapRun, clean_env, run_command

BIN = Path(sys.executable).parent
AIRBYTE_CATALOG: dict[str, t.Any] = {
    "streams": [
        {
            "stream": {
                "name": "destinations",
                "json_schema": {},
                "supported_sync_modes": ["full_refresh", "incremental"],
            },
            "sync_mode": "incremental",
            "cursor_field": ["updated_at"],
            "destination_sync_mode": "append_dedup",
            "primary_key": [["network_id"], ["id"]],
        }
    ]
}


def airbyte_catalog(sync_mode: str = "incremental") -> dict[str, t.Any]:
    """A configured catalog selecting ``destinations`` in ``sync_mode``."""
    catalog = json.loads(json.dumps(AIRBYTE_CATALOG))
    catalog["streams"][0]["sync_mode"] = sync_mode
    if sync_mode == "full_refresh":
        catalog["streams"][0]["destination_sync_mode"] = "overwrite"
    return catalog


def validate_airbyte_lines(stdout: str) -> list[dict[str, t.Any]]:
    """Parse every stdout line, each validated as an AirbyteMessage."""
    messages = []
    for line in stdout.splitlines():
        AirbyteMessage.model_validate_json(line)
        messages.append(json.loads(line))
    return messages


def check_airbyte_run(returncode: int, messages: list[dict[str, t.Any]]) -> None:
    """The protocol's rules for a finished ``read``: how it ends says how it went."""
    statuses = [
        m["trace"]["stream_status"]["status"]
        for m in messages
        if m["type"] == "TRACE" and m["trace"]["type"] == "STREAM_STATUS"
    ]
    errors = [m for m in messages if m["type"] == "TRACE" and m["trace"]["type"] == "ERROR"]
    for message in messages:
        if message["type"] == "RECORD":
            assert isinstance(message["record"]["emitted_at"], int)
        if message["type"] == "TRACE":
            assert isinstance(message["trace"]["emitted_at"], int)
    if returncode == 0:
        assert not errors
        assert statuses[0] == "STARTED"
        assert statuses[-1] == "COMPLETE"
        assert messages[-2]["type"] == "STATE"
    elif errors:  # a failure (a signal or a closed pipe writes nothing more)
        assert len(errors) == 1
        assert messages[-1] is errors[0]
        assert errors[0]["trace"]["error"]["failure_type"] in {
            "config_error",
            "transient_error",
            "system_error",
        }
        assert "COMPLETE" not in statuses
        if statuses:
            assert statuses[-1] == "INCOMPLETE"


@dataclass(frozen=True)
class Frontend:
    """One way to run a sync: the command, and how to read its stdout."""

    name: str

    def __str__(self) -> str:
        """The test id."""
        return self.name

    @property
    def airbyte(self) -> bool:
        """True for the Airbyte source."""
        return self.name == "airbyte"

    def sync_command(
        self, tmp_path: Path, config: dict[str, t.Any], state: object = None
    ) -> list[str]:
        """The command line of a sync with ``config`` (and ``state``, in this front end's form)."""
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps(config))
        if self.airbyte:
            catalog_path = tmp_path / "airbyte-catalog.json"
            catalog_path.write_text(json.dumps(AIRBYTE_CATALOG))
            command = [str(BIN / "source-invoca-destinations"), "read", "--config"]
            command += [str(config_path), "--catalog", str(catalog_path)]
        else:
            command = [str(BIN / "tap-invoca-destinations"), "--config", str(config_path)]
        if state is not None:
            state_path = tmp_path / "state.json"
            state_path.write_text(json.dumps([state] if self.airbyte else state))
            command += ["--state", str(state_path)]
        return command

    def start(
        self, tmp_path: Path, config: dict[str, t.Any], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a sync with piped stdout and stderr."""
        return subprocess.Popen(
            self.sync_command(tmp_path, config),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**clean_env(), **(env or {})},
            cwd=tmp_path,
        )

    def run(
        self,
        tmp_path: Path,
        config: dict[str, t.Any],
        *,
        state: object = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> TapRun:
        """Run a sync to its end; for Airbyte, validate every line and the run's ending."""
        result = run_command(self.sync_command(tmp_path, config, state), tmp_path, env, timeout)
        if self.airbyte:
            messages = validate_airbyte_lines(result.stdout)
            check_airbyte_run(result.returncode, messages)
            return AirbyteRun(result.returncode, result.stdout, result.stderr, messages)
        messages = []
        if result.returncode == 0:
            messages = [json.loads(line) for line in result.stdout.splitlines()]
        return TapRun(result.returncode, result.stdout, result.stderr, messages)

    def parse(self, out: bytes) -> list[dict[str, t.Any]]:
        """Parse stdout bytes (every line must be whole)."""
        if self.airbyte:
            return validate_airbyte_lines(out.decode())
        return [json.loads(line) for line in out.splitlines()]

    def record_of(self, message: dict[str, t.Any]) -> dict[str, t.Any] | None:
        """The record a message carries, or None."""
        if message["type"] != "RECORD":
            return None
        return message["record"]["data"] if self.airbyte else message["record"]

    def state_with(self, value: object) -> dict[str, t.Any]:
        """A state holding ``value`` as the bookmark, in this front end's form."""
        if self.airbyte:
            stream = {"stream_descriptor": {"name": "destinations"}}
            return {"type": "STREAM", "stream": {**stream, "stream_state": {"updated_at": value}}}
        entry = {"replication_key": "updated_at", "replication_key_value": value}
        return {"bookmarks": {"destinations": entry}}

    def bookmark_of(self, state: dict[str, t.Any]) -> str | None:
        """The bookmark a state (as ``TapRun.states`` lists it) holds."""
        if self.airbyte:
            return state["stream"]["stream_state"].get("updated_at")
        return state.get("bookmarks", {}).get("destinations", {}).get("replication_key_value")


class AirbyteRun(TapRun):
    """What one Airbyte ``read`` wrote."""

    @property
    def records(self) -> list[dict[str, t.Any]]:
        """The records' data, in order."""
        return [m["record"]["data"] for m in self.messages if m["type"] == "RECORD"]

    @property
    def states(self) -> list[dict[str, t.Any]]:
        """The STATE messages' ``state`` members, in order."""
        return [m["state"] for m in self.messages if m["type"] == "STATE"]

    @property
    def error(self) -> dict[str, t.Any] | None:
        """The TRACE ERROR's ``error`` member, if any."""
        errors = [
            m for m in self.messages if m["type"] == "TRACE" and m["trace"]["type"] == "ERROR"
        ]
        return errors[0]["trace"]["error"] if errors else None


SINGER = Frontend("singer")
AIRBYTE = Frontend("airbyte")
FRONTENDS = (SINGER, AIRBYTE)
