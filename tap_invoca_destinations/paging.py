"""Paging pieces without HTTP: the id-anchored pager, the retry policy, the prefetch window.

``Pager`` decides, from per-page facts only (offset and limit asked, ids received,
the ``recordsTotal`` hint), what to request next and which part of each page is
new. ``RetryPolicy`` turns an attempt number, ``Retry-After`` and the budget used
into a wait or a refusal. ``PrefetchWindow`` keeps fetches in flight (sent ahead
and read by the consumer, or run on daemon threads) and hands their results back
strictly in the order they were asked for; ``Watchdog`` ends the consumer's
reads at their deadline.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import math
import queue
import random
import threading
import time
import typing as t
from concurrent.futures import Future
from dataclasses import dataclass, field

if t.TYPE_CHECKING:
    from collections.abc import Callable

MAX_STALLED_PAGES = 2  # pages in a row with nothing new that do not move toward the anchor
MAX_IDLE_PAGES = 1000  # pages in a row with nothing new, even while they move toward it
MAX_STEP_BACKS = 1000  # re-reads after the list shrank under us, per sync
MAX_RECHECKS = 2  # second looks at start=0 before calling a server's paging broken
MAX_DOUBTS = 5  # confirming requests of an end that recordsTotal contradicts (a Pager default)

T = t.TypeVar("T")


class PagingError(Exception):
    """Paging cannot go on safely; the message says what the server did."""


class UnsettledListError(PagingError):
    """The list could not be read whole now (it kept changing, or its end stayed doubtful).

    The server's paging is not broken: a later run may well succeed.
    """


class Cancelled(Exception):  # noqa: N818 - it is a state, not a failure of its own
    """A fetch was given up because its result is no longer wanted."""


@dataclass(frozen=True)
class Request:
    """One list request: ``start`` (offset) and ``limit``; after a backoff if ``backoff`` > 0.

    ``backoff`` is the attempt number of the wait before sending (as for a retry); it
    takes no part in equality: the same page asked after a wait is the same page.
    """

    start: int
    limit: int
    backoff: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Step:
    """What to do with a page: emit its records from ``emit_from`` on; drop the prefetches?"""

    emit_from: int
    discard: bool = False  # the pages in flight were planned on a wrong guess: drop them
    doubt: str = ""  # the end this page suggests is doubtful: why (for the log); confirming


def parse_total(value: object) -> int | None:
    """Read ``recordsTotal`` as a hint: an integer, an integral float or a digit string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def check_ids(ids: list[int], start: int) -> None:
    """Refuse a page whose ids are not strictly ascending.

    Raises:
        PagingError: On a duplicate id or ids out of order.
    """
    for a, b in itertools.pairwise(ids):
        if a >= b:
            what = f"id {a} twice" if a == b else f"id {a} before id {b}"
            msg = (
                f"Invoca returned {what} in the page at start={start} "
                "(sort_by=id ignored, or duplicates); paging would not be safe"
            )
            raise PagingError(msg)


@dataclass
class Pager:
    """Id-anchored offset paging that ends only on evidence.

    Every request after the first starts at the offset of the last emitted
    record (the anchor) and asks for ``page_size + 1``. Rules, per page:

    - ids must be strictly ascending, else fail;
    - a page at ``start > 0`` that begins with the list's first id means the
      server ignores ``start``, or ids were inserted before the first: it is
      set aside, ``start=0`` read again, and the page set aside read again;
      after ``MAX_RECHECKS`` such rounds, fail;
    - not anchored (its first id is above the anchor, or it is empty at
      ``start > 0``): records before the offset were deleted, so step back one
      page and read again (at most ``MAX_STEP_BACKS`` times);
    - anchored: emit the ids above the anchor. The list has ended when a page
      holds one record only (the anchor, or at ``start=0`` the whole list) and
      fewer records than the server has shown it serves for that limit
      (``min(limit, longest page seen)``), or is empty at ``start=0``. Any other
      short page proves nothing (a server may serve fewer than asked at any
      time, and records inserted before the offset shift the anchor right): the
      page from its last record on is read too, so a sync ends with a request
      that finds only the anchor.
      ``recordsTotal`` never ends paging; it only stops speculative prefetches;
    - an anchored page with nothing new (records were inserted before the
      anchor) is fine while such pages move toward the anchor; more than
      ``MAX_STALLED_PAGES`` in a row that do not, or more than ``MAX_IDLE_PAGES``
      in a row, fail. While no page has held more than one record (a server
      serving one record per page cannot be anchored), the one-record list is
      proven by an empty page at ``start=1`` and the record re-read at 0 (the
      anchor, or the same record twice). Rechecks (``MAX_RECHECKS``) are counted
      from the last page that brought something new;
    - an end must agree with the server's own count: when the ending page's
      ``recordsTotal`` says the list is longer than that page shows (``start``
      plus its records), the end is doubtful (a page served short once, an empty
      list served while the total is not zero). The same offset is asked again
      with another limit, after a backoff, up to ``max_doubts`` times; a real end
      stays, a glitch goes. If the contradiction stays, fail naming both numbers.
      A total below what the page shows is a stale hint and harmless. With
      ``strict`` (mirror mode, where the target deletes what it did not get), an
      end that no total corroborates (none, or one below what the pages show, or
      an empty list) is confirmed once the same way; so is an end whose page has
      no total while an earlier page's total said more.
    """

    page_size: int
    max_doubts: int = MAX_DOUBTS
    strict: bool = False  # confirm an end that no total corroborates (mirror mode)
    last_id: int | None = field(default=None, init=False)  # the last id emitted
    first_id: int | None = field(default=None, init=False)  # the list's first, seen at start=0
    longest: int = field(default=0, init=False)  # most records one page has held
    stride: int = field(default=0, init=False)  # records a page is expected to hold
    total: int | None = field(default=None, init=False)  # the latest usable recordsTotal
    requests: int = field(default=0, init=False)
    emitted: int = field(default=0, init=False)
    done: bool = field(default=False, init=False)
    in_flight: collections.deque[Request] = field(default_factory=collections.deque, init=False)
    _next: Request | None = field(default=None, init=False)  # the page needed next
    _probe: str | None = field(default=None, init=False)  # beyond/confirm/recheck/front
    _set_aside: Request | None = field(default=None, init=False)  # read again after "front"
    _rechecks: int = field(default=0, init=False)  # in a row, without progress
    _lone: int | None = field(default=None, init=False)  # the last "confirm" page's one id
    _idle: int = field(default=0, init=False)
    _stalled: int = field(default=0, init=False)
    _idle_last: int | None = field(default=None, init=False)  # last id of the last idle page
    doubts: int = field(default=0, init=False)  # confirming requests of the current end
    _confirming: bool = field(default=False, init=False)  # a confirming request is in flight
    _step_backs: int = field(default=0, init=False)

    @property
    def limit(self) -> int:
        """The limit of every request after the first: a page plus the anchor."""
        return self.page_size + 1

    def plan(self, window: int) -> list[Request]:
        """Requests to send now so that up to ``window`` are in flight, in order."""
        if self.done:
            return []
        new: list[Request] = []
        if self._next is None and not self.requests:
            new.append(Request(0, self.page_size))  # alone: nothing is known yet
        elif not self.in_flight and self._next is not None:
            new.append(self._next)
        tail = new[-1] if new else (self.in_flight[-1] if self.in_flight else None)
        while (
            tail is not None
            and self.requests
            and self._probe is None
            and self._set_aside is None  # no guessing while a page is being checked
            and not self._confirming
            and self.stride >= 2  # noqa: PLR2004 - a page must hold the anchor and one more
            and len(self.in_flight) + len(new) < window
        ):
            start = tail.start + self.stride - 1
            if self.total is not None and start >= self.total:
                # Past the hinted end: only the needed page goes there. A page
                # starting at the hinted last record is the proof of the end.
                break
            tail = Request(start, self.limit)
            new.append(tail)
        self.in_flight.extend(new)
        self.requests += len(new)
        return new

    def feed(self, ids: list[int], total: object = None) -> Step:
        """Take the facts of the oldest page in flight and say what to do.

        Raises:
            PagingError: If the server's pages cannot be paged safely.
        """
        request = self.in_flight.popleft()
        self._confirming = False
        if self._probe is None and request == self._set_aside:
            self._set_aside = None  # the page set aside, read again
        start = request.start
        check_ids(ids, start)
        hint = parse_total(total)
        if hint is not None:
            self.total = hint
        self.longest = max(self.longest, len(ids))
        step = self._check_or_probe(request, ids, hint)
        if step is not None:
            return step
        if not self._anchored(start, ids):
            return self._step_back(start, len(ids))
        first_new = self._take(ids)
        end = self._end_of_list(start, ids, request.limit, hint, first_new)
        if end is not None:
            return end
        if len(ids) >= min(request.limit, self.longest):
            # A server that honours `limit` fills the next (larger) requests too.
            self.stride = self.limit if len(ids) == request.limit else len(ids)
        if first_new == len(ids):
            self._idle_page(start, request.limit, ids)
        if self._probe is None:
            self._next = Request(start + len(ids) - 1, self.limit)
        return Step(first_new, discard=self._drop_mispredicted())

    def _check_or_probe(self, request: Request, ids: list[int], hint: int | None) -> Step | None:
        if self._first_id_again(request, ids):
            return self._check_front(request, len(ids))
        return self._after_probe(ids, hint) if self._probe is not None else None

    def _take(self, ids: list[int]) -> int:
        """Record the ids above the anchor as emitted; return the index of the first."""
        first_new = 0 if self.last_id is None else bisect.bisect_right(ids, self.last_id)
        if first_new < len(ids):
            self._idle, self._stalled, self._idle_last, self._rechecks = 0, 0, None, 0
            self.doubts = 0
            self.last_id = ids[-1]
            self.emitted += len(ids) - first_new
        return first_new

    def _end_of_list(
        self, start: int, ids: list[int], limit: int, hint: int | None, first_new: int
    ) -> Step | None:
        """The step that ends paging, if this page proves the end (see class docstring)."""
        if not ids and start == 0:
            return self._end_if_undoubted(start, 0, hint, 0)  # an empty list
        if len(ids) == 1 < min(limit, self.longest):
            # The list ends with this (anchored) record.
            return self._end_if_undoubted(start, start + 1, hint, first_new)
        return None

    def _end_if_undoubted(self, start: int, shown: int, hint: int | None, first_new: int) -> Step:
        """Finish, unless the server's total says more than the ``shown`` records remain.

        Raises:
            PagingError: If the contradiction stays after ``max_doubts`` confirmations.
        """
        if hint is not None and hint > shown:
            doubt = (
                f"an empty list while its recordsTotal says {hint}"
                if shown == 0
                else f"pages that end after {shown} records (the page at start={start} holds "
                f"the last one alone) while its recordsTotal says {hint}"
            )
        elif not self.doubts and hint is None and self.total is not None and self.total > shown:
            # This page has no total, but an earlier one said more: look once more
            # (only once: the earlier total may be stale after deletions).
            doubt = (
                f"pages that end after {shown} records while an earlier recordsTotal "
                f"said {self.total}"
            )
        elif self.strict and not self.doubts and (hint is None or hint < shown or shown == 0):
            # Mirror mode: only a total equal to what the pages show corroborates an end.
            doubt = f"pages that end after {shown} records, and no recordsTotal that agrees"
        else:
            return self._finish(first_new)
        self.doubts += 1
        if self.doubts > self.max_doubts and hint is not None and hint > shown:
            again = f", {self.max_doubts} time(s) more when asked again" if self.max_doubts else ""
            msg = (
                f"Invoca served {doubt}{again}: the list cannot be proven complete; run the "
                "sync again later"
            )
            raise UnsettledListError(msg)
        # The same offset with another limit (two, alternately: a cache keyed by URL
        # cannot hand back one glitch every time), after a backoff: a glitch passes,
        # an end stays.
        smaller = start and self.page_size > 1 and self.doubts % 2
        other_limit = self.page_size if smaller else self.page_size + 2
        self._next = Request(start, other_limit, backoff=self.doubts)
        self._confirming = True
        self.in_flight.clear()
        return Step(first_new, discard=True, doubt=f"Invoca served {doubt}")

    def _first_id_again(self, request: Request, ids: list[int]) -> bool:
        """Note the first id at ``start=0``; True if a page at ``start > 0`` begins with it."""
        if request.start == 0:
            if ids and self._probe != "front":
                self.first_id = ids[0]
            return False
        return bool(ids) and ids[0] == self.first_id and self._probe is None

    def _check_front(self, request: Request, received: int) -> Step:
        # Either 'start' is ignored or ids were inserted before the first: read start=0 again.
        self._recheck(self._ignores_start(request.start, self.first_id))
        self._probe, self._set_aside = "front", request
        self._next = Request(0, self.limit)
        self.in_flight.clear()
        return Step(received, discard=True)

    def _recheck(self, failure: str) -> None:
        self._rechecks += 1
        if self._rechecks > MAX_RECHECKS:
            raise PagingError(failure)

    @staticmethod
    def _ignores_start(start: int, first_id: int | None) -> str:
        return (
            f"Invoca answered start={start} with the list's first record (id {first_id}) "
            "again: the server ignores 'start', so the list cannot be paged"
        )

    def _anchored(self, start: int, ids: list[int]) -> bool:
        if start == 0:
            return True
        return bool(ids) and self.last_id is not None and ids[0] <= self.last_id

    def _finish(self, first_new: int) -> Step:
        self.done = True
        discard = bool(self.in_flight)
        self.in_flight.clear()
        return Step(first_new, discard=discard)

    def _step_back(self, start: int, received: int) -> Step:
        self._step_backs += 1
        if self._step_backs > MAX_STEP_BACKS:
            msg = (
                f"the list kept shrinking under the tap ({MAX_STEP_BACKS} re-reads); "
                "run the sync again later"
            )
            raise UnsettledListError(msg)
        self._next = Request(max(0, start - max(self.stride - 1, 1)), self.limit)
        self.in_flight.clear()
        return Step(received, discard=True)

    def _idle_page(self, start: int, limit: int, ids: list[int]) -> None:
        if self.longest <= 1:
            if start != 0:
                msg = (
                    f"Invoca returns one record per page (start={start}, limit={limit}): "
                    "such pages cannot be checked against each other; ask Invoca to honour "
                    "'limit'"
                )
                raise PagingError(msg)
            self._probe = "beyond"
            self._next = Request(1, self.limit)
            return
        # Records inserted before the anchor push it right; pages that bring nothing
        # new are fine while they move toward it (their last id keeps growing).
        moved = self._idle_last is None or ids[-1] > self._idle_last
        self._stalled = 0 if moved else self._stalled + 1
        self._idle_last = ids[-1]
        self._idle += 1
        if self._stalled > MAX_STALLED_PAGES or self._idle > MAX_IDLE_PAGES:
            msg = (
                f"Invoca returned no new records at start={start} {self._idle} times in a row "
                "(the server does not honour 'start', or records keep being inserted ahead "
                "of the read position)"
            )
            raise PagingError(msg)

    def _after_probe(self, ids: list[int], hint: int | None) -> Step | None:
        if self._probe == "front":
            # Read the page set aside again: a server that ignores 'start' repeats itself.
            self._probe, self.first_id = None, (ids[0] if ids else None)
            self._next = self._set_aside
            return Step(len(ids), discard=self._drop_mispredicted())
        if self._probe == "beyond":
            # Empty: confirm the one record at start=0. Not empty: the list grew, or the
            # server serves one record per page; a second look at start=0 tells which.
            self._probe = "recheck" if ids else "confirm"
            self._next = Request(0, self.limit)
            return Step(len(ids), discard=self._drop_mispredicted())
        probe, self._probe = self._probe, None
        if probe == "confirm" and len(ids) == 1:
            # start=1 was empty, and start=0 holds one record: the whole list if it is
            # the anchor, or the same record twice in a row (a record that replaced it).
            # Otherwise a record may have been inserted before the last one: look again.
            if ids[0] in (self.last_id, self._lone):
                return self._end_if_undoubted(0, 1, hint, self._take(ids))
            self._lone = ids[0]
            probe = "recheck"
        if probe == "recheck" and len(ids) <= 1:
            self._recheck(
                "Invoca returns one record per page (limit ignored at start=0 and "
                "start=1), or the list keeps changing: such pages cannot be checked "
                "against each other"
            )
            self._probe = "beyond"
            self._next = Request(1, self.limit)
            return Step(len(ids), discard=self._drop_mispredicted())
        return None  # the list changed: page on as usual

    def _drop_mispredicted(self) -> bool:
        # A prefetched page must start exactly where the next one is needed.
        if self.in_flight and self._next is not None and self.in_flight[0] != self._next:
            self.in_flight.clear()
            return True
        return False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, ``Retry-After``, and bounds in tries and time."""

    max_tries: int = 6
    budget_seconds: float = 300.0
    initial_wait: float = 1.0
    max_single_wait: float = 120.0  # cap on one wait, whatever Retry-After asks for
    jitter: Callable[[], float] = random.random  # a number in [0, 1)

    def wait(self, attempt: int, waited: float, retry_after: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up.

        ``Retry-After`` lengthens the backoff, never shortens it: ``0``, a date in
        the past, or an invalid value (negative, ``nan``, infinite) leaves the
        usual backoff, so a server cannot turn it off.
        """
        seconds = self.backoff(attempt)
        if retry_after is not None and math.isfinite(retry_after) and retry_after > seconds:
            seconds = min(retry_after, self.max_single_wait)
        if attempt >= self.max_tries or waited + seconds > self.budget_seconds:
            return None
        return seconds

    def backoff(self, attempt: int) -> float:
        """The jittered exponential wait after attempt ``attempt`` (no bounds applied)."""
        seconds = min(self.initial_wait * 2 ** (attempt - 1), self.max_single_wait)
        return seconds * (0.5 + 0.5 * self.jitter())

    def give_up_message(self, attempt: int, waited: float, failure: str) -> str:
        """The one-line error once retries are exhausted."""
        return (
            f"gave up after {attempt} attempt(s) and {waited:.1f} s of waiting "
            f"(max_tries={self.max_tries}, max_retry_seconds={self.budget_seconds:g}): {failure}"
        )


class DaemonPool:
    """Reusable daemon threads for fetches and requests.

    Starting a thread costs ~0.15 ms of CPU here (the new thread must get the GIL
    to say it started), and a page took two: a fetch and its request. A task runs
    on an idle thread, or on a new one if none is idle, so a request stuck past
    its deadline never holds up others. Threads are daemons (a fatal error or a
    signal ends the process at once) and end after ``IDLE_SECONDS`` without work.
    """

    IDLE_SECONDS = 5.0

    def __init__(self, name: str) -> None:
        """Name the threads; none is started before the first task."""
        self._name = name
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, task: Callable[[], None]) -> None:
        """Run ``task`` now on a thread of the pool (it must not raise)."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._tasks.put(task)
                return
        threading.Thread(target=self._work, args=(task,), name=self._name, daemon=True).start()

    def _work(self, task: Callable[[], None]) -> None:
        while True:
            task()
            with self._lock:
                self._idle += 1
            try:
                task = self._tasks.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:  # a task put as the wait ended is still ours
                    try:
                        task = self._tasks.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return


WORKERS = DaemonPool("invoca-worker")


class SentAhead(t.Protocol[T]):
    """A fetch on the wire whose answer the consumer reads itself (see ``PrefetchWindow``)."""

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the answer to start; True once it has, or never will.

        Called while it is the oldest fetch: its deadline counts from the first call.
        """
        ...

    def look(self) -> bool:
        """See, without waiting, whether the answer has started; True while it holds its place.

        A fetch sent ahead holds a place on the wire (``AdaptiveWindow.take``)
        until its answer starts or its deadline passes; it gives the place back
        then, so that retries waiting for a place are not held up by answers
        that only wait to be read.
        """
        ...

    def read(self, result: Future[T]) -> None:
        """Read the answer into ``result``, or leave ``result`` to a daemon thread (retries)."""
        ...

    def drop(self) -> None:
        """Give up on the answer, unread."""
        ...


class PrefetchWindow(t.Generic[T]):
    """Fetches in flight, consumed strictly in submission order.

    A fetch is sent ahead by ``send_ahead`` when it can be (its answer is then
    read on the consumer's thread when its turn comes: no thread hands it over,
    and the interpreter lock stays with one thread), else run whole by
    ``fetch`` on a daemon thread. Daemon threads, not an executor: a fatal
    error or a signal ends the process at once instead of waiting for requests
    still running. Each fetch gets an event that is set when its result is no
    longer wanted, so a fetch waiting to retry stops at once.
    """

    LOOK_AHEAD_SECONDS = 0.05  # how often answers sent ahead are looked at while a thread works

    def __init__(
        self,
        fetch: Callable[[Request, threading.Event], T],
        send_ahead: Callable[[Request, threading.Event], SentAhead[T] | None] | None = None,
    ) -> None:
        """Prepare to run ``fetch``; how many at once is the caller's (see ``AdaptiveWindow``)."""
        self._fetch = fetch
        self._send_ahead = send_ahead
        self._idled_at = time.monotonic()
        self._slots: collections.deque[
            tuple[Request, Future[T], threading.Event, SentAhead[T] | None]
        ] = collections.deque()

    def __len__(self) -> int:
        """Fetches in flight."""
        return len(self._slots)

    def submit(self, request: Request) -> None:
        """Send ``request`` ahead now, or start fetching it on a daemon thread."""
        future: Future[T] = Future()
        cancel = threading.Event()
        sent = self._send_ahead(request, cancel) if self._send_ahead is not None else None
        self._slots.append((request, future, cancel, sent))
        if sent is None:
            WORKERS.run(lambda: settle(future, lambda: self._fetch(request, cancel)))

    def pop(self, idle: Callable[[], None] | None = None, every: float = 1.0) -> tuple[Request, T]:
        """Wait for the oldest fetch and return it (its exception is raised here).

        While waiting, ``idle`` is called once per ``every`` seconds of waiting,
        counted across pops, and before reading an answer sent ahead. If it
        raises, the fetch stays in the window, for ``discard``.
        """
        request, future, cancel, sent = self._slots[0]
        if sent is not None:
            if idle is not None:
                # Before the read, which may block on this thread: a response that
                # stalls halfway must not hold back what the consumer has to write.
                self._idle(idle)
            while idle is not None and not sent.ready(
                max(self._idled_at + every - time.monotonic(), 0.0)
            ):
                self._idle(idle)
            self._slots[0] = (request, future, cancel, None)
            sent.read(future)
        while not future.done():
            if idle is not None and time.monotonic() >= self._idled_at + every:
                self._idle(idle)
                continue
            # Answers sent ahead behind this one are looked at meanwhile: one that
            # has started arriving gives its place on the wire back (see SentAhead).
            holding = [s for _, _, _, s in self._slots if s is not None and s.look()]
            wait = None if idle is None else self._idled_at + every - time.monotonic()
            if holding:
                wait = (
                    self.LOOK_AHEAD_SECONDS if wait is None else min(wait, self.LOOK_AHEAD_SECONDS)
                )
            with contextlib.suppress(TimeoutError):  # concurrent.futures' own since 3.11
                future.exception(timeout=wait)
        self._slots.popleft()
        return request, future.result()

    def _idle(self, idle: Callable[[], None]) -> None:
        idle()
        self._idled_at = time.monotonic()

    def discard(self) -> None:
        """Drop every fetch in flight: answers sent ahead unread; threads end on their own."""
        while self._slots:
            _, _, cancel, sent = self._slots.pop()
            cancel.set()
            if sent is not None:
                sent.drop()


def settle(future: Future[T], work: Callable[[], T]) -> None:
    """Run ``work`` and put its result or exception in ``future`` (for a daemon thread)."""
    try:
        future.set_result(work())
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer
        future.set_exception(exc)


class Watchdog:
    """Calls a read's ``cut`` once its deadline passes: one read watched at a time.

    The consumer reads the answers sent ahead one after another, so one
    watched read is enough; a read's socket timeout bounds each receive, not a
    server that trickles bytes (see ``transport.InFlight``). Its thread wakes
    only at deadlines (or is woken when it has nothing to watch), so watching a
    read that ends in time costs two lock round trips, and no thread switch.
    """

    def __init__(self) -> None:
        """Watch nothing yet; the thread starts with the first watch."""
        self._cond = threading.Condition(threading.Lock())
        self._current: tuple[float, Callable[[], None]] | None = None
        self._until: float | None = None  # when the thread wakes next; None: not until told
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, cut: Callable[[], None]) -> None:
        """Call ``cut`` at ``deadline`` (monotonic) unless ``clear`` comes first."""
        with self._cond:
            self._current = (deadline, cut)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="invoca-watchdog", daemon=True
                )
                self._thread.start()
            elif self._until is None or deadline < self._until:
                self._cond.notify()

    def clear(self) -> None:
        """The watched read is over."""
        with self._cond:
            self._current = None

    def _run(self) -> None:
        with self._cond:
            while True:
                current = self._current
                if current is None:
                    self._until = None
                    self._cond.wait()
                    continue
                deadline, cut = current
                if time.monotonic() < deadline:
                    self._until = deadline
                    self._cond.wait(deadline - time.monotonic())
                    continue
                self._current = None
                cut()


class AdaptiveWindow:
    """How many pages to keep in flight: grows while pages come back promptly, halves on trouble.

    - It starts at ``start`` and never leaves ``1..ceiling``.
    - A page that came back without trouble in at most ``PROMPT_FACTOR`` times the
      quickest response seen so far is prompt (its time runs until the consumer
      has it: one that waited for a busy consumer is not prompt, and more pages
      in flight would not help then): each prompt page widens the window
      by one (so it can double in a round trip), up to the ceiling and below any
      size that met trouble before.
    - Trouble (429, 5xx, a timeout) halves it, and the size that met trouble, less
      one, becomes a cap for the rest of the run, so a server that throttles above
      N requests in flight settles the window at or below N after a few 429s.
      Trouble reported for requests sent before the last cut is not counted
      again: the pages of one crowded moment halve the window once, not once each.
    - ``slot`` keeps the requests on the wire within the window: after a cut, the
      retries of a crowded moment wait for its other requests to come back rather
      than crowd the server again.

    Thread-safe; no I/O. ``sent``, ``slot`` or ``take`` returns a ticket for ``prompt``/``trouble``.
    """

    PROMPT_FACTOR = 2.0

    def __init__(self, start: int, ceiling: int) -> None:
        """Start at ``start`` pages in flight, never more than ``ceiling``."""
        self.ceiling = max(ceiling, 1)
        self.size = min(max(start, 1), self.ceiling)
        self.cap = self.ceiling  # lowered by trouble
        self.quickest: float | None = None
        self.cuts = 0  # how many times trouble halved the window
        self.on_the_wire = 0  # requests inside ``slot``
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)

    def sent(self) -> int:
        """Note a request being sent; return its ticket."""
        return self.cuts

    @contextlib.contextmanager
    def slot(self, cancel: threading.Event) -> t.Iterator[int]:
        """Wait until fewer than ``size`` requests are on the wire, hold a place; yield a ticket.

        Raises:
            Cancelled: If ``cancel`` is set while waiting.
        """
        with self._room:
            while self.on_the_wire >= self.size:
                if cancel.is_set():
                    raise Cancelled
                self._room.wait(0.05)  # also wakes on a cancel nobody notifies us of
            self.on_the_wire += 1
            ticket = self.cuts
        try:
            yield ticket
        finally:
            self.give_back()

    def take(self) -> int | None:
        """Hold a place on the wire if there is room now, without waiting; return its ticket."""
        with self._room:
            if self.on_the_wire >= self.size:
                return None
            self.on_the_wire += 1
            return self.cuts

    def give_back(self) -> None:
        """Give back a place held by ``take``."""
        with self._room:
            self.on_the_wire -= 1
            self._room.notify_all()

    def prompt(self, ticket: int, seconds: float) -> int | None:  # noqa: ARG002 - symmetry with trouble
        """A page came back in ``seconds`` without trouble; return the new size if it grew."""
        with self._lock:
            if self.quickest is None or seconds < self.quickest:
                self.quickest = seconds
            if seconds > self.PROMPT_FACTOR * self.quickest or self.size >= self.cap:
                return None
            self.size += 1
            self._room.notify_all()
            return self.size

    def trouble(self, ticket: int) -> int | None:
        """A 429, 5xx or timeout for the request of ``ticket``; return the new size if it fell."""
        with self._lock:
            if ticket != self.cuts:
                return None  # sent before the last cut: that crowd was already answered
            self.cuts += 1
            self.cap = max(1, min(self.cap, self.size - 1))
            new = max(1, self.size // 2)
            if new == self.size:
                return None
            self.size = new
            return new
