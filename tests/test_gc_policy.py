"""The garbage-collection policy (peekproxy/gc_policy.py): no automatic full collections
once settled, a full one on schedule instead, and everything undone by restore."""

from __future__ import annotations

import gc
import weakref

import trio
import trio.testing

from peekproxy import gc_policy


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


async def test_cycles_are_freed_on_schedule_and_settle_is_undone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    before = gc.get_threshold()
    previous = gc_policy.settle()
    try:
        assert previous == before
        assert gc.get_threshold()[:2] == (gc_policy.YOUNG_THRESHOLD, before[1])
        assert gc.get_threshold()[2] > 1_000_000  # no automatic full collections
        assert gc.get_freeze_count() > 0
        node = Node()
        gone = weakref.ref(node)
        gc.collect(1)  # young collections still run: promote the cycle to the old generation
        del node
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gc_policy.collect_periodically, 60.0)
            await trio.sleep(59)
            gc.collect(1)
            assert gone() is not None  # the old generation waits for the schedule
            await trio.sleep(2)
            assert gone() is None
            nursery.cancel_scope.cancel()
    finally:
        gc_policy.restore(previous)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_collections_are_timed_while_settled() -> None:
    from peekproxy.metrics import GC_SECONDS

    def seconds() -> float:
        return sum(
            s.value
            for m in GC_SECONDS.collect()
            for s in m.samples
            if "generation" in s.labels
            and s.labels["generation"] == "1"
            and s.name.endswith("_total")
        )

    previous = gc_policy.settle()
    try:
        before = seconds()
        gc.collect(1)
        assert seconds() > before
    finally:
        gc_policy.restore(previous)
    after = seconds()
    gc.collect(1)
    assert seconds() == after  # restore took the timing off
