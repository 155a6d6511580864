"""Exponential back-off with jitter: how long to wait after failures in a row.

Pure: no clock, no random source of its own (the caller draws a number in [0, 1), e.g.
``random.random()``, and passes it in, so schedules can be tested exactly). Used by the
per-destination back-off of outbound federation requests
(:class:`peekproxy.federation.destinations.Backoff`) and by the per-room retries of remote
peeks (:mod:`peekproxy.core.subscription`); docs/peeking.md ("Back-off") states the policy.
"""

from __future__ import annotations

__all__ = ["JITTER", "backoff_delay"]

#: Every delay is the nominal one times a factor drawn from [1 - JITTER, 1 + JITTER).
JITTER = 0.2


def backoff_delay(failures: int, initial: float, maximum: float, draw: float) -> float:
    """The wait after the ``failures``-th failure in a row, in the unit of ``initial``.

    The nominal delay doubles from ``initial`` up to ``maximum``:
    ``min(initial * 2 ** (failures - 1), maximum)``; it is then scaled by
    ``1 - JITTER + 2 * JITTER * draw``, a factor in [0.8, 1.2) for ``draw`` in [0, 1), so
    that rooms or destinations that failed together do not retry together.

    Examples with ``initial=1`` and ``maximum=60`` (seconds): 1 failure → [0.8, 1.2),
    2 → [1.6, 2.4), 3 → [3.2, 4.8), 7 and more → [48, 72).

    Raises:
        ValueError: ``failures`` < 1, ``initial`` or ``maximum`` not positive, or ``draw``
            outside [0, 1].
    """
    if failures < 1:
        raise ValueError(f"failures must be at least 1, not {failures}")
    if initial <= 0 or maximum <= 0:
        raise ValueError("initial and maximum must be positive")
    if not 0.0 <= draw <= 1.0:
        raise ValueError(f"draw must be in [0, 1], not {draw}")
    # 2 ** 64 is far past any maximum: no float overflow for absurd failure counts.
    nominal = min(initial * 2.0 ** min(failures - 1, 64), maximum)
    return nominal * (1.0 - JITTER + 2.0 * JITTER * draw)
