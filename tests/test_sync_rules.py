"""The pure decisions behind a device's ``/sync`` snapshot (``core/sync_rules.py``), with plain
values: which peeks are shown, which afresh, whether anything changed, and which gap markers a
room shown afresh leaves out (decision 4)."""

from __future__ import annotations

from peekproxy.core.sync import DevicePeek
from peekproxy.core.sync_rules import (
    active_rooms,
    gap_marker_hidden,
    peeks_changed,
    shown_afresh,
    shown_in_sync,
)

ACTIVE = DevicePeek("!a:x", "active", 5)
DORMANT = DevicePeek("!d:x", "dormant", 5)
ENDED = DevicePeek("!e:x", "ended", 5)


def test_the_active_rooms_are_those_of_the_active_peeks_in_order() -> None:
    peeks = [ACTIVE, DORMANT, ENDED, DevicePeek("!b:x", "active", 1)]
    assert active_rooms(peeks) == ["!a:x", "!b:x"]


def test_peeks_changed_on_an_initial_sync_with_full_state_or_after_a_peek_change() -> None:
    assert peeks_changed([], None, False)
    assert peeks_changed([], 9, True)
    assert peeks_changed([ACTIVE], 4, False)
    assert not peeks_changed([ACTIVE], 5, False)
    assert not peeks_changed([], 5, False)


def test_an_active_peek_is_always_shown_a_dormant_one_never() -> None:
    for since in (None, 1, 5, 9):
        assert shown_in_sync(ACTIVE, since, 9)
        assert not shown_in_sync(DORMANT, since, 9)


def test_an_ended_peek_is_shown_once_in_the_sync_after_it_ended() -> None:
    assert shown_in_sync(ENDED, 4, 9)
    assert shown_in_sync(ENDED, 4, 5)
    assert not shown_in_sync(ENDED, 5, 9)  # already shown
    assert not shown_in_sync(ENDED, None, 9)  # an initial sync has nothing to leave
    assert not shown_in_sync(ENDED, 2, 4)  # ended after the snapshot's upto


def test_a_room_is_shown_afresh_on_an_initial_sync_or_after_its_peek_started() -> None:
    assert shown_afresh(ACTIVE, None)
    assert shown_afresh(ACTIVE, 4)
    assert not shown_afresh(ACTIVE, 5)
    assert not shown_afresh(ENDED, None)
    assert not shown_afresh(DORMANT, 4)


def test_only_a_room_shown_afresh_hides_a_gap_closed_with_nothing_of_its_own() -> None:
    assert gap_marker_hidden(afresh=True, closed=True, has_events=False)
    assert not gap_marker_hidden(afresh=False, closed=True, has_events=False)  # decision 4
    assert not gap_marker_hidden(afresh=True, closed=False, has_events=False)
    assert not gap_marker_hidden(afresh=True, closed=True, has_events=True)
