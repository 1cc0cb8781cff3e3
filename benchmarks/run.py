"""Benchmark: the tap against hand-written peers and the floor, on the local Invoca-compatible server.

S1  100,000 destinations, no added latency: wall time, CPU time and peak RSS of
    the tap, of hand-written scripts (benchmarks/baseline.py: json with strptime,
    json with fromisoformat, orjson) and of the floor (benchmarks/floor.py: the
    same page requests at the same concurrency, bodies thrown away); ratios, and
    CPU microseconds per record for the tap and the floor; and the same read
    through the Airbyte source (`source-invoca-destinations read`), full refresh,
    against the Singer run's wall time (target <= 1.2).
S2  20,000 destinations, 30 ms added per request: the tap with default settings
    (the adaptive window), with max_concurrency=1, and the sequential script.
S3  the tap's peak RSS at 20,000 and at 200,000 destinations.

The server runs in its own process. Runs of all commands alternate and each figure
is the median of --runs, all in this one run, so ratios compare like with like on
a noisy, shared machine. --build NAME=PATH adds another checkout of the tap (e.g.
a `git worktree` of an earlier commit) as a column, run with the same interpreter.

Usage: python benchmarks/run.py [--runs N] [--scale F] [--scenarios S1,S2,S3]
                                [--build NAME=PATH ...]
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "local-test-token"  # noqa: S105 - the local server's placeholder
CEILING = 8  # the tap's default max_concurrency, also the floor's concurrency


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


@dataclass
class Result:
    wall: float
    cpu: float  # user + system seconds of the command (its children included)
    rss: float  # peak RSS, MiB


@dataclass
class Command:
    name: str
    argv: list[str]
    env: dict[str, str]
    records: int  # RECORD lines it must write (0: none counted)


# Every command runs with Python's default stdout buffering: PYTHONUNBUFFERED=1
# (set on some machines and images) would cost the scripts a system call per line.
BASE_ENV = {k: v for k, v in os.environ.items() if k not in {"PYTHONUNBUFFERED", "PYTHONPATH"}}


def measure(command: Command, workdir: Path) -> Result:
    """Run a command with stdout to a pipe we drain; return its wall, CPU and peak RSS."""
    began = time.perf_counter()
    process = subprocess.Popen(
        command.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=command.env,
        cwd=workdir,  # not the checkout: `python -m` must import the build under test
    )  # fmt: skip
    assert process.stdout is not None
    records = sum(
        1 for line in process.stdout if line.startswith((b'{"type":"RECORD"', b'{"type": "RECORD"'))
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or (command.records and records != command.records):
        msg = f"{command.name} exited {code} with {records} records (expected {command.records})"
        raise RuntimeError(msg)
    return Result(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def medians(runs: int, commands: list[Command], workdir: Path) -> dict[str, Result]:
    """Each command ``runs`` times, alternating; the median of each figure (RSS: the max)."""
    results: dict[str, list[Result]] = {c.name: [] for c in commands}
    for _ in range(runs):
        for command in commands:
            results[command.name].append(measure(command, workdir))
    return {
        name: Result(
            statistics.median(r.wall for r in rs),
            statistics.median(r.cpu for r in rs),
            max(r.rss for r in rs),
        )
        for name, rs in results.items()
    }


def tap(name: str, build: Path, server: Server, workdir: Path, **settings: object) -> Command:
    config = {"api_token": TOKEN, "network_id": "1234", "base_url": server.url, **settings}
    path = workdir / f"config-{abs(hash(json.dumps(config, sort_keys=True)))}.json"
    path.write_text(json.dumps(config))
    env = {**BASE_ENV, "PYTHONPATH": str(build)}
    argv = [sys.executable, "-m", "tap_invoca_destinations", "--config", str(path)]
    return Command(name, argv, env, server.count)


def airbyte(build: Path, server: Server, workdir: Path) -> Command:
    """The Airbyte source's full-refresh read of the same list (source-invoca-destinations)."""
    config = {"api_token": TOKEN, "network_id": "1234", "base_url": server.url}
    (workdir / "airbyte-config.json").write_text(json.dumps(config))
    stream = {"name": "destinations", "json_schema": {}, "supported_sync_modes": ["full_refresh"]}
    catalog = {"streams": [{"stream": stream, "sync_mode": "full_refresh",
                            "destination_sync_mode": "overwrite"}]}  # fmt: skip
    (workdir / "airbyte-catalog.json").write_text(json.dumps(catalog))
    argv = [sys.executable, "-m", "tap_invoca_destinations.airbyte", "read",
            "--config", str(workdir / "airbyte-config.json"),
            "--catalog", str(workdir / "airbyte-catalog.json")]  # fmt: skip
    return Command("airbyte source", argv, {**BASE_ENV, "PYTHONPATH": str(build)}, server.count)


def script(name: str, server: Server, *flags: str) -> Command:
    argv = [sys.executable, str(ROOT / "benchmarks" / "baseline.py"), server.url, TOKEN, *flags]
    return Command(name, argv, BASE_ENV, server.count)


def floor(server: Server, concurrency: int) -> Command:
    argv = [sys.executable, str(ROOT / "benchmarks" / "floor.py"), server.url, TOKEN,
            str(server.count), str(concurrency)]  # fmt: skip
    return Command("floor", argv, BASE_ENV, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default="S1,S2,S3", help="comma-separated subset to run")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="shrink record counts (e.g. 0.1) for a quick look"
    )
    parser.add_argument(
        "--build", action="append", default=[], metavar="NAME=PATH",
        help="another checkout of the tap to measure beside this one",
    )  # fmt: skip
    args = parser.parse_args()
    builds = {"tap": ROOT} | {
        name: Path(path).resolve() for name, path in (b.split("=", 1) for b in args.build)
    }
    load = os.getloadavg()[0]
    print(
        f"# {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"runs={args.runs}, load average at start {load:.1f}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="invoca-bench-"))
    # Measure each build as pip installs it, with bytecode compiled (a checkout
    # may have none, e.g. under PYTHONDONTWRITEBYTECODE=1).
    for build in builds.values():
        compileall.compile_dir(build / "tap_invoca_destinations", quiet=1)

    scenarios = set(args.scenarios.upper().split(","))
    if "S1" in scenarios:
        s1(args.runs, int(100_000 * args.scale), builds, workdir)
    if "S2" in scenarios:
        s2(args.runs, int(20_000 * args.scale), builds, workdir)
    if "S3" in scenarios:
        s3(int(20_000 * args.scale), int(200_000 * args.scale), builds, workdir)


def row(name: str, result: Result, count: int) -> str:
    return (
        f"    {name:22s} {result.wall:7.2f} s  {count / result.wall:9,.0f} rec/s  "
        f"CPU {result.cpu:6.2f} s  peak RSS {result.rss:6.1f} MiB"
    )


def s1(runs: int, count: int, builds: dict[str, Path], workdir: Path) -> None:
    server = Server(count)
    try:
        commands = [tap(name, path, server, workdir) for name, path in builds.items()]
        commands += [
            airbyte(ROOT, server, workdir),
            script("json (strptime)", server),
            script("json (fromisoformat)", server, "--tuned"),
            script("orjson", server, "--orjson"),
            floor(server, CEILING),
        ]
        results = medians(runs, commands, workdir)
    finally:
        server.stop()
    print(f"\nS1  {count:,} destinations, no added latency (median of {runs})")
    for name, result in results.items():
        print(row(name, result, count))
    plain, fast, low = results["json (fromisoformat)"], results["orjson"], results["floor"]
    for name in builds:
        mine = results[name]
        print(
            f"    {name}: / json = {mine.wall / plain.wall:.2f} (target <= 0.6), "
            f"/ orjson = {mine.wall / fast.wall:.2f} (target < 1), "
            f"/ json (strptime) = {mine.wall / results['json (strptime)'].wall:.2f}; "
            f"CPU {mine.cpu / count * 1e6:.1f} us/record, floor {low.cpu / count * 1e6:.1f} "
            f"us/record, ratio {mine.cpu / low.cpu:.2f} (aim <= 2)"
        )
    source = results["airbyte source"]
    print(f"    airbyte source / tap = {source.wall / results['tap'].wall:.2f} (target <= 1.2)")


def s2(runs: int, count: int, builds: dict[str, Path], workdir: Path) -> None:
    server = Server(count, latency_ms=30)
    try:
        commands = [tap(name, path, server, workdir) for name, path in builds.items()]
        commands += [
            tap("tap, max_concurrency=1", ROOT, server, workdir, max_concurrency=1),
            script("sequential script", server, "--tuned"),
        ]
        results = medians(runs, commands, workdir)
    finally:
        server.stop()
    pages = -(-count // 100)
    print(f"\nS2  {count:,} destinations, 30 ms added per request (median of {runs})")
    for name, result in results.items():
        print(f"    {name:24s} {result.wall:7.2f} s")
    print(f"    sequential lower bound: {pages} requests x 30 ms = {pages * 0.03:.2f} s")
    sequential = results["sequential script"]
    for name in builds:
        print(
            f"    {name}: / sequential script = {results[name].wall / sequential.wall:.2f} "
            f"(target <= 0.2), / max_concurrency=1 = "
            f"{results[name].wall / results['tap, max_concurrency=1'].wall:.2f}"
        )


def s3(small: int, large: int, builds: dict[str, Path], workdir: Path) -> None:
    print("\nS3  peak RSS")
    for count in (small, large):
        server = Server(count)
        try:
            commands = [tap(name, path, server, workdir) for name, path in builds.items()]
            results = medians(1, commands, workdir)
        finally:
            server.stop()
        cells = ", ".join(f"{name} {r.rss:5.1f} MiB" for name, r in results.items())
        print(f"    {count:,} destinations: {cells}   (target <= 60 MiB, flat)")


if __name__ == "__main__":
    main()
