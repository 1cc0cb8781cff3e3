"""Run the tap: ``tap-invoca-destinations`` and ``python -m tap_invoca_destinations``."""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import stat
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FILE_OPTIONS = ("--config", "--state", "--catalog")


def _handle_stops_during_start_up(program: str) -> None:
    """Until the tap installs its own handler, a stop is one line and an exit: nothing was sent."""

    def stop(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):  # no room in stderr's pipe: the line is not worth a hang
            if select.select([], [2], [], 0)[1]:
                os.write(2, f"{program}: stopped by {signal.Signals(signum).name}\n".encode())
        os._exit(128 + signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)  # the SDK's imports take a while


def _file_arguments(argv: list[str]) -> list[tuple[str, int, str]]:
    """Return ``(option, index in argv, path)`` for each file given to a file option."""
    found = []
    for index, arg in enumerate(argv):
        if arg in FILE_OPTIONS and index + 1 < len(argv):
            found.append((arg, index + 1, argv[index + 1]))
        elif arg.startswith(tuple(f"{option}=" for option in FILE_OPTIONS)):
            option, _, path = arg.partition("=")
            found.append((option, index, path))
    return [(option, index, path) for option, index, path in found if path != "ENV"]


def _check_file(option: str, path: str) -> os.stat_result:
    """Fail in one line naming the file if it cannot be read.

    Raises:
        InputFileError: If it is missing, a folder or unreadable.
    """
    from tap_invoca_destinations.tap import InputFileError  # noqa: PLC0415

    try:
        info = os.stat(path)  # noqa: PTH116 - a path as given, maybe /dev/fd/63
    except OSError as exc:
        msg = f"{option} {path}: {exc.strerror or exc}"
        raise InputFileError(msg) from None
    if stat.S_ISDIR(info.st_mode):
        msg = f"{option} {path}: is a folder, not a file"
        raise InputFileError(msg)
    if not os.access(path, os.R_OK):
        msg = f"{option} {path}: not readable (permission denied)"
        raise InputFileError(msg)
    return info


def _checked_config(path: str) -> str:
    """Check a ``--config`` file; return the path the SDK should read it from.

    A pipe (``--config <(vault read ...)``) can be read only once: its text is
    kept in an in-memory file (never on disk) that the SDK reads instead.

    Raises:
        InputFileError: If it cannot be read, or is not a JSON object.
    """
    from tap_invoca_destinations.tap import InputFileError, read_json_object  # noqa: PLC0415

    info = _check_file("--config", path)
    try:
        with open(path, encoding="utf-8") as file:  # noqa: PTH123
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"--config {path}: {getattr(exc, 'strerror', None) or exc}"
        raise InputFileError(msg) from None
    named = io.StringIO(text)
    named.name = path
    read_json_object(named, "--config")
    if stat.S_ISREG(info.st_mode):
        return path
    if not hasattr(os, "memfd_create"):  # pragma: no cover - not Linux
        msg = f"--config {path}: not a regular file (a pipe?); write the settings to a file"
        raise InputFileError(msg)
    fd = os.memfd_create("tap-invoca-destinations-config")
    os.write(fd, text.encode())
    return f"/proc/self/fd/{fd}"


def main() -> None:
    """Run the tap's CLI; a failure before the tap is running is one line, not a traceback."""
    _handle_stops_during_start_up("tap-invoca-destinations")
    from tap_invoca_destinations.client import InvocaError  # noqa: PLC0415
    from tap_invoca_destinations.output import SyncInterrupted  # noqa: PLC0415
    from tap_invoca_destinations.tap import TapInvocaDestinations, start_backstop  # noqa: PLC0415

    start_backstop()

    try:
        # The SDK reads these with a traceback (--config) or click's usage error
        # (exit 2, --state and --catalog) for a missing or unreadable file.
        for option, index, path in _file_arguments(sys.argv[1:]):
            if option == "--config":
                checked = _checked_config(path)
                arg = sys.argv[index + 1]
                sys.argv[index + 1] = checked if arg == path else f"--config={checked}"
            else:
                _check_file(option, path)
        TapInvocaDestinations.cli()
    except SyncInterrupted as exc:  # outside a sync (--test): the SDK runs it, not invoke
        sys.stderr.write(f"tap-invoca-destinations: stopped by {exc.signal_name}\n")
        sys.stderr.flush()
        os._exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - e.g. a --config file that cannot be read
        detail = " ".join(str(exc).split()) or type(exc).__name__
        what = "failed" if isinstance(exc, InvocaError) else "could not start"  # e.g. --test
        sys.stderr.write(f"tap-invoca-destinations: {what}: {type(exc).__name__}: {detail}\n")
        sys.exit(1)


def airbyte_main() -> None:
    """Run ``source-invoca-destinations``, with stops handled from the start."""
    _handle_stops_during_start_up("source-invoca-destinations")
    from tap_invoca_destinations.airbyte import main as run_command  # noqa: PLC0415

    run_command(sys.argv[1:])


if __name__ == "__main__":
    main()
