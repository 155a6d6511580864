"""The observer join's refusals and removal against a real Synapse (tests/observer_support.py;
the acceptance scenarios are in tests/test_observer_join.py): a room that may not be peeked is
never joined, and a kick of the observer ends the peek for good."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import trio

from tests.conftest import Spawn
from tests.front_support import Account
from tests.observer_support import membership, observer_world, sync_until, wait_membership
from tests.synapse import Synapse

TLS = tuple[Path, Path, Path]


async def test_a_room_that_may_not_be_peeked_is_never_joined(
    synapse: Synapse, synapse_b: Synapse, tls_files: TLS, tmp_path: Path, spawn: Spawn
) -> None:
    alice = Account(synapse, "obs-private")
    shared = await alice.create_room(version="10", world_readable=False)
    encrypted = await alice.create_room(version="10")
    await alice.call(
        "PUT",
        f"/rooms/{quote(encrypted)}/state/m.room.encryption/",
        {"algorithm": "m.megolm.v1.aes-sha2"},
    )
    world = await observer_world(synapse, synapse_b, tls_files, tmp_path, spawn)
    assert "fallback=observer_join" in world.daemon.log  # the ready line
    for room_id, why in ((shared, "not world_readable"), (encrypted, "encrypted")):
        answer = await world.peek(room_id, hints=[synapse.server_name])
        assert answer.status_code == 403, answer.text
        assert answer.json()["errcode"] == "M_FORBIDDEN"
        assert why in answer.json()["error"]
        assert await membership(alice, room_id, world.observer) is None  # never in the room


async def test_a_kick_of_the_observer_ends_the_peek(
    synapse: Synapse, synapse_b: Synapse, tls_files: TLS, tmp_path: Path, spawn: Spawn
) -> None:
    alice = Account(synapse, "obs-kicker")
    room_id = await alice.create_room(version="11")
    world = await observer_world(synapse, synapse_b, tls_files, tmp_path, spawn)
    answer = await world.peek(room_id, hints=[synapse.server_name])
    assert answer.status_code == 200, answer.text
    since = (await world.sync())["next_batch"]
    await alice.call(
        "POST", f"/rooms/{quote(room_id)}/kick", {"user_id": world.observer, "reason": "no"}
    )
    await sync_until(world, since, lambda s: room_id in s.get("rooms", {}).get("leave", {}))
    # The peek ended: the observer does not join again by itself.
    await trio.sleep(1)
    assert await wait_membership(alice, room_id, world.observer, "leave") < 0.5
