"""The floor: the tap's page requests, sent at its concurrency, with every body thrown away.

What a tap cannot go below on this machine: the same requests (``limit`` = page
size on the first, one more on the others, ``start`` moving by a page), the same
HTTP library, N in flight, nothing decoded or written.

Usage: python benchmarks/floor.py BASE_URL TOKEN COUNT [CONCURRENCY] [PAGE_SIZE]
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import requests
from requests.adapters import HTTPAdapter


def main() -> None:
    base_url, token, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    page_size = int(sys.argv[5]) if len(sys.argv) > 5 else 100
    url = f"{base_url}/api/2022-08-01/1234/customer_phone_numbers.json"
    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_maxsize=concurrency))
    headers = {"Authorization": token, "Accept": "application/json"}

    def fetch(start: int) -> int:
        limit = page_size + 1 if start else page_size
        params: dict[str, str | int] = {"sort_by": "id", "sort_dir": "asc"}
        params |= {"start": start, "limit": limit}
        return len(session.get(url, params=params, headers=headers, timeout=60).content)

    with ThreadPoolExecutor(concurrency) as pool:
        fetched = sum(pool.map(fetch, range(0, count + 1, page_size)))
    print(f"{fetched} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
