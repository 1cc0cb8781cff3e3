"""Helpers for tests: configs for the local server and ways to run the tap."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import select
import signal
import subprocess
import sys
import termios
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

from tap_invoca_destinations.tap import TapInvocaDestinations

if t.TYPE_CHECKING:
    from collections.abc import Iterator

    from invoca_server import InvocaServer

ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "TAP_INVOCA_DESTINATIONS_"


def clean_env() -> dict[str, str]:
    """The environment without any TAP_INVOCA_DESTINATIONS_* setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


def config_for(server: InvocaServer, **overrides: t.Any) -> dict[str, t.Any]:
    """A tap config pointing at the local server, with fast retries for tests."""
    config: dict[str, t.Any] = {
        "api_token": server.token,
        "network_id": server.network_id,
        "base_url": server.url,
        "retry_initial_wait": 0.01,
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


@dataclass
class TapRun:
    """What one run of the tap wrote."""

    returncode: int
    stdout: str
    stderr: str
    messages: list[dict[str, t.Any]] = field(default_factory=list)

    @property
    def records(self) -> list[dict[str, t.Any]]:
        """The records of RECORD messages, in order."""
        return [m["record"] for m in self.messages if m["type"] == "RECORD"]

    @property
    def states(self) -> list[dict[str, t.Any]]:
        """The values of STATE messages, in order."""
        return [m["value"] for m in self.messages if m["type"] == "STATE"]

    @property
    def schema(self) -> dict[str, t.Any]:
        """The schema of the first SCHEMA message."""
        return next(m["schema"] for m in self.messages if m["type"] == "SCHEMA")


def full_table_catalog(config: dict[str, t.Any]) -> dict[str, t.Any]:
    """The tap's catalog with the stream selected and replicated FULL_TABLE."""
    catalog = TapInvocaDestinations(config=config).catalog_dict
    entry = catalog["streams"][0]
    entry["replication_method"] = "FULL_TABLE"
    for item in entry["metadata"]:
        if item["breadcrumb"] == []:
            item["metadata"].update({"selected": True, "forced-replication-method": "FULL_TABLE"})
    return catalog


def _parse(stdout: str) -> list[dict[str, t.Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def run_command(
    command: list[str], cwd: Path, env: dict[str, str] | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end in ``cwd``, with no tap setting from the environment but ``env``."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean_env(), **(env or {})},
        cwd=cwd,
        check=False,
    )


def run_cli(  # noqa: PLR0913 - one argument per CLI option
    tmp_path: Path,
    config: dict[str, t.Any] | None,
    *args: str,
    state: dict[str, t.Any] | None = None,
    catalog: dict[str, t.Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> TapRun:
    """Run the installed ``tap-invoca-destinations`` executable."""
    command = [str(Path(sys.executable).parent / "tap-invoca-destinations")]
    if config is not None:
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps(config))
        command += ["--config", str(config_path)]
    if state is not None:
        state_path = tmp_path / "state.json"
        state_path.write_text(json.dumps(state))
        command += ["--state", str(state_path)]
    if catalog is not None:
        catalog_path = tmp_path / "catalog.json"
        catalog_path.write_text(json.dumps(catalog))
        command += ["--catalog", str(catalog_path)]
    command += list(args)
    result = run_command(command, tmp_path, env, timeout)
    syncs = not {"--about", "--discover", "--version"} & set(args)
    messages = _parse(result.stdout) if result.returncode == 0 and syncs else []
    return TapRun(result.returncode, result.stdout, result.stderr, messages)


def run_in_process(
    config: dict[str, t.Any],
    *,
    state: dict[str, t.Any] | None = None,
    catalog: dict[str, t.Any] | None = None,
) -> TapRun:
    """Sync in this process (faster than a subprocess), capturing stdout."""
    buffer = io.StringIO()
    from singer_sdk.singerlib import Catalog  # noqa: PLC0415

    tap = TapInvocaDestinations(
        config=config,
        state=state,
        catalog=Catalog.from_dict(catalog) if catalog else None,
    )
    with contextlib.redirect_stdout(buffer):
        tap.sync_all()
    return TapRun(0, buffer.getvalue(), "", _parse(buffer.getvalue()))


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold a lock on `path` across processes (pytest-xdist workers): shared or exclusive."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _writing_to_a_full_pipe(pid: int, pipe: t.IO[bytes]) -> bool:
    """Whether a thread of `pid` waits in the kernel to write to a pipe (Linux's wchan).

    Where wchan is hidden, whether `pipe` lacks room for one atomic write instead.
    """
    waits = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            waits.append((task / "wchan").read_text())
    if any(wait.strip() not in {"", "0"} for wait in waits):
        return any(wait.endswith("pipe_write") for wait in waits)
    held = bytearray(4)
    fcntl.ioctl(pipe, termios.FIONREAD, held)
    room = fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ) - int.from_bytes(held, sys.byteorder)
    return room < select.PIPE_BUF


def wait_until_blocked_writing(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Return once `process`, whose stdout nobody reads, is blocked writing to the full pipe."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while not _writing_to_a_full_pipe(process.pid, process.stdout):
        assert process.poll() is None, f"exited with {process.returncode} before blocking"
        assert time.monotonic() < deadline, f"not blocked on its stdout after {timeout} s"
        time.sleep(0.01)


def sigterm_once_asked(
    argv: list[str], server: InvocaServer, cwd: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv``; send SIGTERM as soon as ``server`` has a request; return how it ended."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(), cwd=cwd
    ) as process:
        deadline = time.monotonic() + 30
        while server.stats.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def raw_id(record: object) -> int:
    """The id of a record as ``iter_pages`` yields it: a dict, or a typed record."""
    raw = record["id"] if isinstance(record, dict) else t.cast("t.Any", record).id
    return int(raw)
