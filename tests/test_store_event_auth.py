"""The store's part of receipt checks 4-6 (migration 0008): rejected and soft-failed events
are kept, known (no false gap) but never read back as shown events; the auth state read."""

from __future__ import annotations

from typing import Any

from peekproxy.store import WriteTransaction
from tests.conftest import OpenStore

ROOM = "!r:remote.test"


def pdu(n: int, prev: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": ROOM,
        "sender": "@a:remote.test",
        "content": {"body": str(n)},
        "depth": n,
        "prev_events": prev,
        **extra,
    }


async def test_unshown_events_are_known_but_never_read_back(open_store: OpenStore) -> None:
    store = await open_store()
    try:

        def write(tx: WriteTransaction) -> tuple[list[str], bool]:
            tx.append_event(ROOM, "$1", pdu(1, []), redacted=False, now_ms=0)
            tx.store_unshown(
                ROOM,
                [("$bad", pdu(2, ["$1"]), False)],
                status="rejected",
                reasons={"$bad": "not in room"},
            )
            tx.store_unshown(ROOM, [("$soft", pdu(2, ["$1"]), False)], status="soft_failed")
            tx.store_unshown(ROOM, [("$auth", pdu(0, []), False)], status="accepted")
            # The next event names the rejected one as a parent: no gap before it.
            return tx.append_in_dag_order(ROOM, [("$3", pdu(3, ["$bad", "$1"]), False)], now_ms=0)

        appended, gap = await store.write(write)
        assert appended == ["$3"] and gap is False

        def read(tx: Any) -> Any:
            return (
                tx.known_event_ids(["$bad", "$soft", "$auth"]),
                {e: s for e, (_, s) in tx.judged_events(["$bad", "$soft", "$auth", "$3"]).items()},
                [tx.read_event(ROOM, e) is not None for e in ("$bad", "$soft", "$auth", "$3")],
                [tx.find_event(e) is not None for e in ("$bad", "$soft", "$auth")],
                [e for _, _, e in tx.stream_events(ROOM)],
            )

        known, statuses, readable, found, stream = await store.read(read)
        assert known == {"$bad", "$soft", "$auth"}
        assert statuses == {
            "$bad": "rejected",
            "$soft": "soft_failed",
            "$auth": "accepted",
            "$3": "accepted",
        }
        assert readable == [False, False, True, True]
        assert found == [False, False, True]
        assert stream == ["$1", "$3"]
    finally:
        await store.aclose()


async def test_auth_state_reads_the_auth_types_and_the_members_asked_for(
    open_store: OpenStore,
) -> None:
    store = await open_store()
    try:
        state = {
            ("m.room.create", ""): "$c",
            ("m.room.power_levels", ""): "$pl",
            ("m.room.topic", ""): "$t",
            ("m.room.member", "@a:x"): "$ma",
            ("m.room.member", "@b:x"): "$mb",
        }

        def write(tx: WriteTransaction) -> None:
            events = [
                (e, {"type": k[0], "state_key": k[1], "depth": 1}, False) for k, e in state.items()
            ]
            tx.store_unshown(ROOM, events, status="accepted")
            tx.replace_state(ROOM, state)

        await store.write(write)
        got = await store.read(lambda tx: tx.auth_state(ROOM, ["@a:x"]))
        assert {k: e for k, (e, _) in got.items()} == {
            ("m.room.create", ""): "$c",
            ("m.room.power_levels", ""): "$pl",
            ("m.room.member", "@a:x"): "$ma",
        }
        none = await store.read(lambda tx: tx.auth_state(ROOM, []))
        assert set(none) == {("m.room.create", ""), ("m.room.power_levels", "")}
    finally:
        await store.aclose()


async def test_a_snapshot_state_keeps_rejected_events_out(open_store: OpenStore) -> None:
    # A review found it: a peek answer or renewal listing an event peekproxy rejected put
    # it into the room's state. Rejected is final; a soft-failed event the room's server
    # resolved into the state is taken in (and shown from then on).
    store = await open_store()
    try:

        def write(tx: WriteTransaction) -> None:
            member = {"type": "m.room.member", "state_key": "@b:x", "depth": 2}
            tx.store_unshown(ROOM, [("$bad", member, False)], status="rejected")
            topic = {"type": "m.room.topic", "state_key": "", "depth": 3}
            tx.store_unshown(ROOM, [("$soft", topic, False)], status="soft_failed")
            tx.store_snapshot(
                ROOM,
                events={
                    "$c": {"type": "m.room.create", "state_key": "", "depth": 1},
                    "$bad": member,
                    "$soft": topic,
                },
                redacted=[],
                state={
                    ("m.room.create", ""): "$c",
                    ("m.room.member", "@b:x"): "$bad",
                    ("m.room.topic", ""): "$soft",
                },
                latest_event_id="$c",
                gap=False,
                now_ms=0,
            )

        await store.write(write)

        def read(tx: Any) -> Any:
            return tx.current_state_ids(ROOM), tx.read_event(ROOM, "$soft") is not None

        state, soft_shown = await store.read(read)
        assert state == {("m.room.create", ""): "$c", ("m.room.topic", ""): "$soft"}
        assert soft_shown
    finally:
        await store.aclose()
