"""The pure decisions behind the store's room-event writes (``core/stream_rules.py``), with
plain values: late events and the history floor, what storing a snapshot does, its gap row
(decision 4), and which fetched events a client does not see yet."""

from __future__ import annotations

import pytest

from peekproxy.core.stream_rules import (
    SnapshotGap,
    SnapshotStep,
    joins_stream_when_late,
    not_yet_held,
    older_than_newest,
    snapshot_gap,
    snapshot_step,
)


@pytest.mark.parametrize(
    ("depth", "newest", "late"),
    [
        (4, 5, True),
        (5, 5, False),
        (6, 5, False),
        (4, None, False),  # no event on the stream yet
        ("4", 5, False),  # a depth that is no integer is never compared
        (None, 5, False),
    ],
)
def test_an_event_is_late_when_older_than_the_newest_on_the_stream(
    depth: object, newest: int | None, late: bool
) -> None:
    assert older_than_newest(depth, newest) is late


def test_a_late_event_joins_the_stream_unless_below_the_history_floor() -> None:
    assert joins_stream_when_late(7, None)
    assert joins_stream_when_late(7, 7)
    assert joins_stream_when_late(8, 7)
    assert not joins_stream_when_late(6, 7)


def _step(held: bool, newest: bool, depth: object, newest_depth: int | None) -> SnapshotStep:
    return snapshot_step(
        latest_held=held, latest_is_newest=newest, latest_depth=depth, newest_depth=newest_depth
    )


def test_an_older_snapshot_changes_nothing() -> None:
    assert _step(True, False, None, None) is SnapshotStep.NOTHING  # held, not the newest
    assert _step(False, False, 3, 9) is SnapshotStep.NOTHING  # new to us, yet older


def test_a_snapshot_of_the_newest_event_only_replaces_the_state() -> None:
    assert _step(True, True, None, None) is SnapshotStep.STATE_ONLY


def test_a_snapshot_with_a_new_latest_event_appends() -> None:
    assert _step(False, False, 9, 9) is SnapshotStep.APPEND
    assert _step(False, False, 10, 9) is SnapshotStep.APPEND
    assert _step(False, False, 1, None) is SnapshotStep.APPEND  # an empty stream
    assert _step(False, False, "x", 9) is SnapshotStep.APPEND


@pytest.mark.parametrize(
    ("gap", "fetched", "complete", "marker"),
    [
        (False, False, False, SnapshotGap.NONE),  # a first peek with nothing before it
        (False, True, True, SnapshotGap.NONE),  # a first peek whose history is whole
        (False, True, False, SnapshotGap.OPEN),  # history is missing before the fetched
        (True, False, False, SnapshotGap.OPEN),  # a re-peek without a history round
        (True, True, False, SnapshotGap.OPEN),
        (True, True, True, SnapshotGap.CLOSED),  # decision 4: limited, yet nothing missing
    ],
)
def test_the_gap_row_of_a_new_snapshot(
    gap: bool, fetched: bool, complete: bool, marker: SnapshotGap
) -> None:
    assert snapshot_gap(gap=gap, history_fetched=fetched, history_complete=complete) is marker


def test_only_events_not_yet_held_are_added_in_order_each_once() -> None:
    assert not_yet_held(["$c", "$b", "$c", "$a", "$b"], {"$b"}) == ["$c", "$a"]
    assert not_yet_held([], set()) == []
    assert not_yet_held(["$a"], {"$a"}) == []
