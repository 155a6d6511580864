"""Typing and receipts that the peek target relays for users of other servers (issue 10 item
8), end to end: the testbed hosts a room that users of a simulated remote server have
joined, relays their EDUs to peekproxy (a child process) over federation, and a device
reads them in its ``/sync`` through the delegation API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from peekproxy.federation.signing_key import server_key_document
from tests.conftest import Spawn
from tests.peek_world import PEEKPROXY, TESTBED, PeekWorld, build_world

BOB = "@bob:other.test"  # joined
DAVE = "@dave:other.test"  # joined
CAROL = "@carol:other.test"  # not joined
ERIN = "@erin:other.test"  # joins later
ADMIN = f"@admin:{TESTBED}"


def ephemeral(sync: dict[str, Any], room_id: str) -> dict[str, Any]:
    room = sync["rooms"]["peek"].get(room_id)
    if room is None:
        return {}
    return {e["type"]: e["content"] for e in room["ephemeral"]["events"]}


async def delivered(world: PeekWorld) -> None:
    """Wait until peekproxy has answered every transaction queued for it (it answers only
    once everything is stored)."""
    sender = world.testbed.senders[PEEKPROXY]
    await sender.wait_idle()
    assert all(t.status == "sent" for t in sender.transactions), sender.transactions


@pytest.mark.slow
async def test_relayed_typing_and_receipts_reach_the_sync(
    nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    world = await build_world(nursery, tls_ca, tmp_path, spawn)
    # other.test's users live on the testbed (signed with other.test's key, which other.test
    # serves to whoever verifies their events).
    key = world.testbed.add_remote_server("other.test")
    other = await world.add_server(nursery, tls_ca, tmp_path, "other.test")

    async def key_server(scope: Any, body: bytes) -> tuple[int, Any]:
        now = int(time.time() * 1000)
        return 200, server_key_document("other.test", key, now_ms=now, valid_for_ms=3_600_000)

    other.handler = key_server
    room_id = world.create_room("10", name="Relay")
    for user in (BOB, DAVE):
        world.testbed.membership(room_id, user, "join")
    assert (await world.peek(room_id, hints=[TESTBED])).status_code == 200
    first = await world.sync()
    members = {
        e["state_key"]: e["content"]["membership"]
        for e in first["rooms"]["peek"][room_id]["state"]["events"]
        + first["rooms"]["peek"][room_id]["timeline"]["events"]
        if e["type"] == "m.room.member"
    }
    assert members[BOB] == members[DAVE] == "join"
    message = world.send(room_id, "read me")
    await world.wait_delivered(message)
    since = (await world.sync(since=first["next_batch"]))["next_batch"]

    # Two users of another server start typing within one sync range; a third, who is not
    # in the room, "types" too; two receipts; the testbed's own user types as well.
    world.testbed.typing(room_id, BOB, True)
    world.testbed.typing(room_id, DAVE, True)
    world.testbed.typing(room_id, CAROL, True)
    world.testbed.typing(room_id, "admin", True)
    world.testbed.receipt(room_id, BOB, message)
    world.testbed.receipt(room_id, DAVE, message)
    world.testbed.receipt(room_id, CAROL, message)
    await delivered(world)
    synced = await world.sync(since=since)
    shown = ephemeral(synced, room_id)
    assert shown["m.typing"] == {"user_ids": sorted([ADMIN, BOB, DAVE])}
    assert set(shown["m.receipt"][message]["m.read"]) == {BOB, DAVE}
    since = synced["next_batch"]

    # Bob stops: the next sync lists everyone still typing, not just the last change.
    world.testbed.typing(room_id, BOB, False)
    await delivered(world)
    synced = await world.sync(since=since)
    assert ephemeral(synced, room_id) == {"m.typing": {"user_ids": sorted([ADMIN, DAVE])}}
    since = synced["next_batch"]

    # The non-member's EDUs changed nothing: a long-poll sees no news from them.
    world.testbed.typing(room_id, CAROL, False)
    await delivered(world)
    quiet = await world.sync(since=since, timeout_ms=300)
    assert room_id not in quiet["rooms"]["peek"]

    # A user who joins and types at once (one transaction: the join PDU, then the EDU)
    # counts: membership is checked after the transaction's events are stored.
    world.testbed.membership(room_id, ERIN, "join")
    world.testbed.typing(room_id, ERIN, True)
    await delivered(world)
    assert any(t.event_ids and t.edu_types for t in world.testbed.senders[PEEKPROXY].transactions)
    synced = await world.sync(since=since)
    assert ephemeral(synced, room_id) == {"m.typing": {"user_ids": sorted([ADMIN, DAVE, ERIN])}}
    joins = [e for e in synced["rooms"]["peek"][room_id]["timeline"]["events"]]
    assert [e["state_key"] for e in joins] == [ERIN]

    # Another device that starts peeking now sees who is typing (and the receipts).
    assert (await world.peek(room_id, device="D2")).status_code == 200
    fresh = ephemeral(await world.sync(device="D2"), room_id)
    assert fresh["m.typing"] == {"user_ids": sorted([ADMIN, DAVE, ERIN])}
    assert set(fresh["m.receipt"][message]["m.read"]) == {BOB, DAVE}
