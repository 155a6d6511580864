"""What peekproxy remembers per destination server between outbound federation requests.

:class:`Backoff`: a destination that failed (connection failure, timeout, 5xx answer) is not
asked again until its back-off ends; :class:`~peekproxy.federation.client.FederationClient`
checks it before each request and reports each outcome. The schedule itself is pure
(:func:`peekproxy.core.backoff.backoff_delay`); the clock and the jitter are injected, so
this holds no I/O either.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from peekproxy.core.backoff import backoff_delay
from peekproxy.core.federation_errors import DestinationBackingOff

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Per-destination exponential back-off with jitter (seconds).

    A failure is a connection failure, a timeout or a 5xx answer. After the n-th failure in
    a row the destination is not asked for :func:`~peekproxy.core.backoff.backoff_delay`
    ``(n, initial, maximum, draw())`` seconds (``initial`` doubling up to ``maximum``,
    ±20 %). Failures reported while it is already backing off (requests that were in flight
    together, e.g. many rooms' peeks) count once. A success (any answer below 500) ends it.
    """

    initial: float
    maximum: float
    clock: Callable[[], float]
    #: Draws the jitter: a number in [0, 1).
    draw: Callable[[], float] = random.random
    _state: dict[str, tuple[int, float]] = field(default_factory=dict)

    def check(self, destination: str) -> None:
        """Raises DestinationBackingOff while the destination is backing off."""
        state = self._state.get(destination)
        if state is not None:
            wait = state[1] - self.clock()
            if wait > 0:
                raise DestinationBackingOff(destination, wait)

    def failed(self, destination: str) -> None:
        """A request to ``destination`` failed: start or lengthen its back-off (counted
        once while it is already backing off)."""
        now = self.clock()
        count, until = self._state.get(destination, (0, 0.0))
        if until > now:
            return  # already backing off: the same outage, seen by another request
        count += 1
        delay = backoff_delay(count, self.initial, self.maximum, self.draw())
        self._state[destination] = (count, now + delay)

    def succeeded(self, destination: str) -> None:
        """``destination`` answered (below 500) or was heard from: its back-off ends."""
        self._state.pop(destination, None)
