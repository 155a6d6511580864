"""The store's sync snapshot reads only the PDUs a sync can show (issue 17).

A 50-event ``/send`` wakes every long-polling device; with the timeline limit of 10 each
device's sync shows the newest 10 events (``limited``) and the room's state. The snapshot
reads those PDUs and no others (``timeline_event_ids``), and what the devices see does not
change (the equivalence tests of tests/test_live_window.py and the sync tests still hold).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from peekproxy.core.sync import (
    DevicePeek,
    RoomView,
    StreamItem,
    SyncSnapshot,
    build_sync,
    timeline_event_ids,
)
from peekproxy.store import WriteTransaction
from tests.conftest import OpenStore
from tests.test_live_window import ALICE, ROOM, set_peek, snapshot_of


def _message(n: int) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "sender": "@carol:remote.test",
        "content": {"msgtype": "m.text", "body": f"message {n}"},
        "origin_server_ts": 1_000 + n,
        "room_id": ROOM,
    }


def _built(snapshot: SyncSnapshot, since: int) -> dict[str, Any]:
    """The sync the store's ``snapshot`` gives (timeline limit 10)."""
    return build_sync(
        since=since,
        upto=snapshot.upto,
        peeks=snapshot.peeks,
        rooms=snapshot.views,
        timeline_limit=10,
        now_ms=5_000,
    )


@pytest.mark.parametrize("seed", range(20))
def test_timeline_event_ids_are_the_timeline_build_sync_shows(seed: int) -> None:
    rng = random.Random(seed)
    recent = [
        StreamItem(pos, "gap", None) if rng.random() < 0.1 else StreamItem(pos, "event", f"$e{pos}")
        for pos in range(1, rng.randint(1, 40))
    ]
    upto = len(recent)
    events = {item.event_id: _message(item.pos) for item in recent if item.event_id}
    view = RoomView(ROOM, "10", recent, False, {}, events, frozenset())
    for since in (None, rng.randint(0, upto)):
        for limit in (0, 1, 3, 10):
            peek = DevicePeek(ROOM, "active", 0)
            built = build_sync(
                since=since,
                upto=upto,
                peeks=[peek],
                rooms={ROOM: view},
                timeline_limit=limit,
                now_ms=5_000,
            )
            room = built["rooms"]["peek"].get(ROOM, {"timeline": {"events": []}})
            shown = [event["event_id"] for event in room["timeline"]["events"]]
            assert timeline_event_ids(recent, since, upto, limit) == shown


async def test_a_limited_sync_reads_only_the_shown_pdus_and_the_state(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    create = {"type": "m.room.create", "state_key": "", "sender": "@c:remote.test", "content": {}}

    def append(tx: WriteTransaction, first: int, count: int) -> None:
        for n in range(first, first + count):
            tx.append_event(ROOM, f"$m{n}", _message(n), redacted=False, now_ms=0)

    await store.write(lambda tx: tx.append_event(ROOM, "$create", create, redacted=False, now_ms=0))
    await store.write(lambda tx: append(tx, 0, 5))
    await set_peek(store, ALICE, ROOM, "active")
    since = await store.read(lambda tx: tx.max_stream_pos())
    await store.write(lambda tx: append(tx, 5, 50))  # one /send of 50 events

    snapshot = await snapshot_of(store, ALICE, since, 10)
    view = snapshot.views[ROOM]
    assert set(view.events) == {"$create", *(f"$m{n}" for n in range(45, 55))}
    built = _built(snapshot, since)
    room = built["rooms"]["peek"][ROOM]
    assert room["timeline"]["limited"] is True
    assert [e["event_id"] for e in room["timeline"]["events"]] == [f"$m{n}" for n in range(45, 55)]
    assert [e["event_id"] for e in room["state"]["events"]] == ["$create"]

    # An ended peek's leave entry shows the events up to its end: those are read too.
    await set_peek(store, ALICE, ROOM, "ended")
    await store.write(lambda tx: append(tx, 55, 20))
    snapshot = await snapshot_of(store, ALICE, since, 10)
    built = _built(snapshot, since)
    left = built["rooms"]["leave"][ROOM]["timeline"]["events"]
    assert [e["event_id"] for e in left] == [f"$m{n}" for n in range(45, 55)]
    assert len(snapshot.views[ROOM].events) < 30
    await store.aclose()
