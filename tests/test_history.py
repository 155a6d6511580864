"""Room history in the store: filled gaps, tokens inside them, and which backfilled events
are new (core/paging.py, services/backfill.py, store/sqlite/history.py). The end-to-end paging tests
over real sockets are in tests/test_delegation_api.py."""

from __future__ import annotations

from typing import Any

import pytest

from peekproxy.core import paging
from peekproxy.core.sync import InvalidToken, decode_token
from peekproxy.services.backfill import Backfilled, new_history
from peekproxy.store import Storage, WriteTransaction
from tests.conftest import OpenStore

ROOM = "!room:remote.test"


def pdu(n: int, prev: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": ROOM,
        "sender": "@carol:remote.test",
        "content": {"msgtype": "m.text", "body": f"e{n}"},
        "origin_server_ts": 1_000 + n,
        "depth": n,
        "prev_events": [f"$e{n - 1}"] if prev is None and n > 1 else (prev or []),
    }


def event(n: int) -> Backfilled:
    return Backfilled(f"$e{n}", pdu(n), False, n)


def test_new_history_stops_at_held_events_and_at_the_room_start() -> None:
    # An answer from $e9 down to $e1: $e5 is held (before the gap), so $e8..$e6 are new.
    answer = [event(n) for n in range(9, 0, -1)]
    new, reached = new_history(answer, anchors=["$e9"], held={"$e9", "$e5"})
    assert [e.event_id for e in new] == ["$e8", "$e7", "$e6"] and reached
    # Nothing held: all is new; the first event (no prev_events) ends the history.
    new, reached = new_history(answer, anchors=["$e9"], held=set())
    assert [e.event_id for e in new][-1] == "$e1" and reached
    # Cut by the limit before anything held or the start: not complete.
    new, reached = new_history(answer[:4], anchors=["$e9"], held=set())
    assert [e.event_id for e in new] == ["$e8", "$e7", "$e6"] and not reached
    # Only the anchor came back: nothing older exists.
    assert new_history(answer[:1], anchors=["$e9"], held=set()) == ([], True)


def test_tokens() -> None:
    assert paging.parse_point("pp1_7") == paging.Point(7)
    assert paging.parse_point("pp1_7_3") == paging.Point(7, 3)
    assert paging.Point(7, 3).token() == "pp1_7_3" and paging.Point(7).token() == "pp1_7"
    for bad in ("pp1_7_0", "pp1_7_03", "pp1_07", "pp1_7_", "s7_3", "pp1_7_-1", "pp1_7_3_1"):
        with pytest.raises(InvalidToken):
            paging.parse_point(bad)
    with pytest.raises(InvalidToken):
        decode_token("pp1_7_3")  # a gap point is no sync token


async def store_with_gap(open_store: OpenStore, *, closed: bool) -> tuple[Storage, int]:
    """The room's stream: $e1 $e2 [gap] $e6 $e7, with $e5 $e4 fetched into the gap."""
    store = await open_store()

    def write(tx: WriteTransaction) -> int:
        for n in (1, 2):
            tx.append_event(ROOM, f"$e{n}", pdu(n), redacted=False, now_ms=0)
        gap = tx.add_gap(ROOM, 0)
        for n in (6, 7):
            tx.append_event(ROOM, f"$e{n}", pdu(n), redacted=False, now_ms=0)
        fill = [(f"$e{n}", pdu(n), False) for n in (5, 4)]
        assert tx.add_gap_fill(ROOM, gap, fill, closed=closed) == 2
        return gap

    gap: int = await store.write(write)
    return store, gap


async def pages(
    store: Storage, start: paging.Point | None, direction: paging.Direction, limit: int, **kw: Any
) -> list[tuple[list[str], str | None, paging.Backfill | None]]:
    out: list[tuple[list[str], str | None, paging.Backfill | None]] = []
    point = start
    for _ in range(20):
        page = await store.read(
            lambda tx: tx.read_page(
                room_id=ROOM,
                from_point=point,  # noqa: B023
                to_point=kw.get("to"),
                direction=direction,
                limit=limit,
                fill_gaps=kw.get("fill_gaps", True),
            )
        )
        end = page.end.token() if page.end else None
        out.append(([e for e, _, _ in page.events], end, page.backfill))
        if page.end is None or page.backfill is not None:
            return out
        point = page.end
    raise AssertionError("no end")


async def test_pages_walk_through_a_closed_gap_both_ways(open_store: OpenStore) -> None:
    store, gap = await store_with_gap(open_store, closed=True)
    back = await pages(store, None, "b", 2)
    assert [ids for ids, _, _ in back] == [["$e7", "$e6"], ["$e5", "$e4"], ["$e2", "$e1"]]
    assert [end for _, end, _ in back] == [f"pp1_{gap}", f"pp1_{gap}_3", None]
    # A token inside the gap, both ways.
    inside = paging.Point(gap, 2)  # just above $e4
    assert [ids for ids, _, _ in await pages(store, inside, "b", 5)] == [["$e4", "$e2", "$e1"]]
    forward = await pages(store, inside, "f", 5)
    assert forward[0][0] == ["$e5", "$e6", "$e7"]
    assert [ids for ids, _, _ in await pages(store, None, "f", 3)][:2] == [
        ["$e1", "$e2", "$e4"],
        ["$e5", "$e6", "$e7"],
    ]
    # ``to`` inside the gap: stop there.
    up_to = await pages(store, None, "b", 10, to=paging.Point(gap, 2))
    assert up_to == [(["$e7", "$e6", "$e5"], None, None)]
    # The sync's own tokens still work: prev_batch of a timeline starting at $e6.
    assert (await pages(store, paging.Point(gap), "b", 1))[0][0] == ["$e5"]
    await store.aclose()


async def test_an_open_gap_asks_for_backfill_below_what_it_holds(open_store: OpenStore) -> None:
    store, gap = await store_with_gap(open_store, closed=False)
    back = await pages(store, None, "b", 3)
    # The page stops at the hole; the next one asks to backfill before the oldest fill.
    assert back[0][0] == ["$e7", "$e6", "$e5"]
    assert back[1] == (["$e4"], f"pp1_{gap}_3", None)
    assert back[2] == ([], None, paging.Backfill(anchor="$e4", gap_pos=gap, room_left=3))
    # Without a server to ask, the hole is passed over.
    assert [
        ids for ids, _, _ in await pages(store, paging.Point(gap, 3), "b", 3, fill_gaps=False)
    ] == [["$e2", "$e1"]]
    # Forward: a page stops before the hole; its end skips the hole.
    forward = await pages(store, None, "f", 10)
    assert forward[0] == (["$e1", "$e2"], f"pp1_{gap}_3", None)
    assert forward[1][0] == ["$e4", "$e5", "$e6", "$e7"]
    # Closing it (a round that reached $e2): the same pages run through.
    await store.write(lambda tx: tx.add_gap_fill(ROOM, gap, [("$e3", pdu(3), False)], closed=True))
    assert [e for ids, _, _ in await pages(store, None, "b", 4) for e in ids] == [
        f"$e{n}" for n in range(7, 0, -1)
    ]
    await store.aclose()


async def test_events_in_a_filled_gap_are_not_appended_again(open_store: OpenStore) -> None:
    store, _ = await store_with_gap(open_store, closed=True)
    again = await store.write(
        lambda tx: tx.append_event(ROOM, "$e5", pdu(5), redacted=False, now_ms=0)
    )
    assert again is None
    assert await store.read(lambda tx: tx.held_event_ids(ROOM, ["$e5", "$e6", "$nope"])) == {
        "$e5",
        "$e6",
    }
    await store.aclose()


async def test_a_snapshot_with_history_keeps_the_current_state(open_store: OpenStore) -> None:
    store = await open_store()
    old_topic = {**pdu(2), "type": "m.room.topic", "state_key": "", "content": {"topic": "old"}}
    new_topic = {**pdu(3), "type": "m.room.topic", "state_key": "", "content": {"topic": "new"}}

    def write(tx: WriteTransaction) -> None:
        tx.store_snapshot(
            ROOM,
            events={"$e3": new_topic, "$e4": pdu(4)},
            redacted=[],
            state={("m.room.topic", ""): "$e3"},
            latest_event_id="$e4",
            gap=False,
            now_ms=0,
            history=[("$e2", old_topic, False), ("$e3", new_topic, False)],
            history_complete=False,
        )

    await store.write(write)
    assert await store.read(lambda tx: tx.current_state_ids(ROOM)) == {("m.room.topic", ""): "$e3"}
    stream = await store.read(lambda tx: tx.stream_events(ROOM))
    assert [(kind, e) for _, kind, e in stream] == [
        ("gap", None),
        ("event", "$e2"),
        ("event", "$e3"),
        ("event", "$e4"),
    ]
    await store.aclose()


async def test_a_room_stored_before_the_first_view_backfills_before_its_first_event(
    open_store: OpenStore,
) -> None:
    """A room whose first peek stored only its latest event ($e3, with prev_events): the
    history before it is a gap at position 0, filled and paged like any other."""
    store = await open_store()
    await store.write(
        lambda tx: [
            tx.append_event(ROOM, f"$e{n}", pdu(n), redacted=False, now_ms=0) for n in (3, 4)
        ]
    )
    assert await pages(store, None, "b", 5) == [
        (["$e4", "$e3"], "pp1_0", None),
        ([], None, paging.Backfill(anchor="$e3", gap_pos=0, room_left=5)),
    ]
    await store.write(lambda tx: tx.add_gap_fill(ROOM, 0, [("$e2", pdu(2), False)], closed=False))
    assert await pages(store, paging.Point(0), "b", 5) == [
        (["$e2"], "pp1_0_2", None),
        ([], None, paging.Backfill(anchor="$e2", gap_pos=0, room_left=5)),
    ]
    await store.write(lambda tx: tx.add_gap_fill(ROOM, 0, [("$e1", pdu(1), False)], closed=True))
    assert [e for ids, _, _ in await pages(store, None, "b", 3) for e in ids] == [
        "$e4",
        "$e3",
        "$e2",
        "$e1",
    ]
    forward = await pages(store, None, "f", 10)
    assert forward[0][0] == ["$e1", "$e2", "$e3", "$e4"]
    await store.aclose()
