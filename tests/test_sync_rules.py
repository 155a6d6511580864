"""The pure decisions behind a device's ``/sync`` snapshot (``core/sync_rules.py``), with plain
values: which peeks are shown, which afresh, whether anything changed; and, over SQLite, which gap
markers a room shown afresh leaves out (decision 4)."""

from __future__ import annotations

from peekproxy.core.sync import DevicePeek
from peekproxy.core.sync_rules import (
    active_rooms,
    peeks_changed,
    quiet_from,
    shown_afresh,
    shown_in_sync,
)
from peekproxy.store import Storage, WriteTransaction
from tests.conftest import OpenStore

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


def test_a_device_is_quiet_from_its_last_peek_change_once_none_can_show() -> None:
    assert quiet_from([]) == 0  # never peeked: nothing to show from any since
    joined = DevicePeek("!j:x", "joined", 7)
    assert quiet_from([ENDED, joined]) == 7  # a since before 5 still gets ENDED's leave
    assert quiet_from([ENDED, ACTIVE]) is None
    assert quiet_from([DORMANT]) is None  # restored by its next sync


# A room shown afresh skips its closed, empty gap rows and still reads ``limit + 2`` shown rows
# before ``since`` (and whether any shown row is older).

ROOM = "!r:x"
DEVICE = ("@u:x", "D")


def _append(tx: WriteTransaction, n: int) -> None:
    pdu = {"type": "m.room.message", "room_id": ROOM, "depth": n, "content": {}}
    tx.append_event(ROOM, f"$e{n}", pdu, redacted=False, now_ms=0)


def _closed_empty_gap(tx: WriteTransaction) -> None:
    tx.add_gap_fill(ROOM, tx.add_gap(ROOM, 0), [], closed=True)


async def _recent(store: Storage, since: int | None, limit: int) -> tuple[list[str | None], bool]:
    snapshot = await store.read(
        lambda tx: tx.sync_snapshot(*DEVICE, since=since, full_state=False, limit=limit)
    )
    view = snapshot.views[ROOM]
    return [item.event_id for item in view.recent], view.has_earlier


async def test_a_room_shown_afresh_leaves_out_closed_empty_gaps_within_its_limit(
    open_store: OpenStore,
) -> None:
    store = await open_store("x")
    try:

        def fill(tx: WriteTransaction) -> int:
            _closed_empty_gap(tx)
            for n in range(1, 7):
                _append(tx, n)
            _closed_empty_gap(tx)
            _append(tx, 7)
            _append(tx, 8)
            return tx.set_device_peek(*DEVICE, ROOM, "active", 0)

        peeked = await store.write(fill)
        assert await _recent(store, None, 2) == (["$e5", "$e6", "$e7", "$e8"], True)
        assert await _recent(store, None, 6) == ([f"$e{n}" for n in range(1, 9)], False)
        # Not afresh: the device had the room, so it meets the gap (decision 4).
        await store.write(lambda tx: _append(tx, 9))
        assert await _recent(store, peeked, 2) == (["$e6", None, "$e7", "$e8", "$e9"], True)
    finally:
        await store.aclose()
