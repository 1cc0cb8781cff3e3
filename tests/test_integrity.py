"""Integrity while the list changes: every destination that exists throughout is emitted once."""

from __future__ import annotations

import typing as t

import pytest
import requests
from helpers import config_for, run_in_process
from invoca_server import Faults, InvocaServer

if t.TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from frontends import Frontend


def check_exactly_once(server: InvocaServer, initial: list[int], emitted: list[int]) -> None:
    """Survivors exactly once; nothing twice; nothing that never existed."""
    assert len(emitted) == len(set(emitted)), "an id was emitted twice"
    assert emitted == sorted(emitted), "records left id order"
    survivors = set(initial) - server.deleted_ids
    missing = survivors - set(emitted)
    assert not missing, f"{len(missing)} destinations that existed throughout were lost"
    assert set(emitted) <= set(initial) | server.inserted_ids


# Each case: page_size, mutate_after_page, delete_count, delete_from, insert_count, insert_at.
CASES = [
    (7, 1, 1, "front", 0, "end"),
    (7, 3, 5, "front", 0, "end"),
    (25, 2, 30, "front", 0, "end"),
    (25, 2, 60, "spread", 0, "end"),
    (100, 1, 3, "front", 0, "end"),
    (100, 2, 150, "front", 0, "end"),
    (25, 2, 0, "front", 10, "front"),
    (25, 1, 0, "front", 40, "front"),
    (7, 4, 0, "front", 5, "end"),
    (25, 2, 12, "front", 12, "front"),
    (10, 3, 25, "spread", 25, "front"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("concurrency", [1, 4])
def test_changes_mid_sync_lose_nothing_and_repeat_nothing(
    make_server: Callable[..., InvocaServer],
    case: tuple[int, int, int, str, int, str],
    concurrency: int,
) -> None:
    page_size, after, deletes, delete_from, inserts, insert_at = case
    faults = Faults(
        mutate_after_page=after,
        delete_count=deletes,
        delete_from=delete_from,
        insert_count=inserts,
        insert_at=insert_at,
    )
    server = make_server(400, faults=faults)
    initial = server.ids()
    run = run_in_process(config_for(server, page_size=page_size, max_concurrency=concurrency))
    assert server.stats.list_pages >= after, "the mutation never happened"
    assert server.deleted_ids or server.inserted_ids
    check_exactly_once(server, initial, [r["id"] for r in run.records])


@pytest.mark.parametrize("concurrency", [1, 4])
def test_changes_with_a_page_cap(
    tmp_path: Path, make_server: Callable[..., InvocaServer], frontend: Frontend, concurrency: int
) -> None:
    faults = Faults(
        page_cap=13, mutate_after_page=3, delete_count=20, insert_count=9, insert_at="front"
    )
    server = make_server(300, faults=faults)
    initial = server.ids()
    run = frontend.run(tmp_path, config_for(server, page_size=50, max_concurrency=concurrency))
    assert run.returncode == 0, run.stderr
    check_exactly_once(server, initial, [r["id"] for r in run.records])


def naive_offset_paging(server: InvocaServer, page_size: int) -> list[int]:
    """What the SDK's OffsetPaginator-style loop does: start += page_size."""
    url = f"{server.url}/api/2022-08-01/{server.network_id}/customer_phone_numbers.json"
    ids: list[int] = []
    start = 0
    while True:
        body = requests.get(
            url,
            params={"limit": page_size, "start": start},
            headers={"Authorization": server.token},
            timeout=10,
        ).json()
        if not body["data"]:
            return ids
        ids += [int(r["id"]) for r in body["data"]]
        start += page_size


def test_the_scenario_really_breaks_naive_offset_paging(
    make_server: Callable[..., InvocaServer],
) -> None:
    # Proof that the cases above can fail: plain offset paging loses survivors
    # on deletions and repeats ids on insertions in exactly these scenarios.
    server = make_server(400, faults=Faults(mutate_after_page=2, delete_count=30))
    initial = server.ids()
    emitted = naive_offset_paging(server, 25)
    assert set(initial) - server.deleted_ids - set(emitted), "naive paging lost nothing?"

    server = make_server(
        400, faults=Faults(mutate_after_page=2, insert_count=10, insert_at="front")
    )
    emitted = naive_offset_paging(server, 25)
    assert len(emitted) != len(set(emitted)), "naive paging repeated nothing?"


@pytest.mark.parametrize("form", ["absent", "string", "page_len", "null"])
@pytest.mark.parametrize("concurrency", [1, 4])
def test_changes_mid_sync_with_an_untrustworthy_total(
    make_server: Callable[..., InvocaServer], form: str, concurrency: int
) -> None:
    # recordsTotal missing, null, mistyped or equal to the page length,
    # while destinations are deleted and inserted between pages.
    faults = Faults(
        total_form=form,
        mutate_after_page=2,
        delete_count=15,
        delete_from="spread",
        insert_count=8,
        insert_at="front",
    )
    server = make_server(300, faults=faults)
    initial = server.ids()
    run = run_in_process(config_for(server, page_size=20, max_concurrency=concurrency))
    assert server.deleted_ids
    check_exactly_once(server, initial, [r["id"] for r in run.records])
