"""Acceptance of the observer join (issue 13): peeking rooms on servers without MSC2444, with
real Synapse on both ends (tests/observer_support.py).

Synapse A hosts a world_readable room with an alias and a member from Synapse B; peekproxy,
with ``[peeks] fallback = "observer_join"``, follows the room by joining it as its observer
user. A device of peekproxy's delegation API peeks ``#room:A``:

* state and recent history arrive, and messages sent on A and by B's user each reach the
  device's sync within 1 s of the send's answer;
* the device goes idle: after ``idle_timeout`` + ``observer_linger`` the observer has left
  (A shows its ``leave``); the next sync joins again and shows ``limited: true`` with the
  current state;
* ``history_visibility`` turns ``shared`` on A: the peek ends (``rooms.leave``) and the
  observer leaves;
* with the fallback off (the default) the peek fails with an error naming A as lacking MSC2444;
* the full chain (acceptance scenario 13): a matrix-nio client of Synapse B peeks the room
  through peekproxy fronting B, sees live events, then joins through B: the room moves to
  ``rooms.join`` and the peek ends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nio
import trio

from tests.conftest import Spawn
from tests.front_support import Account, bodies, client_api
from tests.nio_session import PASSWORD, Session, in_section, peeked
from tests.observer_support import (
    ObserverWorld,
    SharedRoom,
    membership,
    observer_world,
    shared_room,
    shown,
    sync_until,
    time_to_sync,
    wait_membership,
)
from tests.synapse import Synapse

TLS = tuple[Path, Path, Path]

#: The issue's bound: a message reaches the peeking device's sync within 1 s of its send.
LIVE_BOUND_S = 1.0


async def wait_event(account: Account, room_id: str, event_id: str) -> None:
    """Poll ``account``'s homeserver until it has ``event_id`` (sent on another server)."""
    path = f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/event/{quote(event_id, safe='')}"
    with trio.fail_after(30):
        while True:
            response = await client_api(account.synapse.client, account.token, "GET", path)
            if response.status_code == 200:
                return
            await trio.sleep(0.05)


async def room_with_history(a: Synapse, b: Synapse, name: str) -> SharedRoom:
    """A shared room (alice on A, bob of B) whose history ends with "history 1", "history 2",
    bob's "from B" (seen on A before alice goes on), "history 3"."""
    room = await shared_room(a, b, name)
    for body in ("history 1", "history 2"):
        await room.alice.send(room.room_id, body)
    await wait_event(room.alice, room.room_id, await room.bob.send(room.room_id, "from B"))
    await room.alice.send(room.room_id, "history 3")
    return room


def state_of(entry: dict[str, Any], kind: str, state_key: str = "") -> dict[str, Any] | None:
    """The latest content of a state event the sync entry shows (state, then timeline)."""
    found = [
        e["content"] for e in shown(entry) if e["type"] == kind and e.get("state_key") == state_key
    ]
    return found[-1] if found else None


async def test_a_peek_by_alias_joins_as_the_observer_and_shows_state_history_and_live_events(
    synapse: Synapse, synapse_b: Synapse, tls_files: TLS, tmp_path: Path, spawn: Spawn
) -> None:
    room = await room_with_history(synapse, synapse_b, "obs-live")
    world = await observer_world(synapse, synapse_b, tls_files, tmp_path, spawn)

    response = await world.peek(room.alias)
    assert response.status_code == 200, response.text
    assert response.json() == {"room_id": room.room_id}
    synced, since = await sync_until(world, None, peeked(room.room_id, "history 3"))
    entry = synced["rooms"]["peek"][room.room_id]
    assert bodies(entry)[-4:] == ["history 1", "history 2", "from B", "history 3"]
    assert state_of(entry, "m.room.create") is not None
    assert state_of(entry, "m.room.name") == {"name": "obs-live"}
    assert state_of(entry, "m.room.history_visibility") == {"history_visibility": "world_readable"}
    for member in (room.alice, room.bob):
        content = state_of(entry, "m.room.member", member.user_id)
        assert content is not None and content["membership"] == "join", member.user_id
    # Room members see the observer join (that is the price of the fallback).
    assert await membership(room.alice, room.room_id, world.observer) == "join"
    await wait_membership(room.bob, room.room_id, world.observer, "join")  # B learns it from A

    # Live: a message sent on A, then one by B's user, each in the device's sync within 1 s.
    figures = {}
    for who, body in ((room.alice, "live from A"), (room.bob, "live from B")):

        async def send(who: Account = who, body: str = body) -> None:
            await who.send(room.room_id, body)

        elapsed, synced, since = await time_to_sync(world, since, send, room.room_id, body)
        figures[body] = elapsed
        assert elapsed < LIVE_BOUND_S, figures
        assert synced["rooms"]["peek"][room.room_id]["timeline"]["limited"] is False
    print({k: f"{v * 1000:.0f} ms" for k, v in figures.items()})


async def test_an_idle_device_lets_the_observer_leave_and_its_next_sync_rejoins_with_a_gap(
    synapse: Synapse, synapse_b: Synapse, tls_files: TLS, tmp_path: Path, spawn: Spawn
) -> None:
    idle_s, linger_s = 2.0, 2.0
    room = await room_with_history(synapse, synapse_b, "obs-idle")
    world = await observer_world(
        synapse,
        synapse_b,
        tls_files,
        tmp_path,
        spawn,
        env={
            "PEEKPROXY_PEEKS__IDLE_TIMEOUT": f"{idle_s}s",
            "PEEKPROXY_PEEKS__OBSERVER_LINGER": f"{linger_s}s",
        },
    )
    assert (await world.peek(room.alias)).status_code == 200
    _, since = await sync_until(world, None, peeked(room.room_id, "history 3"))
    last_sync = trio.current_time()  # the start of the device's last request
    since = (await world.sync(since=since))["next_batch"]
    assert await membership(room.alice, room.room_id, world.observer) == "join"

    # The device stops syncing: idle_timeout, then the observer's linger, then it leaves A.
    await wait_membership(room.alice, room.room_id, world.observer, "leave")
    away_s = trio.current_time() - last_sync
    assert away_s >= idle_s + linger_s - 0.5, away_s  # not before both have passed

    # While nobody follows the room: messages and a new name on A.
    for n in range(3):
        await room.alice.send(room.room_id, f"while away {n}")
    await room.alice.set_state(room.room_id, "m.room.name", {"name": "renamed while away"})

    # The device syncs again: the observer joins again, and the first answer showing the
    # room is limited (the time away is a gap) and carries the current state. Fewer events
    # happened since the device's last view (the observer's leave, three messages, the
    # name, its join again) than the timeline limit (10): shown after what the device had
    # as if contiguous, they would fit unlimited.
    synced, since = await sync_until(world, since, peeked(room.room_id))
    entry = synced["rooms"]["peek"][room.room_id]
    assert entry["timeline"]["limited"] is True, entry["timeline"]
    assert entry["timeline"]["prev_batch"]
    assert state_of(entry, "m.room.name") == {"name": "renamed while away"}
    assert await membership(room.alice, room.room_id, world.observer) == "join"

    # It follows the room live again.
    await room.alice.send(room.room_id, "after the return")
    await sync_until(world, since, peeked(room.room_id, "after the return"))


async def test_history_visibility_shared_ends_the_peek_and_the_observer_leaves(
    synapse: Synapse, synapse_b: Synapse, tls_files: TLS, tmp_path: Path, spawn: Spawn
) -> None:
    room = await room_with_history(synapse, synapse_b, "obs-shared")
    world = await observer_world(synapse, synapse_b, tls_files, tmp_path, spawn)
    assert (await world.peek(room.alias)).status_code == 200
    _, since = await sync_until(world, None, peeked(room.room_id, "history 3"))
    assert await membership(room.alice, room.room_id, world.observer) == "join"

    await room.alice.set_state(
        room.room_id, "m.room.history_visibility", {"history_visibility": "shared"}
    )
    answers: list[dict[str, Any]] = []

    def ended(synced: dict[str, Any]) -> bool:
        answers.append(synced)
        return in_section("leave", room.room_id)(synced)

    synced, since = await sync_until(world, since, ended)
    assert room.room_id not in synced["rooms"]["peek"]
    # The change itself was shown to the device (scenario 14: with the leave entry).
    entries = [a["rooms"][s].get(room.room_id) or {} for a in answers for s in ("peek", "leave")]
    changes = [
        e["content"]
        for entry in entries
        for e in entry.get("timeline", {}).get("events", [])
        if e["type"] == "m.room.history_visibility"
    ]
    assert changes == [{"history_visibility": "shared"}]
    await wait_membership(room.alice, room.room_id, world.observer, "leave")

    # Later events are not delivered.
    await room.alice.send(room.room_id, "too late")
    quiet = await world.sync(since=since, timeout_ms=1000)
    assert room.room_id not in quiet["rooms"]["peek"]
    assert room.room_id not in quiet["rooms"]["leave"]


async def test_with_the_fallback_off_the_peek_fails_naming_the_servers_without_msc2444(
    synapse: Synapse, synapse_b: Synapse, tls_files: TLS, tmp_path: Path, spawn: Spawn
) -> None:
    room = await room_with_history(synapse, synapse_b, "obs-off")
    world = await observer_world(synapse, synapse_b, tls_files, tmp_path, spawn, fallback="none")
    response = await world.peek(room.alias)
    assert response.status_code == 502, response.text
    error = response.json()
    assert error["errcode"] == "M_UNKNOWN"
    # Both resident servers were candidates; each is named as lacking MSC2444.
    for server in (synapse.server_name, synapse_b.server_name):
        assert f"{server}: does not support MSC2444" in error["error"], error
    assert await membership(room.alice, room.room_id, world.observer) is None
    synced = await world.sync()
    assert room.room_id not in synced["rooms"]["peek"]


# -- the full chain: matrix-nio on Synapse B, through the front ----------------------------


async def _front_script(s: Session, alias: str) -> None:
    login = await s.direct.login(PASSWORD, device_name="observer")
    assert isinstance(login, nio.LoginResponse), login
    s.token = login.access_token
    s.front.restore_login(s.user, login.device_id, login.access_token)
    await s.sync()
    room_id = s.remote_room

    # The room on A, peeked through the front by alias (MSC2753).
    await s.msc2753(f"/peek/{quote(alias, safe='')}")
    await s.sync_until(peeked(room_id, "history 3"), "the peeked room on Synapse A")
    assert room_id not in s.front.rooms  # nio keeps joined rooms only

    async def send_on_a() -> None:
        await s.alice.send(room_id, "live from A")

    await s.live(send_on_a, peeked(room_id, "live from A"), "Synapse A event -> nio (ms)")

    # The user joins the room through Synapse B: rooms.join, and no more rooms.peek.
    joined = await s.direct.join(room_id)
    assert isinstance(joined, nio.JoinResponse), joined
    await s.sync_until(in_section("join", room_id), "the joined room")
    join_at = len(s.answers) - 1
    assert room_id in s.front.rooms  # nio took the join block
    await s.alice.send(room_id, "to the member")
    await s.sync_until(in_section("join", room_id, "to the member"), "a message to the member")
    assert not any(room_id in a.get("rooms", {}).get("peek", {}) for a in s.answers[join_at:])


async def _front_session(s: Session, alias: str) -> None:
    s.direct = nio.AsyncClient(s.synapse.client, s.user)
    s.front = nio.AsyncClient(s.world.daemon.client, s.user)
    try:
        await _front_script(s, alias)
    finally:
        await s.front.close()
        await s.direct.close()


async def test_nio_on_synapse_b_peeks_a_room_on_a_through_the_front_then_joins(
    synapse: Synapse, synapse_b: Synapse, tls_files: TLS, tmp_path: Path, spawn: Spawn
) -> None:
    room = await room_with_history(synapse, synapse_b, "obs-front")
    world: ObserverWorld = await observer_world(
        synapse,
        synapse_b,
        tls_files,
        tmp_path,
        spawn,
        env={"PEEKPROXY_UPSTREAM__HOMESERVER_URL": synapse_b.client},
    )
    synapse_b.register("obs-front-nio")
    user = f"@obs-front-nio:{synapse_b.server_name}"
    session = Session(
        world, synapse_b, room.alice, user, room.room_id, trio.lowlevel.current_trio_token()
    )
    await trio.to_thread.run_sync(lambda: asyncio.run(_front_session(session, room.alias)))
    # The peek ended with the join: nobody peeks the room, so the observer leaves A.
    await wait_membership(room.alice, room.room_id, world.observer, "leave")
    assert await membership(room.alice, room.room_id, user) == "join"
    assert session.token not in world.daemon.log
    print(session.figures)
