"""When the garbage collector may pause the daemon.

CPython's automatic full (generation 2) collection walks every tracked object; in a running
peekproxy that is tens of milliseconds, and it strikes while requests are being answered:
measured with ``bench/fanout.py``, one landing in a fan-out to 1,000 long-polls delayed
every device by ~80 ms. So, once started:

* :func:`settle` moves everything start-up made (modules, config, routes) into the
  permanent generation (``gc.freeze``), out of every later collection, and turns automatic
  full collections off (generations 0 and 1 keep their defaults: they are cheap);
* :func:`collect_periodically` runs the full collection itself, every
  ``FULL_COLLECTION_INTERVAL_S`` seconds, so cyclic garbage that reached the old generation
  is still freed.

Synapse bounds its full collections the same way (``gc_min_interval``, 30 s for generation
2 by default).
"""

from __future__ import annotations

import gc
import logging
import time

import trio

__all__ = ["FULL_COLLECTION_INTERVAL_S", "collect_periodically", "restore", "settle"]

log = logging.getLogger(__name__)

#: Seconds between full collections.
FULL_COLLECTION_INTERVAL_S = 60.0
#: A generation-2 threshold automatic collection never reaches.
_NEVER = 2**31 - 1


def settle() -> tuple[int, int, int]:
    """Freeze what exists now and stop automatic full collections. Returns the thresholds
    it replaced (for :func:`restore`)."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(previous[0], previous[1], _NEVER)
    return previous


def restore(previous: tuple[int, int, int]) -> None:
    """Undo :func:`settle` (for a daemon run inside a longer-lived process, e.g. tests)."""
    gc.set_threshold(*previous)
    gc.unfreeze()


async def collect_periodically(interval_s: float = FULL_COLLECTION_INTERVAL_S) -> None:
    """Run a full collection every ``interval_s`` seconds until cancelled; logs (debug) how
    long each took and what it freed."""
    while True:
        await trio.sleep(interval_s)
        started = time.perf_counter()
        freed = gc.collect()
        log.debug(
            "full garbage collection: %d objects freed in %.1f ms",
            freed,
            (time.perf_counter() - started) * 1000,
        )
