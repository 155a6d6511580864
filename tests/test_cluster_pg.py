"""Two real peekproxy processes on one PostgreSQL database (issue 16, docs/cluster.md): the
testbed delivers to instance B, a device long-polls on A; devices on both instances share
one remote peek."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio
import trustme

from tests.cluster_world import build_cluster, put_transaction
from tests.conftest import Spawn

BOB = "@bob:peekproxy.test"


def _event_ids(answer: dict[str, object], room_id: str) -> list[str]:
    rooms = answer.get("rooms", {})
    assert isinstance(rooms, dict)
    room = rooms.get("peek", {}).get(room_id)
    return [e["event_id"] for e in room["timeline"]["events"]] if room else []


async def test_a_long_poll_on_a_wakes_for_an_event_delivered_to_b(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn, pg_dsn: str
) -> None:
    cluster = await build_cluster(nursery, tls_ca, tmp_path, spawn, pg_dsn, delivered_to=1)
    world, a, b = cluster.world, cluster.client(0), cluster.client(1)
    room_id = world.create_room()
    assert (await world.peek(room_id, via=a)).status_code == 200
    since = (await world.sync(via=a))["next_batch"]

    answer: dict[str, object] = {}

    async def long_poll() -> None:
        answer.update(await world.sync(since=since, timeout_ms=30_000, via=a))

    with trio.fail_after(20):
        async with trio.open_nursery() as polls:
            polls.start_soon(long_poll)
            await trio.sleep(0.5)  # the long-poll is waiting (nothing new yet)
            assert not answer
            event_id = world.send(room_id, "to B")
            await world.wait_delivered(event_id)  # B answered the transaction
    assert _event_ids(answer, room_id) == [event_id]

    # A device on B peeks the room A follows: no second remote peek.
    assert (await world.peek(room_id, user=BOB, via=b)).status_code == 200
    bob = await world.sync(user=BOB, via=b)
    assert event_id in _event_ids(bob, room_id)
    assert [entry[2] for entry in world.log_of("start")] == [room_id]
    assert cluster.owner(room_id) == "pp0"


async def test_concurrent_sends_to_two_processes_store_each_event_once_in_order(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn, pg_dsn: str
) -> None:
    """The remote's events in split transactions, to A and to B at once over real sockets
    (signed as the testbed): each stored once, in DAG order, no gap; devices on both see
    each once."""
    cluster = await build_cluster(nursery, tls_ca, tmp_path, spawn, pg_dsn)
    world = cluster.world
    room_id = world.create_room()
    assert (await world.peek(room_id, via=cluster.client(0))).status_code == 200
    assert (await world.peek(room_id, user=BOB, via=cluster.client(1))).status_code == 200
    alice_since = (await world.sync(via=cluster.client(0)))["next_batch"]
    bob_since = (await world.sync(user=BOB, via=cluster.client(1)))["next_batch"]

    world.testbed.faults.withhold_next = 30  # the testbed pushes none of them itself
    event_ids = [world.send(room_id, f"m{n}") for n in range(30)]
    room = world.testbed.room(room_id)
    pdus = [pdu for e in event_ids if (pdu := room.event(e)) is not None]
    answers: list[httpx.Response] = []

    async def send(index: int) -> None:
        for start in range(0, len(pdus), 10):
            federation = cluster.daemons[index].federation
            chunk = pdus[start : start + 10]
            answers.append(await put_transaction(world, federation, f"c{index}-{start}", chunk))

    async with trio.open_nursery() as senders:
        senders.start_soon(send, 0)
        senders.start_soon(send, 1)
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert all(result == {} for result in answer.json()["pdus"].values()), answer.text
    stream = cluster.rows(
        "SELECT kind, event_id FROM room_stream WHERE room_id = ? AND kind IN ('event', 'gap') "
        "ORDER BY stream_pos",
        room_id,
    )
    assert [e for _, e in stream if e in event_ids] == event_ids  # each once, in order
    assert all(kind == "event" for kind, _ in stream)
    for user, since, via in (("@alice:peekproxy.test", alice_since, 0), (BOB, bob_since, 1)):
        seen: list[str] = []
        with trio.fail_after(20):
            while len(seen) < 30:
                got = await world.sync(
                    user=user,
                    since=since,
                    limit=100,
                    timeout_ms=5_000,
                    via=cluster.client(via),
                )
                since = got["next_batch"]
                seen += _event_ids(got, room_id)
        assert seen == event_ids


async def test_a_pdu_with_a_nul_character_is_rejected_and_the_rest_stored(
    nursery: trio.Nursery,
    tls_ca: trustme.CA,
    tmp_path: Path,
    spawn: Spawn,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A state key holding U+0000 (PostgreSQL's TEXT cannot hold it): that PDU gets a
    per-PDU error, the next PDU of the transaction and the next transaction are stored (it
    was a 500 for ever, blocking the sender's queue)."""
    cluster = await build_cluster(nursery, tls_ca, tmp_path, spawn, pg_dsn, instances=1)
    world = cluster.world
    room_id = world.create_room()
    assert (await world.peek(room_id, via=cluster.client(0))).status_code == 200
    world.testbed.faults.withhold_next = 4  # pushed below, by hand
    first = world.send(room_id, "before")
    with monkeypatch.context() as patch:  # the testbed checks its events as peers do
        patch.setattr("peekproxy.core.pdu_format.pdu_nul_problem", lambda pdu: None)
        nul = world.testbed.send(
            room_id, sender="admin", type="org.example.nul", content={}, state_key="a\x00b"
        )
    after, later = world.send(room_id, "after"), world.send(room_id, "later")
    room = world.testbed.room(room_id)
    pdus = [pdu for e in (first, nul, after) if (pdu := room.event(e)) is not None]
    federation = cluster.daemons[0].federation
    answer = await put_transaction(world, federation, "nul1", pdus)
    assert answer.status_code == 200, answer.text
    results = answer.json()["pdus"]
    assert results[first] == {} and results[after] == {}
    assert "U+0000" in results[nul]["error"]
    later_pdu = room.event(later)
    assert later_pdu is not None
    again = await put_transaction(world, federation, "nul2", [later_pdu])
    assert again.status_code == 200, again.text
    assert again.json()["pdus"] == {later: {}}
    stored = {
        e for (e,) in cluster.rows("SELECT event_id FROM room_stream WHERE room_id = ?", room_id)
    }
    assert {first, after, later} <= stored and nul not in stored
