"""Run the tap: ``tap-invoca-destinations`` and ``python -m tap_invoca_destinations``."""

from __future__ import annotations

import os
import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_during_start_up(signum: int, _frame: object) -> None:
    # Until the tap installs its own handler, a stop needs no cleanup: nothing was sent.
    os.write(2, f"tap-invoca-destinations: stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            paths.append(argv[index + 1])
        elif arg.startswith("--config="):
            paths.append(arg.removeprefix("--config="))
    return [path for path in paths if path != "ENV"]


def main() -> None:
    """Run the tap's CLI; a failure before the tap is running is one line, not a traceback."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_during_start_up)  # the SDK's imports take a while
    from tap_invoca_destinations.tap import (  # noqa: PLC0415
        InputFileError,
        TapInvocaDestinations,
        read_json_object,
    )

    try:
        for path in _config_paths(sys.argv[1:]):
            # The SDK reads these with a traceback for a missing or non-JSON file.
            try:
                with open(path, encoding="utf-8") as file:  # noqa: PTH123
                    read_json_object(file, "--config")
            except OSError as exc:
                msg = f"--config {path}: {exc.strerror or exc}"
                raise InputFileError(msg) from None
        TapInvocaDestinations.cli()
    except Exception as exc:  # noqa: BLE001 - e.g. a --config file that cannot be read
        detail = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(
            f"tap-invoca-destinations: could not start: {type(exc).__name__}: {detail}\n"
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
