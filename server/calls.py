"""A call in flight, from start to end: what stops its work, and what a clean stop waits for.

`CallWatch` is one call's watch: it cancels the call's engine work when the caller's deadline
passes, the caller cancels, the server's query time limit comes due, or the server stops, and
remembers which, so that the caller is told the right status. Once the call holds a charge, only
the server's own reasons (its limit, a stop) stop the work: a caller who could stop it free would
learn how long the query takes on the records. For the same reason the limit is not free either:
a query it stops after the hold is charged with nothing released (forfeited). `Watchdog` fires
every call's limits from one thread. `InFlight` counts running calls and keeps their watches, so
that a stop can interrupt them and wait until none is left. `WatchedCharger` wraps the ledger's
charger so that each hold, and each commit, is tied to the call's watch.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from engine.backend import Cancellation
from engine.errors import QueryCancelledError
from engine.planner import Plan
from engine.release import Answer, Charger, Release, Reservation
from server.errors import (
    CallCancelledError,
    CallDeadlineError,
    ServerError,
    ServerStoppingError,
)

log = logging.getLogger("veil.server")

# grpc reports "no deadline" as a time remaining of about 2**63 ns.
_NO_DEADLINE = 1e9

# What the caller does, as opposed to the server's own limit ("limit") and stop ("shutdown").
_CALLER_REASONS = frozenset({"deadline", "cancelled"})


# ---- calls in flight ---------------------------------------------------------------------------


@dataclass(eq=False)
class CallWatch:
    """Cancels one call's engine work when its deadline passes, its caller cancels, or the
    server stops; remembers which, so the caller is told the right status.

    Once the call holds a charge (`hold`), its query reads the data, and how long that takes
    depends on the records: a caller who could stop it free (a deadline, a cancel) would learn
    whether it finished in time at no cost, and could try again and again. So from then on only
    the server's own reasons (its query time limit, a stop) interrupt the work; a caller's are
    noted in `caller_gone`, and the release is charged and stored as any other, so that a retry
    under the same request id gets it free. The limit, which the caller sees too, forfeits the
    charge (see `_WatchedReservation.cancel`); a stop, the custodian's doing, gives it back.
    """

    event: Cancellation = field(default_factory=Cancellation)
    reason: str = ""
    ended: bool = False  # the call has returned; a limit that comes due now is moot
    holding: bool = False  # a charge is held: only the server's own reasons stop the work
    caller_gone: str = ""  # the caller's reason, when it came while a charge was held
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fire(self, reason: str) -> None:
        with self._lock:
            if self.event.is_set():
                return
            if self.holding and reason in _CALLER_REASONS:
                self.caller_gone = self.caller_gone or reason
                return
            self.reason = reason
            self.event.set()

    def hold(self) -> bool:
        """Mark the call as holding a charge; False if the work was stopped before that."""
        with self._lock:
            if self.event.is_set():
                return False
            self.holding = True
            return True

    def error(self, limit: float) -> ServerError:
        if self.reason == "deadline":
            return CallDeadlineError(
                "the call's deadline passed before its charge was held; nothing was charged"
            )
        if self.reason == "limit" and self.holding:
            return CallDeadlineError(
                f"the query ran longer than the server's limit of {limit:g} s and was stopped "
                "after its charge was held: it was charged, and nothing was released; ask again "
                "under a new request id (a narrower query finishes sooner)",
                spent=True,
            )
        if self.reason == "limit":
            return CallDeadlineError(
                f"the query ran longer than the server's limit of {limit:g} s and was stopped "
                "before its charge was held; nothing was charged"
            )
        if self.reason == "shutdown":
            return ServerStoppingError("the server is stopping; nothing was charged, retry later")
        return CallCancelledError(
            "the call was cancelled before its charge was held; nothing was charged"
        )


@dataclass(eq=False)
class _Timer:
    """One pending limit: fires `watch` with `reason` unless cancelled first."""

    watch: CallWatch
    reason: str
    cancelled: bool = False
    queued: bool = True  # still in the heap (the thread has not taken it yet)


# Compact the heap once cancelled timers are at least this many and outnumber live ones: each
# compaction is O(n) but follows n/2 cancellations, so a call costs O(log n) amortised.
_COMPACT_AT = 64


class Watchdog:
    """Fires calls' time limits from one thread, instead of a timer thread per call."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Timer]] = []  # a heap, soonest first
        self._cancelled = 0  # timers in the heap whose call has ended
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def fire_after(self, seconds: float, watch: CallWatch, reason: str) -> _Timer:
        """Fire `watch` with `reason` after `seconds`, unless `cancel` is called first."""
        timer = _Timer(watch, reason)
        when = time.monotonic() + seconds
        with self._condition:
            heapq.heappush(self._due, (when, next(self._order), timer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="veil-watchdog", daemon=True)
                self._thread.start()
            if self._due[0][2] is timer:  # sooner than what the thread waits for: wake it
                self._condition.notify()
        return timer

    def cancel(self, timer: _Timer) -> None:
        """Drop a timer whose call has ended, so that ended calls do not pile up until their
        limits pass (at 200 calls/s and a 60 s limit, some 12,000 of them)."""
        with self._condition:
            if timer.cancelled:
                return
            timer.cancelled = True
            if not timer.queued:
                return
            self._cancelled += 1
            if self._cancelled >= _COMPACT_AT and 2 * self._cancelled > len(self._due):
                self._due = [entry for entry in self._due if not entry[2].cancelled]
                heapq.heapify(self._due)
                self._cancelled = 0
                # The soonest limit may have been dropped; the thread's wait is then merely early.

    def _run(self) -> None:
        while True:
            due = []
            with self._condition:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    timer = heapq.heappop(self._due)[2]
                    timer.queued = False
                    if timer.cancelled:
                        self._cancelled -= 1
                    else:
                        due.append(timer)
                if not due:
                    wait = self._due[0][0] - now if self._due else None
                    self._condition.wait(wait)
                    continue
            for timer in due:
                if not timer.watch.ended:  # the call may have ended since it was taken
                    try:
                        timer.watch.fire(timer.reason)
                    except Exception as exc:  # one failure must not end every call's limit
                        log.error("watchdog", extra={"event": "watchdog_error",
                                                     "error": type(exc).__name__})


class InFlight:
    """Counts running calls and holds the watches of running queries, for a clean stop."""

    def __init__(self) -> None:
        self._calls = 0
        self.peak = 0  # the most calls ever running at once
        self._watches: set[CallWatch] = set()
        self._condition = threading.Condition()
        self._watchdog = Watchdog()
        self.stopping = False

    @contextmanager
    def call(self) -> Iterator[None]:
        with self._condition:
            self._calls += 1
            self.peak = max(self.peak, self._calls)
        try:
            yield
        finally:
            with self._condition:
                self._calls -= 1
                self._condition.notify_all()

    @contextmanager
    def watch(self, context: grpc.ServicerContext, *, limit: float) -> Iterator[CallWatch]:
        watch = CallWatch()
        remaining = context.time_remaining()
        deadline = remaining if remaining is not None and remaining < _NO_DEADLINE else None
        # The limit holds even after a deadline that came while a charge was held.
        timers = [self._watchdog.fire_after(limit, watch, "limit")]
        if deadline is not None and deadline < limit:
            timers.append(self._watchdog.fire_after(deadline, watch, "deadline"))
        def on_end() -> None:
            watch.fire("deadline" if _expired(context) else "cancelled")

        if not context.add_callback(on_end):
            on_end()  # the call had already ended: its work must not go on
        with self._condition:
            self._watches.add(watch)
            if self.stopping:
                watch.fire("shutdown")
        try:
            yield watch
        finally:
            watch.ended = True
            for timer in timers:
                self._watchdog.cancel(timer)
            with self._condition:
                self._watches.discard(watch)

    @property
    def calls(self) -> int:
        with self._condition:
            return self._calls

    def cancel_all(self) -> None:
        """Interrupt every running query (their reservations are released, nothing charged)."""
        with self._condition:
            self.stopping = True
            watches = list(self._watches)
        for watch in watches:
            watch.fire("shutdown")

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is running; False if some still are after `timeout` seconds."""
        end = time.monotonic() + timeout
        with self._condition:
            while self._calls:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._condition.wait(left)
        return True


class WatchedCharger:
    """The ledger's charger, tying each hold to the call's watch.

    A call that ends before its charge is held has read nothing: it is refused, uncharged. Once
    the charge is held, only the server's limit or stop interrupts the query (see `CallWatch`),
    and then the commit is refused: the limit forfeits the hold, a stop releases it. The engine
    interrupts DuckDB when the watch fires, but the noise and the commit that follow the
    statement are not interruptible.
    """

    def __init__(self, inner: Charger, watch: CallWatch) -> None:
        self.inner = inner
        self.watch = watch
        self.served_stored = False  # a stored release came back: this call was not charged

    def reserve(
        self, plan: Plan, *, client: str, request_id: str, data_version: str
    ) -> Reservation:
        if self.watch.event.is_set():
            raise QueryCancelledError("the call ended before its charge was reserved")
        reservation = self.inner.reserve(
            plan, client=client, request_id=request_id, data_version=data_version
        )
        self.served_stored = reservation.stored is not None
        if not self.served_stored and not self.watch.hold():
            reservation.cancel()  # ended while the charge was being held: nothing was read
            raise QueryCancelledError("the call ended before its charge was reserved")
        return _WatchedReservation(reservation, self.watch)


class _WatchedReservation:
    def __init__(self, inner: Reservation, watch: CallWatch) -> None:
        self.inner = inner
        self.watch = watch

    @property
    def stored(self) -> Release | None:
        return self.inner.stored

    def commit(self, answer: Answer) -> Release:
        if self.watch.event.is_set():
            self.cancel()
            raise QueryCancelledError("the call ended before its release was recorded")
        return self.inner.commit(answer)

    def cancel(self) -> None:
        """Settle a hold whose query did not end in a release. Stopped by the server's limit,
        it read data for long enough to be stopped, which the caller sees: it is forfeited
        (charged, nothing released). Any other end gives the hold back."""
        if self.watch.reason == "limit":
            self.inner.forfeit("stopped_by_limit")
        else:
            self.inner.cancel()

    def forfeit(self, reason: str) -> None:
        self.inner.forfeit(reason)


def _expired(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0.001


__all__ = [
    "CallWatch",
    "InFlight",
    "Watchdog",
    "WatchedCharger",
]
