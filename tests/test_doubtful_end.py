"""A doubtful end is never a success: the end of the list must agree with recordsTotal.

Servers that glitch once (a page holding only the anchor, empty pages while the
total is true) are read whole; servers whose total keeps contradicting the end
fail in one line naming both numbers, and in mirror mode send no ACTIVATE_VERSION.
"""

from __future__ import annotations

import re
import typing as t

import pytest
from helpers import config_for, full_table_catalog, run_cli
from invoca_server import Faults

if t.TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from helpers import TapRun
    from invoca_server import InvocaServer

Factory = t.Callable[..., "InvocaServer"]


def sync(tmp_path: Path, server: InvocaServer, *, mirror: bool, **settings: t.Any) -> TapRun:
    config = config_for(server, emit_activate_version_messages=mirror or None, **settings)
    catalog = full_table_catalog(config) if mirror else None
    return run_cli(tmp_path, config, catalog=catalog)


def activations(run: TapRun) -> int:
    return run.stdout.count('"ACTIVATE_VERSION"')


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize(
    "case",
    [
        ({2: "lone"}, 4, True),  # the first page asked at start > 0 holds only the anchor, once
        ({5: "lone"}, 1, True),  # the same at the 5th page, without prefetching
        ({1: "empty", 2: "empty"}, 4, True),  # two empty lists while the total says 1000
        ({3: "empty", 4: "lone"}, 2, False),  # an empty page at start > 0, then maybe a lone one
    ],
)
def test_a_server_that_glitches_once_is_read_whole(
    tmp_path: Path,
    make_server: Factory,
    case: tuple[dict[int, str], int, bool],
    mirror: bool,  # noqa: FBT001
) -> None:
    glitches, concurrency, confirms = case
    server = make_server(1000, faults=Faults(glitch_pages=glitches))
    run = sync(tmp_path, server, mirror=mirror, max_concurrency=concurrency)
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert activations(run) == int(mirror)
    if confirms:
        assert "asking again to confirm the end of the list" in run.stderr


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize(
    "case",
    [
        # Every response empty while the total says 500: a 5xx in disguise.
        (Faults(glitch_pages=dict.fromkeys(range(1, 50), "empty")), 500,
         "an empty list while its recordsTotal says 500"),
        # A total that always says more than the pages hold.
        (Faults(total_form="fixed", total_value=5000), 250, "end after 250 records.*says 5000"),
        (Faults(total_form="plus_one"), 250, "end after 250 records.*says 251"),
    ],
)  # fmt: skip
def test_an_end_the_total_keeps_contradicting_fails_naming_both_numbers(
    tmp_path: Path,
    make_server: Factory,
    case: tuple[Faults, int, str],
    mirror: bool,  # noqa: FBT001
) -> None:
    faults, count, expected = case
    server = make_server(count, faults=faults)
    run = sync(tmp_path, server, mirror=mirror)
    assert run.returncode == 1
    failure = [line for line in run.stderr.splitlines() if "Sync failed" in line]
    assert len(failure) == 1, run.stderr
    assert re.search(expected, failure[0]), failure[0]
    assert activations(run) == 0
    assert "Traceback" not in run.stderr


def test_mirror_mode_confirms_an_end_that_no_total_corroborates(
    tmp_path: Path, make_server: Callable[..., InvocaServer]
) -> None:
    # Without recordsTotal a one-record page cannot be told from the end by itself;
    # mirror mode, whose ACTIVATE_VERSION deletes rows, asks once more.
    server = make_server(500, faults=Faults(total_form="absent", glitch_pages={2: "lone"}))
    run = sync(tmp_path, server, mirror=True, max_concurrency=1)
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert activations(run) == 1


def test_a_consistent_total_needs_no_confirmation(tmp_path: Path, server: InvocaServer) -> None:
    run = sync(tmp_path, server, mirror=True)
    assert run.returncode == 0, run.stderr
    assert "confirm" not in run.stderr
    assert activations(run) == 1


@pytest.mark.parametrize(
    ("total_form", "glitches"), [("page_len", {2: "lone"}), ("page_len", {1: "empty"})]
)
def test_mirror_mode_does_not_take_a_lower_total_for_proof(
    tmp_path: Path, make_server: Factory, total_form: str, glitches: dict[int, str]
) -> None:
    # Found by review: a total equal to the page's length let one glitch end a
    # mirror run with 100 of 1000 records (or none) and ACTIVATE_VERSION.
    server = make_server(1000, faults=Faults(total_form=total_form, glitch_pages=glitches))
    run = sync(tmp_path, server, mirror=True, max_concurrency=1)
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    assert activations(run) == 1


def test_mirror_mode_with_one_try_does_not_fail_an_honest_end(
    tmp_path: Path, make_server: Factory
) -> None:
    server = make_server(250, faults=Faults(total_form="absent"))
    run = sync(tmp_path, server, mirror=True, max_tries=1)
    assert run.returncode == 0, run.stderr
    assert len(run.records) == 250
    assert activations(run) == 1
