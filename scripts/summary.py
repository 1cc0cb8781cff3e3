"""Print what the demo pipeline loaded: the CSV's path and a summary read back from DuckDB."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import duckdb

STATUS = """
    CASE WHEN ignored_at IS NOT NULL THEN 'ignored'
         WHEN dynamic_number_pool_id IS NOT NULL THEN 'tracked'
         ELSE 'discovered' END
"""


def main() -> None:
    """Summarise the CSV and the DuckDB table."""
    csv_path, duckdb_path = Path(sys.argv[1]), Path(sys.argv[2])
    with csv_path.open(newline="", encoding="utf-8") as handle:
        csv_rows = sum(1 for _ in csv.DictReader(handle))
    print(f"\nCSV: {csv_path.resolve()} ({csv_rows} destinations)")
    with duckdb.connect(str(duckdb_path), read_only=True) as db:
        rows = db.execute(
            f"SELECT {STATUS} AS status, count(*) AS destinations, "  # noqa: S608 - constant SQL
            "count(DISTINCT advertiser_campaign_id_from_network) AS campaigns, "
            "min(created_at) AS first_created, max(updated_at) AS last_updated "
            "FROM invoca.destinations GROUP BY 1 ORDER BY 1"
        ).fetchall()
    print(f"DuckDB: {duckdb_path.resolve()} (table invoca.destinations)\n")
    print(
        f"{'status':<11} {'destinations':>12} {'campaigns':>9}  {'first created':<16}  last updated"
    )
    for status, count, campaigns, first, last in rows:
        print(
            f"{status:<11} {count:>12} {campaigns:>9}  {first:%Y-%m-%d %H:%M}  {last:%Y-%m-%d %H:%M}"
        )
    print(f"{'total':<11} {sum(r[1] for r in rows):>12}")


if __name__ == "__main__":
    main()
