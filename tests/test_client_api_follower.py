"""services/client_api_follower.py and services/follower_choice.py, each alone: the
homeserver is an in-process fake behind httpx's MockTransport (the end-to-end tests with a
real Synapse are in tests/test_local_rooms.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from peekproxy.federation.keyring import Keyring
from peekproxy.homeserver.client import HomeserverClient
from peekproxy.services.assembly import Services, build_services
from peekproxy.services.client_api_follower import (
    HANDLE_PREFIX,
    ClientApiFollower,
    is_client_api_handle,
)
from peekproxy.services.errors import PeekError
from peekproxy.services.follower_choice import FollowerChoice
from peekproxy.services.following import (
    Fetched,
    Followed,
    FollowFailed,
    RenewalFailed,
    Renewed,
)
from peekproxy.store import Storage
from peekproxy.store.sqlite import open_sqlite
from tests.offline import OFFLINE_SETTINGS, offline_client

HS = "hs.test"
ROOM = f"!room:{HS}"
BOB = ("@bob:hs.test", "PHONE")


def pdu(event_id: str, depth: int, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "room_id": ROOM,
        "type": "m.room.message",
        "sender": f"@a:{HS}",
        "content": {"body": event_id},
        "prev_events": [],
        "auth_events": [],
        "depth": depth,
        "origin_server_ts": depth,
        "unsigned": {"age": 1},
    } | fields


def state_event(event_id: str, kind: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": event_id, "type": kind, "state_key": "", "content": content}


READABLE = [
    state_event("$create", "m.room.create", {"room_version": "10"}),
    state_event("$hv", "m.room.history_visibility", {"history_visibility": "world_readable"}),
]


class FakeHomeserver:
    """Answers the client API paths the follower uses; ``/events`` waits for what the test
    puts in ``events_in`` ((status, body) per long-poll)."""

    def __init__(self) -> None:
        self.state: tuple[int, Any] = (200, READABLE)
        self.messages: tuple[int, Any] = (
            200,
            {"chunk": [pdu("$2", 4), pdu("$1", 3)], "start": "s1"},
        )
        self.summary: tuple[int, Any] = (400, {"errcode": "M_UNKNOWN", "error": "no via"})
        self.events_in, self._events_out = trio.open_memory_channel[tuple[int, Any]](10)
        self.polls: list[dict[str, str]] = []
        self.tokens: set[str | None] = set()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.tokens.add(request.headers.get("authorization"))
        if path.endswith("/account/whoami"):
            status, body = 200, {"user_id": f"@reader:{HS}"}
        elif path.endswith("/messages"):
            status, body = self.messages
        elif path.endswith("/state"):
            status, body = self.state
        elif "/room_summary/" in path:
            status, body = self.summary
        elif path.endswith("/events"):
            self.polls.append(dict(request.url.params))
            status, body = await self._events_out.receive()
        else:
            status, body = 404, {"errcode": "M_UNRECOGNIZED", "error": path}
        return httpx.Response(status, content=json.dumps(body).encode())


class Sink:
    def __init__(self) -> None:
        self.appended: list[tuple[str, str, list[Fetched]]] = []
        self.ended: list[tuple[str, str, str]] = []
        self.keep = True
        self.changed = trio.Event()

    async def append_trusted(self, room_id: str, handle: str, events: list[Fetched]) -> bool:
        self.appended.append((room_id, handle, events))
        self.changed.set()
        return self.keep

    async def end_trusted(self, room_id: str, handle: str, reason: str) -> None:
        self.ended.append((room_id, handle, reason))
        self.changed.set()


class Setup:
    def __init__(self, homeserver: FakeHomeserver, follower: ClientApiFollower, sink: Sink):
        self.homeserver, self.follower, self.sink = homeserver, follower, sink

    async def changed(self) -> None:
        await self.sink.changed.wait()
        self.sink.changed = trio.Event()


@pytest.fixture
async def setup(nursery: trio.Nursery) -> AsyncIterator[Setup]:
    homeserver = FakeHomeserver()
    http = httpx.AsyncClient(transport=httpx.MockTransport(homeserver.handle))
    follower = ClientApiFollower(
        homeserver=HomeserverClient("http://hs.invalid", http=http), token="secret-token"
    )
    sink = Sink()
    follower.attach(sink)
    await nursery.start(follower.run)
    yield Setup(homeserver, follower, sink)
    await http.aclose()


async def test_follow_reads_the_newest_events_and_state_then_polls_from_there(
    setup: Setup,
) -> None:
    followed = await setup.follower.follow(ROOM, [HS])
    assert followed.server == HS and is_client_api_handle(followed.handle)
    snapshot = followed.snapshot
    assert snapshot.room_version == "10" and snapshot.latest_event_id == "$2"
    assert set(snapshot.events) == {"$create", "$hv", "$2"}
    assert "unsigned" not in snapshot.events["$2"]
    # The event before the latest one is history, oldest first; no "end": nothing older.
    wire_1 = {k: v for k, v in pdu("$1", 3).items() if k not in ("event_id", "unsigned")}
    assert followed.history == ([("$1", wire_1, False)], True)
    assert setup.homeserver.tokens == {"Bearer secret-token"}

    presence = {"type": "m.presence", "content": {"presence": "online"}}
    await setup.homeserver.events_in.send((200, {"chunk": [presence, pdu("$3", 5)], "end": "s2"}))
    await setup.changed()
    [(room_id, handle, events)] = setup.sink.appended
    assert (room_id, handle) == (ROOM, followed.handle)
    assert [e[0] for e in events] == ["$3"]
    await setup.homeserver.events_in.send((200, {"chunk": [], "end": "s3"}))
    await trio.testing.wait_all_tasks_blocked()  # the third long-poll waits
    assert [p["from"] for p in setup.homeserver.polls] == ["s1", "s2", "s3"]
    assert all(p["room_id"] == ROOM and "raw" in p for p in setup.homeserver.polls)
    assert isinstance(await setup.follower.renew(ROOM, HS, followed.handle), Renewed)


async def test_a_stopped_following_is_refused_at_renewal(setup: Setup) -> None:
    followed = await setup.follower.follow(ROOM, [HS])
    assert isinstance(await setup.follower.renew(ROOM, HS, followed.handle), Renewed)
    assert await setup.follower.stop(ROOM, HS, followed.handle)
    renewal = await setup.follower.renew(ROOM, HS, followed.handle)
    assert isinstance(renewal, RenewalFailed) and renewal.refused
    # A handle from before a restart is unknown: refused, so the room is followed again.
    unknown = await setup.follower.renew(ROOM, HS, HANDLE_PREFIX + "old")
    assert isinstance(unknown, RenewalFailed) and unknown.refused


async def test_a_room_that_is_not_world_readable_is_forbidden(setup: Setup) -> None:
    setup.homeserver.state = (200, READABLE[:1])  # history_visibility: shared
    with pytest.raises(FollowFailed) as failed:
        await setup.follower.follow(ROOM, [HS])
    assert (failed.value.error.status, failed.value.error.errcode) == (403, "M_FORBIDDEN")
    # Refused by the homeserver: its room summary says why.
    setup.homeserver.state = (403, {"errcode": "M_FORBIDDEN", "error": "not in room"})
    setup.homeserver.messages = (403, {"errcode": "M_FORBIDDEN", "error": "not in room"})
    setup.homeserver.summary = (200, {"room_id": ROOM, "world_readable": False})
    with pytest.raises(FollowFailed) as failed:
        await setup.follower.follow(ROOM, [HS])
    assert failed.value.error.status == 403


async def test_a_room_the_homeserver_cannot_show_is_a_502(setup: Setup) -> None:
    setup.homeserver.messages = (403, {"errcode": "M_FORBIDDEN", "error": "not in room"})
    with pytest.raises(FollowFailed) as failed:
        await setup.follower.follow(ROOM, [HS])
    assert (failed.value.error.status, failed.value.error.errcode) == (502, "M_UNKNOWN")
    assert "not in the room" in failed.value.error.error
    with pytest.raises(FollowFailed) as failed:
        await setup.follower.follow(ROOM, ["elsewhere.test"])
    assert failed.value.error.status == 502


async def test_refused_while_live_ends_the_peeks_when_no_longer_world_readable(
    setup: Setup,
) -> None:
    followed = await setup.follower.follow(ROOM, [HS])
    setup.homeserver.summary = (200, {"room_id": ROOM, "world_readable": False})
    await setup.homeserver.events_in.send((403, {"errcode": "M_FORBIDDEN", "error": "no"}))
    await setup.changed()
    assert setup.sink.ended == [(ROOM, followed.handle, f"{ROOM} is not world_readable")]
    await trio.testing.wait_all_tasks_blocked()  # the live task has ended
    renewal = await setup.follower.renew(ROOM, HS, followed.handle)
    assert isinstance(renewal, RenewalFailed) and renewal.refused


async def test_errors_while_live_back_off_and_retry(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    await setup.follower.follow(ROOM, [HS])
    for _ in range(3):
        await setup.homeserver.events_in.send((502, {"error": "bad gateway"}))
    await setup.homeserver.events_in.send((200, {"chunk": [pdu("$3", 5)], "end": "s2"}))
    start = trio.current_time()
    await setup.changed()
    # Three failures in a row: about 1 + 2 + 4 s of back-off (±20 %), each from the same token.
    assert 5.6 <= trio.current_time() - start <= 8.4
    assert [p["from"] for p in setup.homeserver.polls][:5] == ["s1"] * 4 + ["s2"]


class FakeFollower:
    """A follower that answers with ``name`` as its handle, or fails with ``error``;
    ``lacking``: the servers it says lack MSC2444 (as Msc2444Peeks.lacks_msc2444)."""

    def __init__(self, name: str, error: PeekError | None = None) -> None:
        self.name, self.error = name, error
        self.calls: list[tuple[str, Any]] = []
        self.lacking: set[str] = set()
        self.settings = SimpleNamespace(joins=True)

    def lacks_msc2444(self, server: str) -> bool:
        return server in self.lacking

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        self.calls.append(("follow", list(candidates)))
        if self.error is not None:
            raise FollowFailed(self.error, rate_limited=False, abandoned=())
        return Followed(
            server=candidates[0],
            handle=self.name,
            interval_ms=1,
            at_ms=1,
            snapshot=None,  # type: ignore[arg-type]
            history=None,
        )

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        self.calls.append(("renew", handle))
        return Renewed(at_ms=1)

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        self.calls.append(("stop", handle))
        return True


class FakeLocal(FakeFollower):
    async def server_name(self) -> str | None:
        return HS


async def test_the_choice_tries_the_homeserver_first_then_the_other_candidates() -> None:
    local, remote = FakeLocal(HANDLE_PREFIX + "x"), FakeFollower("peekid01")
    choice = FollowerChoice(local=local, remote=remote)  # type: ignore[arg-type]
    assert (await choice.follow(ROOM, ["other.test", HS])).handle == local.name
    assert (await choice.follow("!r:other.test", ["other.test"])).handle == remote.name
    assert remote.calls == [("follow", ["other.test"])]
    await choice.renew(ROOM, HS, local.name)
    await choice.stop(ROOM, HS, local.name)
    await choice.renew(ROOM, "other.test", remote.name)
    await choice.stop(ROOM, "other.test", remote.name)
    assert local.calls[1:] == [("renew", local.name), ("stop", local.name)]
    assert remote.calls[1:] == [("renew", remote.name), ("stop", remote.name)]

    local.error = PeekError(502, "M_UNKNOWN", "the homeserver is not in the room")
    assert (await choice.follow(ROOM, [HS, "other.test"])).handle == remote.name
    assert remote.calls[-1] == ("follow", ["other.test"])
    remote.error = PeekError(502, "M_UNKNOWN", "other.test: down")
    with pytest.raises(FollowFailed) as failed:
        await choice.follow(ROOM, [HS, "other.test"])
    assert failed.value.error.error == "the homeserver is not in the room; other.test: down"
    # Not peekable at the homeserver: no other candidate is asked.
    local.error = PeekError(403, "M_FORBIDDEN", "not world_readable")
    asked = len(remote.calls)
    with pytest.raises(FollowFailed) as failed:
        await choice.follow(ROOM, [HS, "other.test"])
    assert failed.value.error.status == 403 and len(remote.calls) == asked


async def _services(store: Storage, homeserver: FakeHomeserver) -> tuple[Services, Any]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(homeserver.handle))
    local = ClientApiFollower(
        homeserver=HomeserverClient("http://hs.invalid", http=http), token="t"
    )
    client = offline_client()
    services = build_services(
        store=store,
        client=client,
        keyring=Keyring(client),
        settings=OFFLINE_SETTINGS,
        local_rooms=local,
    )
    return services, http


async def _newest(store: Storage) -> list[str]:
    return await store.read(lambda tx: tx.newest_event_ids(ROOM, 1))


async def _synced_until(services: Services, store: Storage, event_id: str) -> None:
    """Long-poll bob's device until ``event_id`` is the room's newest event."""
    since = None
    with trio.fail_after(10):
        while await _newest(store) != [event_id]:
            synced = await services.syncing.sync(*BOB, since=since, timeout_ms=5000)
            since = synced["next_batch"]


async def test_followed_again_after_a_restart_keeps_the_events_that_came_first(
    tmp_path: Path,
) -> None:
    """Assembled with the services: a peek of a room on the homeserver, live events, then a
    restart. The new following's first long-poll answers while its snapshot is still being
    stored (the room's old following still takes events): that event is kept, and the new
    following stays live."""
    store = await open_sqlite(tmp_path / "p.db", "peekproxy.test")
    homeserver = FakeHomeserver()
    try:
        async with trio.open_nursery() as nursery:
            services, http = await _services(store, homeserver)
            await nursery.start(services.run)
            assert await services.syncing.peek(*BOB, ROOM) == ROOM
            sub = services.subscriptions.get(ROOM)
            assert sub is not None and is_client_api_handle(sub.peek_id)
            assert await _newest(store) == ["$2"]
            await homeserver.events_in.send((200, {"chunk": [pdu("$3", 5)], "end": "s2"}))
            await _synced_until(services, store, "$3")
            nursery.cancel_scope.cancel()
        await http.aclose()

        restarted = FakeHomeserver()
        restarted.messages = (200, {"chunk": [pdu("$4", 6), pdu("$3", 5)], "start": "s4"})
        await restarted.events_in.send((200, {"chunk": [pdu("$5", 7)], "end": "s5"}))
        async with trio.open_nursery() as nursery:
            services, http = await _services(store, restarted)
            await nursery.start(services.run)
            await _synced_until(services, store, "$5")
            sub = services.subscriptions.get(ROOM)
            assert sub is not None and sub.peek_id is not None
            assert isinstance(await services.follower.renew(ROOM, HS, sub.peek_id), Renewed)
            nursery.cancel_scope.cancel()
        await http.aclose()
    finally:
        await store.aclose()
