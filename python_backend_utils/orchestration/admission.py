"""Admission: how many requests the orchestrator takes at once, and the threads they hold.

Triton 2.51's Python backend hands decoupled BLS responses out through a blocking iterator that
cannot be interrupted: a read whose wait timed out stays blocked in `next()` until the worker
answers or ends the stream. So a request keeps its place until it has answered the client *and*
every thread it started has returned. A worker that never answers then costs one place, visibly
(`lingering`), instead of a thread that silently leaves the pool, and past the limit new requests
are refused at once with a clear error rather than queued behind threads that may never return.

Which request a thread belongs to travels in a context variable: asyncio copies it into every
task a request starts, including its background stops, so the BLS code needs no extra argument.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from dataclasses import dataclass

# A request reads one response at a time; a read that timed out and the stop sent after it may
# need a second thread for a while. Beyond the pool, submissions wait in its queue, never fail.
THREADS_PER_REQUEST = 2


class AdmissionError(ValueError):
    """`max_requests_in_flight` is not a positive integer."""


@dataclass(frozen=True)
class AdmissionCounts:
    in_flight: int  # places taken: requests running, or answered with a thread still out
    lingering: int  # answered requests whose threads have not all returned (a stuck worker read)
    rejected: int  # requests refused at the limit since start


def parse_limit(text: str, default: int) -> int:
    """The `max_requests_in_flight` parameter of config.pbtxt (empty: `default`)."""
    try:
        limit = int(text) if text.strip() else default
    except ValueError:
        raise AdmissionError(f"max_requests_in_flight={text!r} is not an integer") from None
    return Admission(limit).limit


class Ticket:
    """One admitted request's place: held by the request and by each thread it started."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._holders = 1  # the request itself
        self._answered = False

    def hold(self) -> None:
        with self._admission._lock:
            self._holders += 1

    def release(self) -> None:
        self._admission._release(self, answered=False)

    def answered(self) -> None:
        """The request has sent its final response; its place frees when its threads return."""
        self._admission._release(self, answered=True)


class Admission:
    """At most `limit` places; `try_admit` is one lock and two integer operations."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise AdmissionError(f"max_requests_in_flight must be a positive integer, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._in_flight = 0
        self._lingering = 0
        self._rejected = 0

    def try_admit(self) -> Ticket | None:
        """A place for one more request, or None (and counted) when all are taken."""
        with self._lock:
            if self._in_flight >= self.limit:
                self._rejected += 1
                return None
            self._in_flight += 1
        return Ticket(self)

    def counts(self) -> AdmissionCounts:
        with self._lock:
            return AdmissionCounts(self._in_flight, self._lingering, self._rejected)

    def _release(self, ticket: Ticket, answered: bool) -> None:
        with self._lock:
            if answered:
                if ticket._answered:
                    return
                ticket._answered = True
            ticket._holders -= 1
            if ticket._holders == 0:
                self._in_flight -= 1
                if not answered:
                    self._lingering -= 1
            elif answered:
                self._lingering += 1


current_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("current_ticket", default=None)


def held(future: asyncio.Future) -> asyncio.Future:
    """`future` (a thread's work) holds the current request's place until it is done."""
    ticket = current_ticket.get()
    if ticket is not None:
        ticket.hold()
        future.add_done_callback(lambda _: ticket.release())
    return future
