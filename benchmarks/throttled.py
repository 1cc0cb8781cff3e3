"""A run against a throttling server: requests made, time spent waiting, records emitted.

By default every 3rd request is answered 429; with --throttle-above N, every
request that arrives while more than N are in flight (a rate limiter on
concurrency), which the adaptive window should settle under.

Usage: python benchmarks/throttled.py [--count N] [--retry-after SECONDS] [--throttle-above N]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from invoca_server import Faults, InvocaServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--retry-after", default="1", help='seconds, or "" for none')
    parser.add_argument("--throttle-above", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args()
    retry_after = args.retry_after or None
    faults = (
        Faults(throttle_above=args.throttle_above, retry_after=retry_after)
        if args.throttle_above
        else Faults(fail_every=3, fail_status=429, retry_after=retry_after)
    )
    faults.latency_ms = args.latency_ms
    with InvocaServer(args.count, faults=faults) as server:
        config = {
            "api_token": server.token,
            "network_id": server.network_id,
            "base_url": server.url,
        }
        path = Path(tempfile.mkdtemp()) / "config.json"
        path.write_text(json.dumps(config))
        began = time.monotonic()
        result = subprocess.run(
            [str(Path(sys.executable).parent / "tap-invoca-destinations"), "--config", str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        wall = time.monotonic() - began
        records = sum(
            1 for line in result.stdout.splitlines() if line.startswith('{"type":"RECORD"')
        )
        waits = [float(w) for w in re.findall(r"waiting ([\d.]+) s", result.stderr)]
        lowered = re.findall(r"lowering concurrency to (\d+)", result.stderr)
        print(f"exit code          {result.returncode}")
        print(f"records emitted    {records} of {args.count}")
        print(
            f"requests made      {server.stats.requests} ({server.stats.statuses[429]} answered 429)"
        )
        print(
            f"retries            {len(waits)}, waiting {sum(waits):.1f} s in all (Retry-After: {args.retry_after or 'none'})"
        )
        print(f"window lowered to  {' -> '.join(lowered) or 'never lowered'}")
        print(f"most in flight     {server.stats.max_in_flight}")
        print(f"wall time          {wall:.1f} s")


if __name__ == "__main__":
    main()
