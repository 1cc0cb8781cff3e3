"""The adaptive concurrency window: its rules as properties, and against a throttling server."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import typing as t

from helpers import config_for, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from invoca_server import Faults

from tap_invoca_destinations.client import Reply, decode_page
from tap_invoca_destinations.paging import AdaptiveWindow, Cancelled, DaemonPool, Request
from tap_invoca_destinations.tap import TapInvocaDestinations

if t.TYPE_CHECKING:
    from pathlib import Path

    from invoca_server import InvocaServer

    from tap_invoca_destinations.client import InvocaStream

PROPERTY = settings(max_examples=300, deadline=None)

# One event: ("prompt", seconds), ("trouble", 0.0) for the latest ticket, or
# ("stale", 0.0): trouble for a request sent before the latest cut.
EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("prompt"), st.floats(min_value=0.001, max_value=10)),
        st.tuples(st.sampled_from(["trouble", "stale"]), st.just(0.0)),
    ),
    max_size=60,
)


@PROPERTY
@given(start=st.integers(-2, 20), ceiling=st.integers(-2, 20), events=EVENTS)
def test_the_size_stays_within_one_and_the_ceiling(
    start: int, ceiling: int, events: list[tuple[str, float]]
) -> None:
    window = AdaptiveWindow(start, ceiling)
    assert 1 <= window.size <= max(ceiling, 1)
    assert window.size == min(max(start, 1), max(ceiling, 1))
    for kind, seconds in events:
        ticket = window.sent()
        if kind == "prompt":
            window.prompt(ticket, seconds)
        else:
            window.trouble(ticket - 1 if kind == "stale" else ticket)
        assert 1 <= window.size <= window.cap <= max(ceiling, 1)


@PROPERTY
@given(start=st.integers(1, 16), ceiling=st.integers(1, 16), events=EVENTS)
def test_trouble_halves_once_per_cut_and_caps_growth(
    start: int, ceiling: int, events: list[tuple[str, float]]
) -> None:
    window = AdaptiveWindow(start, ceiling)
    for kind, seconds in events:
        ticket = window.sent()
        if kind == "prompt":
            window.prompt(ticket, seconds)
            continue
        before, stale = window.size, kind == "stale"
        returned = window.trouble(ticket - 1 if stale else ticket)
        if stale:  # sent before the last cut: already answered
            assert window.size == before
            assert returned is None
        else:
            assert window.size == max(1, before // 2)
            assert returned == (window.size if window.size != before else None)
            assert window.cap == max(1, min(window.cap, before - 1))
        # Growth never again reaches the size that met trouble.
        for _ in range(40):
            window.prompt(window.sent(), window.quickest or 0.001)
        if not stale:
            assert window.size <= max(1, before - 1)


@PROPERTY
@given(
    start=st.integers(1, 16),
    ceiling=st.integers(1, 16),
    latencies=st.lists(st.floats(min_value=0.001, max_value=10), min_size=1, max_size=40),
)
def test_the_window_grows_only_on_prompt_pages(
    start: int, ceiling: int, latencies: list[float]
) -> None:
    window = AdaptiveWindow(start, ceiling)
    for seconds in latencies:
        before = window.size
        quickest = min(seconds, window.quickest or seconds)
        grew = window.prompt(window.sent(), seconds)
        if seconds <= AdaptiveWindow.PROMPT_FACTOR * quickest and before < window.cap:
            assert window.size == before + 1
            assert grew == window.size
        else:
            assert window.size == before
            assert grew is None


def test_a_slow_page_does_not_widen_the_window() -> None:
    window = AdaptiveWindow(4, 8)
    window.prompt(window.sent(), 0.030)
    assert window.size == 5
    assert window.prompt(window.sent(), 0.070) is None  # more than twice the quickest
    assert window.size == 5


# One step on the slots: ("enter", 0) a slot, ("take", 0) a place without waiting,
# ("leave", k) for the k-th held one, ("grow", 0), ("cut", 0).
SLOT_STEPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["enter", "take", "grow", "cut"]), st.just(0)),
        st.tuples(st.just("leave"), st.integers(0, 20)),
    ),
    max_size=80,
)


@PROPERTY
@given(start=st.integers(1, 8), ceiling=st.integers(1, 12), steps=SLOT_STEPS)
def test_a_slot_is_given_only_while_fewer_than_size_requests_are_on_the_wire(
    start: int, ceiling: int, steps: list[tuple[str, int]]
) -> None:
    window = AdaptiveWindow(start, ceiling)
    at_once = threading.Event()
    at_once.set()  # a set cancel turns "wait for room" into "enter now or raise"
    held: list[t.Callable[[], object]] = []  # how each held place is given back
    for kind, k in steps:
        room = len(held) < window.size
        if kind == "enter":
            slot = window.slot(at_once)
            try:
                assert slot.__enter__() == window.cuts
            except Cancelled:
                assert not room
            else:
                assert room
                held.append(functools.partial(slot.__exit__, None, None, None))
        elif kind == "take":
            ticket = window.take()
            assert (ticket is not None) == room
            if ticket is not None:
                assert ticket == window.cuts
                held.append(window.give_back)
        elif kind == "leave" and held:
            held.pop(k % len(held))()
        elif kind == "grow":
            window.prompt(window.sent(), window.quickest or 0.001)
        elif kind == "cut":
            window.trouble(window.sent())
        assert window.on_the_wire == len(held)


def test_after_a_cut_a_slot_waits_for_the_crowd_to_come_back() -> None:
    window = AdaptiveWindow(4, 8)
    never = threading.Event()
    with contextlib.ExitStack() as crowd:
        slots = [crowd.enter_context(window.slot(never)) for _ in range(4)]
        assert slots == [0, 0, 0, 0]
        entered = threading.Event()

        def retry() -> None:
            with window.slot(never):
                entered.set()

        waiter = threading.Thread(target=retry)
        waiter.start()
        assert not entered.wait(0.2)  # four on the wire, window of four
        assert window.trouble(0) == 2
        crowd.close()  # all four come back
        waiter.join(5)
        assert entered.is_set()
    assert window.on_the_wire == 0


def test_a_slot_opens_when_the_window_grows_and_a_cancel_ends_the_wait() -> None:
    window = AdaptiveWindow(1, 4)
    cancel = threading.Event()
    outcome: list[str] = []

    def wait_for_a_slot() -> None:
        try:
            with window.slot(cancel):
                outcome.append("entered")
        except Cancelled:
            outcome.append("cancelled")

    with window.slot(cancel):
        first = threading.Thread(target=wait_for_a_slot)
        first.start()
        first.join(0.2)
        assert outcome == []
        window.prompt(window.sent(), 0.01)  # the window grows to 2: room for one more
        first.join(5)
        assert outcome == ["entered"]
        window.trouble(window.sent())  # back to 1, with one on the wire
        second = threading.Thread(target=wait_for_a_slot)
        second.start()
        second.join(0.2)
        assert outcome == ["entered"]
        cancel.set()
        second.join(5)
        assert outcome == ["entered", "cancelled"]


def test_fetch_page_sends_and_retries_only_within_the_window(
    make_server: t.Callable[..., InvocaServer],
) -> None:
    # A window of 2 with one place held here: the first request goes, meets a 503
    # (the window halves to 1), and its retry must wait until the place is given back.
    server = make_server(50, faults=Faults(fail_starts=(0,), fail_times=1, fail_status=503))
    tap = TapInvocaDestinations(config=config_for(server, retry_initial_wait=0.01))
    stream = t.cast("InvocaStream", tap.streams["destinations"])
    window = stream._adaptive = AdaptiveWindow(2, 2)  # noqa: SLF001 - as iter_pages sets it
    never = threading.Event()
    replies: list[Reply] = []
    fetch = threading.Thread(
        target=lambda: replies.append(stream.fetch_page(Request(0, 10), never))
    )
    with window.slot(never):
        fetch.start()
        deadline = time.monotonic() + 5
        while window.size != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert server.stats.requests == 1  # the 503; its retry waits for room
        assert not replies
    fetch.join(5)
    assert server.stats.requests == 2
    assert decode_page(replies[0]).ids == server.ids()[:10]


# --- end to end: a server that throttles above N requests in flight -------------------


def test_the_window_settles_below_a_throttling_servers_limit(
    tmp_path: Path, make_server: t.Callable[..., InvocaServer]
) -> None:
    limit = 3
    server = make_server(3000, faults=Faults(latency_ms=20, throttle_above=limit))
    run = run_cli(tmp_path, config_for(server, page_size=20, max_concurrency=16))
    assert run.returncode == 0, run.stderr
    assert [r["id"] for r in run.records] == server.ids()
    throttled = server.stats.statuses[429]
    assert 1 <= throttled <= 12, throttled  # few, out of ~150 pages
    sizes = [int(line.rsplit(" ", 1)[1]) for line in run.stderr.splitlines() if "lowering" in line]
    assert sizes, run.stderr
    assert sizes[-1] <= limit
    # Once settled, the tap no longer crowds the server: the 429s came early.
    last_429 = max(i for i, line in enumerate(run.stderr.splitlines()) if "HTTP 429" in line)
    pages = [i for i, line in enumerate(run.stderr.splitlines()) if "http_request_duration" in line]
    assert sum(1 for i in pages if i > last_429) > len(pages) // 2


def test_the_window_grows_to_the_ceiling_against_a_prompt_server(
    tmp_path: Path, make_server: t.Callable[..., InvocaServer]
) -> None:
    server = make_server(3000, faults=Faults(latency_ms=40))
    run = run_cli(tmp_path, config_for(server, page_size=50, max_concurrency=12))
    assert run.returncode == 0, run.stderr
    assert len(run.records) == 3000
    assert server.stats.max_in_flight > 4  # it started at 4
    assert server.stats.max_in_flight <= 12
    assert server.stats.statuses[429] == 0


# --- the daemon threads that run fetches and requests ----------------------------------


def test_the_pool_reuses_an_idle_thread_and_never_queues_behind_a_busy_one() -> None:
    pool = DaemonPool("test-worker")
    ran: list[threading.Thread] = []
    first, release, second = threading.Event(), threading.Event(), threading.Event()

    def blocking() -> None:
        ran.append(threading.current_thread())
        first.set()
        release.wait(10)

    def note(event: threading.Event) -> None:
        ran.append(threading.current_thread())
        event.set()

    pool.run(blocking)
    assert first.wait(5)
    pool.run(lambda: note(second))
    assert second.wait(5)  # ran although the first task still blocks its thread
    assert ran[0] is not ran[1]
    assert all(thread.daemon for thread in ran)
    release.set()
    done = threading.Event()
    deadline = 50
    while deadline and not pool._idle:  # noqa: SLF001 - wait until both are idle again
        threading.Event().wait(0.1)
        deadline -= 1
    pool.run(lambda: note(done))
    assert done.wait(5)
    assert ran[2] in ran[:2]  # an idle thread took it: no new thread
