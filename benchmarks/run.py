"""Benchmark: the tap against a hand-written baseline, on the local Invoca-compatible server.

S1  100,000 destinations, no added latency: wall time, records/s and peak RSS of
    the tap and of benchmarks/baseline.py (strptime timestamps, and a tuned
    variant), and their ratios.
S2  20,000 destinations, 30 ms added per request: the tap with default settings,
    with max_concurrency=1, and the baseline; ratios and the sequential lower bound.
S3  the tap's peak RSS at 20,000 and at 200,000 destinations.

Every figure is the median of --runs runs (default 3), measured in this one run,
so ratios compare like with like on the same (noisy, shared) machine.

Usage: python benchmarks/run.py [--runs N] [--scale F] [--scenarios S1,S2,S3]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = "local-test-token"  # noqa: S105 - the local server's placeholder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """The local Invoca-compatible server in its own process."""

    def __init__(self, count: int, latency_ms: float = 0) -> None:
        self.port = free_port()
        self.count = count
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "invoca_server.py"), "--port", str(self.port),
             "--count", str(count), "--latency-ms", str(latency_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.process.stdout.readline()  # the "listening" line: data is generated
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


# Every command runs with Python's default stdout buffering: PYTHONUNBUFFERED=1
# (set on some machines and images) would cost the baseline a system call per line.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def measure(command: list[str], expected_lines: int) -> tuple[float, float]:
    """Run a command with stdout to a pipe we drain; return (wall seconds, peak RSS MiB)."""
    began = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=CHILD_ENV
    )
    assert process.stdout is not None
    records = sum(
        1 for line in process.stdout if line.startswith((b'{"type":"RECORD"', b'{"type": "RECORD"'))
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or records != expected_lines:
        msg = f"{command[0]} exited {process.returncode} with {records} records (expected {expected_lines})"
        raise RuntimeError(msg)
    return wall, usage.ru_maxrss / 1024


def tap_command(server: Server, workdir: Path, **settings: object) -> list[str]:
    config = {"api_token": TOKEN, "network_id": "1234", "base_url": server.url, **settings}
    path = workdir / f"config-{abs(hash(json.dumps(config, sort_keys=True)))}.json"
    path.write_text(json.dumps(config))
    return [str(BIN / "tap-invoca-destinations"), "--config", str(path)]


def baseline_command(server: Server, *, tuned: bool = False) -> list[str]:
    command = [sys.executable, str(ROOT / "benchmarks" / "baseline.py"), server.url, TOKEN]
    return [*command, "100", "--tuned"] if tuned else command


def median_of(runs: int, command: list[str], expected: int) -> tuple[float, float]:
    results = [measure(command, expected) for _ in range(runs)]
    return statistics.median(r[0] for r in results), max(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default="S1,S2,S3", help="comma-separated subset to run")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="shrink record counts (e.g. 0.1) for a quick look"
    )
    args = parser.parse_args()
    n_s1, n_s2 = int(100_000 * args.scale), int(20_000 * args.scale)
    n_small, n_large = int(20_000 * args.scale), int(200_000 * args.scale)
    print(
        f"# {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, runs={args.runs}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="invoca-bench-"))
    # Measure the tap as pip installs it, with bytecode compiled (the editable
    # checkout may have none, e.g. under PYTHONDONTWRITEBYTECODE=1).
    compileall.compile_dir(ROOT / "tap_invoca_destinations", quiet=1)

    scenarios = set(args.scenarios.upper().split(","))
    if "S1" in scenarios:
        s1(args.runs, n_s1, workdir)
    if "S2" in scenarios:
        s2(args.runs, n_s2, workdir)
    if "S3" in scenarios:
        s3(n_small, n_large, workdir)


def s1(runs: int, n_s1: int, workdir: Path) -> None:
    server = Server(n_s1)
    try:
        tap_wall, tap_rss = median_of(runs, tap_command(server, workdir), n_s1)
        base_wall, base_rss = median_of(runs, baseline_command(server), n_s1)
        tuned_wall, tuned_rss = median_of(runs, baseline_command(server, tuned=True), n_s1)
    finally:
        server.stop()
    print(f"\nS1  {n_s1:,} destinations, no added latency (median of {runs})")
    print(
        f"    tap (defaults)        {tap_wall:7.2f} s  {n_s1 / tap_wall:9,.0f} rec/s  peak RSS {tap_rss:6.1f} MiB"
    )
    print(
        f"    baseline (strptime)   {base_wall:7.2f} s  {n_s1 / base_wall:9,.0f} rec/s  peak RSS {base_rss:6.1f} MiB"
    )
    print(
        f"    baseline (tuned)      {tuned_wall:7.2f} s  {n_s1 / tuned_wall:9,.0f} rec/s  peak RSS {tuned_rss:6.1f} MiB"
    )
    print(f"    ratio tap / baseline (strptime) = {tap_wall / base_wall:.2f}   target <= 1.1")
    print(f"    ratio tap / baseline (tuned)    = {tap_wall / tuned_wall:.2f}")


def s2(runs: int, n_s2: int, workdir: Path) -> None:
    server = Server(n_s2, latency_ms=30)
    try:
        default_wall, _ = median_of(runs, tap_command(server, workdir), n_s2)
        serial_wall, _ = median_of(runs, tap_command(server, workdir, max_concurrency=1), n_s2)
        base2_wall, _ = median_of(runs, baseline_command(server), n_s2)
    finally:
        server.stop()
    startup, _ = median_of(runs, [str(BIN / "tap-invoca-destinations"), "--about"], 0)
    requests_needed = -(-n_s2 // 100)
    print(f"\nS2  {n_s2:,} destinations, 30 ms added per request (median of {runs})")
    print(f"    tap (defaults, max_concurrency=4)  {default_wall:7.2f} s")
    print(f"    tap (max_concurrency=1)            {serial_wall:7.2f} s")
    print(f"    baseline                           {base2_wall:7.2f} s")
    print(
        f"    sequential lower bound: {requests_needed} requests x 30 ms = {requests_needed * 0.03:.2f} s"
    )
    print(f"    ratio default / concurrency-1 = {default_wall / serial_wall:.2f}   target <= 0.35")
    print(f"    ratio default / baseline      = {default_wall / base2_wall:.2f}   target <= 0.35")
    print(
        f"    tap startup (--about, SDK import): {startup:.2f} s; net of it, default / concurrency-1 = "
        f"{(default_wall - startup) / (serial_wall - startup):.2f}"
    )


def s3(n_small: int, n_large: int, workdir: Path) -> None:
    rss = {}
    for count in (n_small, n_large):
        server = Server(count)
        try:
            rss[count] = median_of(1, tap_command(server, workdir), count)[1]
        finally:
            server.stop()
    print("\nS3  tap peak RSS")
    print(f"    {n_small:,} destinations: {rss[n_small]:6.1f} MiB")
    print(f"    {n_large:,} destinations: {rss[n_large]:6.1f} MiB")
    print(f"    ratio = {rss[n_large] / rss[n_small]:.2f}   target <= 1.2, and under 100 MiB")


if __name__ == "__main__":
    main()
