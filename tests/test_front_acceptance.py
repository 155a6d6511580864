"""Acceptance of the sync front with a real client: matrix-nio peeks through peekproxy in
front mode before the session's real Synapse (issue 12, "Acceptance", third point).

nio runs on asyncio: the session runs in a worker thread with its own event loop and reaches
back into trio (the testbed, peekproxy's log) with ``trio.from_thread``. peekproxy does not
serve ``/login``, ``/join`` or ``/send`` (the reverse proxy sends them to the homeserver), so
the user has two nio clients on one device: DIRECT, pointed at Synapse, logs in
(``login``), joins, leaves and sends; FRONT, pointed at peekproxy's client listener, gets
DIRECT's access token and device (``restore_login``) and only syncs. The MSC2753 peek and
unpeek go to peekproxy with raw httpx (nio has no peek call). nio parses the parts of a sync
it knows (``rooms.join``, ``rooms.leave``); ``rooms.peek`` is read from the raw JSON of the
same answer (``SyncResponse.transport_response``, aiohttp's response, whose body nio has
already read and aiohttp keeps).

Browsers' clients (Element Web) need CORS: the front's preflights and answers are compared
with the real Synapse's.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import nio
import trio
import trustme

from tests.conftest import Spawn
from tests.front_support import Account, auth, front_world
from tests.nio_session import PASSWORD, Session, in_section, peeked
from tests.peek_world import TESTBED
from tests.synapse import Synapse


async def _script(s: Session) -> None:
    login = await s.direct.login(PASSWORD, device_name="acceptance")
    assert isinstance(login, nio.LoginResponse), login
    s.token = login.access_token
    s.front.restore_login(s.user, login.device_id, login.access_token)
    await s.sync()
    created = await s.direct.room_create(name="Joined room")
    assert isinstance(created, nio.RoomCreateResponse), created
    joined_room = created.room_id
    await s.sync_until(in_section("join", joined_room), "the new joined room")

    # The testbed room, peeked (MSC2753): rooms.peek in the front's sync, then live.
    remote = s.remote_room
    await s.msc2753(f"/peek/{quote(remote, safe='')}?server_name={TESTBED}")
    _, raw = await s.sync_until(peeked(remote, "before the peek"), "the peeked testbed room")
    assert remote not in s.front.rooms  # nio keeps joined rooms only

    async def send_remote() -> None:
        await s.in_trio(s.world.send, remote, "remote live")

    await s.live(send_remote, peeked(remote, "remote live"), "testbed event -> nio sync (ms)")

    # Its joined room keeps working meanwhile: a message arrives in the same session.
    sent = await s.direct.room_send(
        joined_room, "m.room.message", {"msgtype": "m.text", "body": "in the joined room"}
    )
    assert isinstance(sent, nio.RoomSendResponse), sent
    response, _ = await s.sync_until(
        in_section("join", joined_room, "in the joined room"), "the joined room's message"
    )
    timeline = response.rooms.join[joined_room].timeline.events
    assert sent.event_id in [e.event_id for e in timeline]

    # Unpeek: rooms.leave once, and the following of the room is released.
    await s.msc2753(f"/rooms/{quote(remote, safe='')}/unpeek")
    _, raw = await s.sync_until(in_section("leave", remote), "rooms.leave for the unpeek")
    assert remote not in raw["rooms"].get("peek", {})
    _, raw = await s.sync()
    assert remote not in raw.get("rooms", {}).get("leave", {})  # once
    await s.released(remote)

    # A world_readable room hosted on Synapse itself: peeked, live, then joined.
    local = await s.alice.create_room(version="10")
    await s.alice.send(local, "local one")
    await s.msc2753(f"/peek/{quote(local, safe='')}")
    await s.sync_until(peeked(local, "local one"), "the peeked local room")

    async def send_local() -> None:
        await s.alice.send(local, "local live")

    await s.live(send_local, peeked(local, "local live"), "Synapse event -> nio sync (ms)")
    before_join = len(s.answers)
    joined = await s.direct.join(local)
    assert isinstance(joined, nio.JoinResponse), joined
    _, raw = await s.sync_until(in_section("join", local), "the joined local room")
    join_at = len(s.answers) - 1
    assert local in s.front.rooms  # nio took the join block
    await s.alice.send(local, "to the member")
    await s.sync_until(in_section("join", local, "to the member"), "a message to the member")
    after_join = s.answers[before_join:]
    assert not any(local in a.get("rooms", {}).get("leave", {}) for a in after_join)
    assert not any(local in a.get("rooms", {}).get("peek", {}) for a in s.answers[join_at:])
    await s.released(local)  # nobody peeks it any more

    # Leave after join: the homeserver's rooms.leave; the room never returns to rooms.peek.
    left = await s.direct.room_leave(local)
    assert isinstance(left, nio.RoomLeaveResponse), left
    await s.sync_until(in_section("leave", local), "the homeserver's leave")
    before_leave = len(s.answers)
    await s.alice.send(local, "after the leave")
    end = time.monotonic() + 3
    while time.monotonic() < end:
        await s.sync(timeout_ms=1000)
    assert not any(local in a.get("rooms", {}).get("peek", {}) for a in s.answers[before_leave:])
    stored = [body for _, body in s.world.stream(local)]
    assert "local live" in stored and "after the leave" not in stored


async def _session(s: Session) -> None:
    s.direct = nio.AsyncClient(s.synapse.client, s.user)
    s.front = nio.AsyncClient(s.world.daemon.client, s.user)
    try:
        await _script(s)
    finally:
        await s.front.close()
        await s.direct.close()


async def test_nio_peeks_through_the_front_then_joins(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    alice, reader = Account(synapse, "acc-alice"), Account(synapse, "acc-reader")
    synapse.register("acc-nio")
    world = await front_world(
        synapse,
        nursery,
        tls_ca,
        tmp_path,
        spawn,
        reader=reader,
        env={"PEEKPROXY_PEEKS__LINGER": "0.2"},
    )
    remote = world.create_room("10", name="Testbed room")
    world.send(remote, "before the peek")
    user = f"@acc-nio:{synapse.server_name}"
    session = Session(world, synapse, alice, user, remote, trio.lowlevel.current_trio_token())
    await trio.to_thread.run_sync(lambda: asyncio.run(_session(session)))
    # The testbed saw the remote peek start and end (DELETE) once.
    assert [e[2] for e in world.log_of("start")] == [remote]
    assert [e[2] for e in world.log_of("delete")] == [remote]
    for token in (session.token, reader.token, alice.token):
        assert token not in world.daemon.log
    print(session.figures)


# -- CORS: browsers' clients (Element Web) ------------------------------------------------

ORIGIN = "https://app.element.example"


def _listed(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


async def test_cors_preflight_and_answers_like_synapse(
    synapse: Synapse, nursery: trio.Nursery, tls_ca: trustme.CA, tmp_path: Path, spawn: Spawn
) -> None:
    """Every path the front serves answers a browser's preflight with Synapse's CORS policy,
    and its answers (errors and the homeserver's answers passed on included) carry
    ``Access-Control-Allow-Origin: *``."""
    world = await front_world(synapse, nursery, tls_ca, tmp_path, spawn)
    bob = Account(synapse, "cors-bob")
    room_id = await bob.create_room(version="10")
    room = quote(room_id, safe="")
    served = [
        ("GET", f"/_matrix/client/{v}{path}")
        for v in ("r0", "v3")
        for path in (
            "/sync",
            f"/rooms/{room}/messages",
            f"/rooms/{room}/state",
            f"/rooms/{room}/event/%24e",
        )
    ] + [
        ("POST", f"/_matrix/client/{v}{path}")
        for v in ("r0", "v3", "unstable/org.matrix.msc2753")
        for path in (f"/peek/{room}", "/peek_room", f"/rooms/{room}/unpeek")
    ]
    served += [("GET", "/health"), ("GET", "/ready")]
    asked = {"Authorization", "Content-Type"}
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Headers": ", ".join(sorted(asked)),
    }
    async with httpx.AsyncClient(timeout=30) as http:
        at_synapse = await http.options(
            f"{synapse.client}/_matrix/client/v3/sync",
            headers=preflight | {"Access-Control-Request-Method": "GET"},
        )
        assert at_synapse.is_success, at_synapse
        for method, path in served:
            answer = await http.options(
                f"{world.daemon.client}{path}",
                headers=preflight | {"Access-Control-Request-Method": method},
            )
            assert answer.status_code == 200, (path, answer.status_code, answer.text)
            headers = answer.headers
            assert headers["access-control-allow-origin"] == "*", path
            assert _listed(headers["access-control-allow-methods"]) == _listed(
                at_synapse.headers["access-control-allow-methods"]
            )
            allowed = _listed(headers["access-control-allow-headers"])
            assert _listed(at_synapse.headers["access-control-allow-headers"]) <= allowed
            assert {h.lower() for h in asked} <= allowed

        # The answers themselves: the merged /sync, the homeserver's history answer passed
        # on, an error of peekproxy's own, an unknown path.
        origin = {"Origin": ORIGIN}
        answers = [
            await http.get(
                f"{world.daemon.client}/_matrix/client/v3/sync?timeout=0",
                headers=bob.auth | origin,
            ),
            await http.get(
                f"{world.daemon.client}/_matrix/client/v3/rooms/{room}/messages?dir=b",
                headers=bob.auth | origin,
            ),
            await http.get(
                f"{world.daemon.client}/_matrix/client/v3/sync", headers=auth("bad") | origin
            ),
            await http.get(f"{world.daemon.client}/_matrix/client/v3/nowhere", headers=origin),
        ]
        direct = await http.get(
            f"{synapse.client}/_matrix/client/v3/sync?timeout=0", headers=bob.auth | origin
        )
    assert [a.status_code for a in answers] == [200, 200, 401, 404]
    for answer in [*answers, direct]:
        assert answer.headers["access-control-allow-origin"] == "*", answer.url
    assert _listed(answers[0].headers["access-control-expose-headers"]) == _listed(
        direct.headers["access-control-expose-headers"]
    )
