"""Races and orderings found by a review of issue 10's merged branches: a snapshot older
than what the stream shows, an unpeek while a sync restores, a malformed room ID in /send."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import trio
import trio.testing
import trustme

from peekproxy.core.subscription import Subscription, SubState
from peekproxy.core.validation import ValidatedPeek
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.store.sqlite import open_sqlite
from tests.conftest import OpenStore, Spawn
from tests.offline import offline_service
from tests.peek_world import PEEKPROXY, SECRET, TESTBED, build_world
from tests.test_ingest_order import _bodies, _pdu


def _state(event_id: str, depth: int, prevs: list[str], key: str, body: str) -> dict[str, Any]:
    pdu = _pdu(event_id, depth, prevs, body)
    pdu.update(type="m.room.topic", state_key="", content={"topic": body, "body": body})
    return pdu


async def test_renewal_reply_older_than_a_gap_is_not_appended_after_it(
    open_store: OpenStore,
) -> None:
    """$1..$2 held; $4 (a topic change) arrived, $3 could not be fetched: gap, $4. Then a
    full renewal reply taken at $3 (latest $3, state at $3) arrives. append_in_dag_order
    withholds $3 (below the history floor), but store_snapshot appends it after $4 anyway
    and replaces the state with the state at $3 (the topic of $4 is lost)."""
    store = await open_store("a.example")
    try:
        p1 = _state("$1", 1, [], "", "t1")
        p2 = _pdu("$2", 2, ["$1"], "2")
        p3 = _pdu("$3", 3, ["$2"], "3")
        p4 = _state("$4", 4, ["$3"], "", "t4")
        await store.write(
            lambda tx: tx.append_in_dag_order(
                "!r:x", [("$1", p1, False), ("$2", p2, False)], now_ms=1
            )
        )
        await store.write(lambda tx: tx.append_in_dag_order("!r:x", [("$4", p4, False)], now_ms=1))
        assert await _bodies(store) == ["t1", "2", "gap", "t4"]
        sub = Subscription(
            room_id="!r:x", state=SubState.ACTIVE, room_version="10", server="s", peek_id="p"
        )
        validated = ValidatedPeek(
            room_id="!r:x",
            room_version="10",
            events={"$1": p1, "$3": p3},
            state={("m.room.topic", ""): "$1"},
            latest_event_id="$3",
            auth_chain_ids=[],
            renewal_interval_ms=1000,
            redacted=frozenset(),
        )
        fake = SimpleNamespace(store=store, by_room={}, clock_ms=lambda: 5)
        await Subscriptions._store_renewal(fake, sub, validated, [])  # type: ignore[arg-type]
        bodies = await _bodies(store)
        state = await store.read(lambda tx: tx.current_state_ids("!r:x"))
        assert bodies == ["t1", "2", "gap", "t4"], bodies
        assert state[("m.room.topic", "")] == "$4", state
    finally:
        await store.aclose()


async def test_repeek_snapshot_stored_after_newer_pushed_events_keeps_state(
    open_store: OpenStore,
) -> None:
    """A re-peek (LAPSED accepts /send, so _wait_for_setups does not hold the push back)
    whose snapshot (latest $2, state at $2) is written after the target's push of $3 (a
    topic change) was ingested: store_snapshot replaces the state before it sees that $2
    is on the stream already, so the topic of $3 is lost."""
    store = await open_store("a.example")
    try:
        p1 = _state("$1", 1, [], "", "t1")
        p2 = _pdu("$2", 2, ["$1"], "2")
        p3 = _state("$3", 3, ["$2"], "", "t3")
        await store.write(
            lambda tx: tx.append_in_dag_order(
                "!r:x", [("$1", p1, False), ("$2", p2, False), ("$3", p3, False)], now_ms=1
            )
        )
        await store.write(
            lambda tx: tx.store_snapshot(
                "!r:x",
                events={"$1": p1, "$2": p2},
                redacted=(),
                state={("m.room.topic", ""): "$1"},
                latest_event_id="$2",
                gap=True,
                now_ms=2,
                history=None,
            )
        )
        state = await store.read(lambda tx: tx.current_state_ids("!r:x"))
        assert state[("m.room.topic", "")] == "$3", state
    finally:
        await store.aclose()


async def test_unpeek_of_a_dormant_peek_while_its_sync_restores_other_rooms(tmp_path: Path) -> None:
    """Item 5 race: a device's sync restores its dormant peeks one room at a time (each may
    re-peek over the network, seconds). An unpeek of another of its dormant rooms meanwhile
    succeeds (dormant -> ended), and then _restore_dormant sets it active again: the room
    comes back, as item 5 said must not happen."""
    from dataclasses import replace as dc_replace
    from functools import partial

    r1, r2 = "!a:remote.test", "!b:remote.test"
    alice = ("@alice:local.test", "PHONE")
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    for room in (r1, r2):
        sub = Subscription(
            room_id=room,
            state=SubState.DORMANT,
            candidates=("remote.test",),
            room_version="10",
            wanted=False,
        )
        await store.write(
            lambda tx: tx.save_subscription(
                sub=sub,  # noqa: B023
            )
        )
        await store.write(
            lambda tx: tx.set_device_peek(
                user_id=alice[0],
                device_id=alice[1],
                room_id=room,  # noqa: B023
                state="dormant",
                now_ms=0,
            )
        )
    service = offline_service(store)
    service.subscriptions.by_room = {
        s.room_id: s for s in await store.read(lambda tx: tx.load_subscriptions())
    }
    gate = trio.Event()

    async def establish(sub: Subscription, *, gap: bool) -> Subscription:
        await gate.wait()  # the re-peek of r1 takes a while
        return dc_replace(sub, state=SubState.ACTIVE, server="remote.test", peek_id="p")

    service.subscriptions._establish = establish  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(service.syncing.sync, *alice, since=None, timeout_ms=0))
        await trio.testing.wait_all_tasks_blocked()
        await service.syncing.unpeek(*alice, r2)  # accepted: the peek of r2 was dormant
        assert await store.read(lambda tx: tx.device_peek_state(*alice, r2)) == "ended"
        gate.set()
    state = await store.read(lambda tx: tx.device_peek_state(*alice, r2))
    await store.aclose()
    assert state == "ended", state


async def test_a_pdu_with_a_non_string_room_id_does_not_fail_the_transaction(
    tmp_path: Path,
) -> None:
    """_wait_for_setups builds a set of the PDUs' room_id values: an unhashable one (a list
    or an object, from a buggy or hostile origin) raises TypeError -> HTTP 500 for the whole
    transaction; the origin retries it forever and its other rooms' events queue behind it."""

    store = await open_sqlite(tmp_path / "p.db", "local.test")
    service = offline_service(store)
    try:
        answer = await service.ingest.receive(
            "remote.test", "t1", {"pdus": [{"room_id": ["!a:b"], "type": "m.room.message"}]}
        )
        assert "pdus" in answer
    finally:
        await store.aclose()


async def test_state_pushed_during_a_repeek_first_view_is_kept(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(nursery, tls_ca, tmp_path, spawn)
    world.testbed.renewal_interval_ms = 2_000
    room_id = world.create_room("10")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    await world.sync()
    peek_id = world.log_of("start")[-1][3]
    # The target forgets the peek; a message is sent meanwhile (pushed to nobody).
    assert world.testbed.peeks.delete(PEEKPROXY, room_id, peek_id, world.testbed.clock_ms())
    world.send(room_id, "while lapsed")
    # The next renewal is refused (the peek lapsed: re-peek with a gap); a slow first view.
    world.testbed.faults.update(
        {
            "backfill_delay_ms": 3_000,
            "peek_count": 1,
            "peek_status": 404,
            "peek_errcode": "M_NOT_FOUND",
        }
    )
    world.testbed.renewal_interval_ms = 60_000  # the new peek is not renewed during the test
    starts = len(world.log_of("start"))
    await world.testbed.wait_until(lambda: len(world.log_of("start")) > starts)  # re-peek PUT
    # The target pushes a topic change at once; the room is LAPSED, which accepts /send, so
    # it is stored (with "while lapsed", fetched by get_missing_events) before the snapshot.
    topic = world.testbed.send(
        room_id, sender="admin", type="m.room.topic", content={"topic": "new"}, state_key=""
    )
    await world.wait_delivered(topic)
    await world.daemon.wait_for_log(rb"after a gap")  # the re-peek's snapshot is stored
    async with httpx.AsyncClient() as http:
        answer = await http.get(
            f"{world.daemon.client}/_peekproxy/v1/rooms/{room_id}/state",
            params={"user_id": "@alice:peekproxy.test", "device_id": "D1"},
            headers={"Authorization": f"Bearer {SECRET}"},
        )
    assert answer.status_code == 200, answer.text
    topics = [e["event_id"] for e in answer.json() if e["type"] == "m.room.topic"]
    assert topics == [topic]  # not the older state of the re-peek's snapshot
