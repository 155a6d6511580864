"""The database going away (issue 16): one log line per outage, and background work that
retries after it instead of ending the daemon.

A :class:`~peekproxy.store.StoreError` (a PostgreSQL server stopped or restarting:
:class:`~peekproxy.store.StoreUnavailable`) under a request is answered ``503 M_UNKNOWN``
(:mod:`peekproxy.api.errors`); in a background task (a room's subscription task, the idle
reaper, typing expiry, the client-API follower's long-polls) :func:`retry_store_errors`
catches it, waits with exponential back-off and jitter
(:func:`peekproxy.core.backoff.backoff_delay`, :data:`RETRY_INITIAL_S` doubling up to
:data:`RETRY_MAXIMUM_S`) until the store answers ``ping`` again, then runs the task again.
:data:`OUTAGE` keeps the log quiet: one WARNING when an outage begins (whoever sees it
first), DEBUG for every later failure, one INFO when a ping answers again. Importable by
every layer above the core (as :mod:`peekproxy.metrics`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from peekproxy.core.backoff import backoff_delay
from peekproxy.serving.errors import exception_leaves
from peekproxy.store import StoreError, StoreUnavailable

__all__ = [
    "OUTAGE",
    "OUTAGE_QUIET_S",
    "RETRY_INITIAL_S",
    "RETRY_MAXIMUM_S",
    "StoreOutage",
    "retry_store_errors",
    "store_unavailable_in",
]

log = logging.getLogger("peekproxy.store")

T = TypeVar("T")

#: Back-off of background work after a store error, in seconds: the first wait (±20 %
#: jitter), doubled after each failed ping up to the maximum.
RETRY_INITIAL_S = 0.5
RETRY_MAXIMUM_S = 10.0
#: Failures further apart than this (seconds) with no recovery seen in between are two
#: outages (each logged at WARNING): only requests may have seen the first one.
OUTAGE_QUIET_S = 60.0


class StoreOutage:
    """Whether the database is failing, as seen by everyone in the process: logs the start
    of an outage once and its end once. ``clock`` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        #: When the current outage began (``None``: none seen), and its last failure.
        self.since: float | None = None
        self._last: float = 0.0

    def failed(self, what: str, error: BaseException) -> None:
        """``what`` (a task or request, for the log) met ``error`` from the store."""
        now = self.clock()
        if self.since is None or now - self._last > OUTAGE_QUIET_S:
            self.since = now
            log.warning("the database is unavailable (%s: %s); retrying with back-off", what, error)
        else:
            log.debug("the database is still unavailable (%s: %s)", what, error)
        self._last = now

    def recovered(self) -> None:
        """The store answered again: the next failure begins a new outage."""
        if self.since is not None:
            log.info("the database answers again after %.1f s", self.clock() - self.since)
            self.since = None


def store_unavailable_in(error: BaseException) -> StoreUnavailable | None:
    """The :class:`~peekproxy.store.StoreUnavailable` that ``error`` is, or that an
    exception group (from a nursery) holds among its leaves; ``None`` if neither."""
    for leaf in exception_leaves(error):
        if isinstance(leaf, StoreUnavailable):
            return leaf
    return None


#: The process's one view of the database's outages.
OUTAGE = StoreOutage()


async def retry_store_errors(
    ping: Callable[[], Awaitable[None]] | None,
    what: str,
    fn: Callable[..., Awaitable[T]],
    *args: object,
) -> T:
    """``await fn(*args)`` until it returns without a :class:`~peekproxy.store.StoreError`;
    ``what`` names the task in the log.

    After each such error: :meth:`StoreOutage.failed`, then back-off waits (seconds:
    :data:`RETRY_INITIAL_S` doubling up to :data:`RETRY_MAXIMUM_S`, ±20 % jitter), each
    followed by ``ping()`` (the store's :meth:`~peekproxy.store.Storage.ping`) until it
    answers (:meth:`StoreOutage.recovered`); then ``fn(*args)`` runs again from its start,
    so it must be safe to run again (a loop that keeps its state in memory, or reads it
    back). ``ping`` ``None`` (a task that holds no store): ``fn`` itself is tried again
    after each wait. Any other exception, and cancellation, end the call as usual."""
    failures = 0
    while True:
        started = trio.current_time()
        try:
            return await fn(*args)
        except StoreError as e:
            OUTAGE.failed(what, e)
        if trio.current_time() - started > RETRY_MAXIMUM_S:
            failures = 0  # it ran well for a while: a new outage starts its back-off afresh
        while True:
            failures += 1
            await trio.sleep(
                backoff_delay(failures, RETRY_INITIAL_S, RETRY_MAXIMUM_S, random.random())
            )
            if ping is None:
                break
            try:
                await ping()
            except Exception as e:  # whatever the database says while it cannot answer
                OUTAGE.failed(what, e)
                continue
            OUTAGE.recovered()
            failures = 0
            break
