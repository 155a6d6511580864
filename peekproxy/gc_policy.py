"""When the garbage collector may pause the daemon.

CPython's automatic full (generation 2) collection walks every tracked object; in a running
peekproxy that is tens of milliseconds, and it strikes while requests are being answered:
measured with ``bench/fanout.py``, one landing in a fan-out to 1,000 long-polls delayed
every device by ~80 ms. So, once started:

* :func:`settle` moves everything start-up made (modules, config, routes) into the
  permanent generation (``gc.freeze``), out of every later collection, turns automatic
  full collections off, and lets young collections come far less often
  (:data:`YOUNG_THRESHOLD`: inside a fan-out burst they cost ~10% of it);
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

from peekproxy.metrics import GC_COLLECTIONS_BY_GENERATION

__all__ = [
    "FULL_COLLECTION_INTERVAL_S",
    "YOUNG_THRESHOLD",
    "collect_periodically",
    "restore",
    "settle",
]

log = logging.getLogger(__name__)

#: Seconds between full collections.
FULL_COLLECTION_INTERVAL_S = 60.0
#: Net allocations of tracked objects between two young (generation 0) collections; CPython's
#: default is 700. A fan-out holds ~30 objects per woken long-poll alive at once: at 1,000
#: devices the default ran ~80 young and ~8 middle-generation collections inside the burst,
#: ~110 ms of it (``peekproxy_gc_seconds_total``, bench/fanout.py); at 50,000 none. What dies
#: young is freed by reference counting and never counts; cyclic garbage waits a little
#: longer (a few MB at most).
YOUNG_THRESHOLD = 50_000
#: A generation-2 threshold automatic collection never reaches.
_NEVER = 2**31 - 1


_started = [0.0]


def _timed(phase: str, info: dict[str, int]) -> None:
    """``gc.callbacks`` entry: ``peekproxy_gc_seconds_total{generation}``."""
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        GC_COLLECTIONS_BY_GENERATION[info["generation"]].inc(time.perf_counter() - _started[0])


def settle() -> tuple[int, int, int]:
    """Freeze what exists now, stop automatic full collections and time every collection
    (``peekproxy_gc_seconds_total``). Returns the thresholds it replaced (for
    :func:`restore`)."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, previous[1], _NEVER)
    if _timed not in gc.callbacks:
        gc.callbacks.append(_timed)
    return previous


def restore(previous: tuple[int, int, int]) -> None:
    """Undo :func:`settle` (for a daemon run inside a longer-lived process, e.g. tests)."""
    gc.set_threshold(*previous)
    gc.unfreeze()
    if _timed in gc.callbacks:
        gc.callbacks.remove(_timed)


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
