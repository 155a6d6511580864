"""Two real peekproxy processes on one PostgreSQL database (issue 16, docs/cluster.md): the
testbed delivers to instance B, a device long-polls on A; devices on both instances share
one remote peek."""

from __future__ import annotations

from pathlib import Path

import trio
import trustme

from tests.cluster_world import build_cluster
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
