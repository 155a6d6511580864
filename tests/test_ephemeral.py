"""Typing and receipts from ``/send`` (issue 10 item 8), in-process over a real store (both
engines, but for the mock-clock test): which EDUs are kept (a server for its own users; the
room's peek target also for users joined to the room), typing listed per user, the typing
timeout, and what a restart does. End to end with the testbed: tests/test_ephemeral_relay.py."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from peekproxy.core.subscription import Subscription, SubState
from peekproxy.services.assembly import PeekSettings, Services, build_services
from peekproxy.services.ingest import TYPING_TIMEOUT_MS
from peekproxy.services.settings import LiveSettings
from peekproxy.store import Storage
from peekproxy.store.sqlite import open_sqlite
from peekproxy.store.sqlite.migrations import apply_migrations, available_migrations
from tests.conftest import OpenStore
from tests.offline import offline_client

ROOM = "!room:remote.test"
TARGET = "remote.test"  # the server peekproxy peeks ROOM through
ALICE = ("@alice:local.test", "PHONE")  # the peeking device
BOB = "@bob:other.test"  # joined
DAVE = "@dave:other.test"  # joined
CAROL = "@carol:other.test"  # no membership
IVAN = "@ivan:other.test"  # invited, not joined
ZED = "@zed:third.test"  # a user of a server that is not the target
ADMIN = "@admin:remote.test"  # the target's own user, not joined


def typing(user_id: str, is_typing: bool = True, room_id: str = ROOM) -> dict[str, Any]:
    return {
        "edu_type": "m.typing",
        "content": {"room_id": room_id, "user_id": user_id, "typing": is_typing},
    }


def receipt(*user_ids: str, event_id: str = "$m1") -> dict[str, Any]:
    receipts = {u: {"event_ids": [event_id], "data": {"ts": 7}} for u in user_ids}
    return {"edu_type": "m.receipt", "content": {ROOM: {"m.read": receipts}}}


def member(user_id: str, membership: str) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": user_id,
        "sender": user_id,
        "content": {"membership": membership},
        "origin_server_ts": 1_000,
        "room_id": ROOM,
    }


class World:
    def __init__(self, store: Storage, service: Services) -> None:
        self.store, self.service = store, service
        self.token: str | None = None
        self.txn = 0

    async def send(self, origin: str, *edus: dict[str, Any]) -> None:
        self.txn += 1
        answer = await self.service.ingest.receive(
            origin, f"t{self.txn}", {"pdus": [], "edus": list(edus)}
        )
        assert answer == {"pdus": {}}

    async def sync(self, timeout_ms: int = 0) -> dict[str, Any] | None:
        """The ephemeral events of ROOM in Alice's next sync, by type (None: no news)."""
        answer = await self.service.syncing.sync(*ALICE, since=self.token, timeout_ms=timeout_ms)
        self.token = answer["next_batch"]
        room = answer["rooms"]["peek"].get(ROOM)
        if room is None:
            return None
        return {e["type"]: e["content"] for e in room["ephemeral"]["events"]}


@pytest.fixture
async def running(open_store: OpenStore) -> AsyncIterator[tuple[trio.Nursery, Storage]]:
    """A nursery for the services and a store on either engine, closed after them."""
    store = await open_store()
    try:
        async with trio.open_nursery() as nursery:
            yield nursery, store
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def start(
    nursery: trio.Nursery, store: Storage, clock_ms: Callable[[], int] = lambda: 5_000
) -> World:
    for event_id, (user, membership) in enumerate(
        [(BOB, "join"), (DAVE, "join"), (IVAN, "invite")]
    ):
        await store.write(
            lambda tx: tx.append_event(
                room_id=ROOM,
                event_id=f"$member{event_id}",  # noqa: B023
                pdu=member(user, membership),  # noqa: B023
                redacted=False,
                now_ms=0,
            )
        )
    await store.write(
        lambda tx: tx.set_device_peek(
            user_id=ALICE[0],
            device_id=ALICE[1],
            room_id=ROOM,
            state="active",
            now_ms=0,
        )
    )
    service = build_services(
        store=store,
        client=offline_client(),  # no subscription task runs here: it sends nothing
        keyring=None,  # type: ignore[arg-type]
        settings=PeekSettings(
            linger_ms=0, renewal_max_ms=1_800_000, live=LiveSettings(max_remote_peeks=10)
        ),
        clock_ms=clock_ms,
    )
    await nursery.start(service.run)
    # The room is peeked through TARGET (set directly: no subscription task is started).
    service.subscriptions.by_room[ROOM] = Subscription(
        room_id=ROOM,
        state=SubState.ACTIVE,
        candidates=(TARGET,),
        server=TARGET,
        peek_id="p1",
        room_version="10",
    )
    world = World(store, service)
    await world.sync()
    return world


async def test_which_edus_are_kept(running: tuple[trio.Nursery, Storage]) -> None:
    world = await start(*running)
    # The target relays other servers' users: kept for members only.
    await world.send(TARGET, typing(BOB), typing(CAROL), typing(IVAN), receipt(BOB, DAVE, CAROL))
    assert await world.sync() == {
        "m.typing": {"user_ids": [BOB]},
        "m.receipt": {"$m1": {"m.read": {BOB: {"ts": 7}, DAVE: {"ts": 7}}}},
    }
    # A server that is not the target speaks only for its own users (members or not).
    await world.send("third.test", typing(BOB, False), typing(ZED), receipt(DAVE, event_id="$x"))
    assert await world.sync() == {"m.typing": {"user_ids": [BOB, ZED]}}
    # The target's own users need no membership.
    await world.send(TARGET, typing(ADMIN))
    assert await world.sync() == {"m.typing": {"user_ids": [ADMIN, BOB, ZED]}}
    # Nothing of this is kept: other rooms, malformed EDUs, other EDU types.
    await world.send(
        TARGET,
        typing(BOB, False, room_id="!elsewhere:remote.test"),
        {"edu_type": "m.typing", "content": {"room_id": ROOM, "user_id": DAVE, "typing": "yes"}},
        {"edu_type": "m.typing", "content": {"room_id": ROOM, "user_id": "dave", "typing": True}},
        {"edu_type": "m.receipt", "content": {ROOM: {"m.read": {DAVE: "junk"}}}},
        {"edu_type": "m.receipt", "content": {ROOM: ["junk"]}},
        {"edu_type": "m.presence", "content": {"push": []}},
        {"edu_type": "m.typing"},
        "junk",  # type: ignore[arg-type]
    )
    assert await world.sync() is None
    # Membership as it stands when the EDU is stored: Dave leaves, then types.
    await world.store.write(
        lambda tx: tx.append_event(
            room_id=ROOM,
            event_id="$dave-leaves",
            pdu=member(DAVE, "leave"),
            redacted=False,
            now_ms=0,
        )
    )
    events = await world.sync()
    assert events == {}  # the leave is news; no EDU
    await world.send(TARGET, typing(DAVE))
    assert await world.sync() is None


async def test_typing_times_out(
    nursery: trio.Nursery, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A remote user stops typing ``TYPING_TIMEOUT_MS`` after their last ``typing: true``
    (each one restarts it) unless ``typing: false`` comes first; syncs then list them no
    more. Also a sync waiting for news is woken by the timeout."""
    assert TYPING_TIMEOUT_MS == 60_000
    # SQLite only: the mock clock and wait_all_tasks_blocked need the store's calls to end
    # within trio (the PostgreSQL engine has a listener thread and pool timeouts of its own).
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    world = await start(nursery, store, clock_ms=lambda: int(trio.current_time() * 1000))
    t0 = trio.current_time()
    await world.send(TARGET, typing(BOB), typing(DAVE))
    assert await world.sync() == {"m.typing": {"user_ids": [BOB, DAVE]}}
    mock_clock.jump(40)
    await world.send(TARGET, typing(BOB))  # still typing: Bob's timeout restarts
    assert await world.sync() == {"m.typing": {"user_ids": [BOB, DAVE]}}
    mock_clock.jump(19.9)
    await trio.testing.wait_all_tasks_blocked()
    assert await world.sync() is None
    mock_clock.jump(0.2)  # t0 + 60.1 s: Dave's timeout ran out, Bob's did not
    assert await world.sync(timeout_ms=1_000_000) == {"m.typing": {"user_ids": [BOB]}}
    assert trio.current_time() - t0 == pytest.approx(60.1)
    mock_clock.jump(39.8)
    await trio.testing.wait_all_tasks_blocked()
    assert await world.sync() is None
    mock_clock.jump(0.2)  # t0 + 100.1 s
    assert await world.sync(timeout_ms=1_000_000) == {"m.typing": {"user_ids": []}}
    # typing: false ends it at once; the pending timeout then changes nothing.
    await world.send(TARGET, typing(BOB))
    await world.send(TARGET, typing(BOB, False))
    assert await world.sync() == {"m.typing": {"user_ids": []}}
    mock_clock.jump(61)
    await trio.testing.wait_all_tasks_blocked()
    assert await world.store.read(lambda tx: tx.typing_now()) == []
    assert await world.sync() is None


async def test_typing_does_not_survive_a_restart(
    running: tuple[trio.Nursery, Storage],
) -> None:
    nursery, store = running
    world = await start(nursery, store)
    await world.send(TARGET, typing(BOB), receipt(BOB))
    assert await world.sync() is not None
    assert [u for _, u, _ in await world.store.read(lambda tx: tx.typing_now())] == [BOB]
    # A new service on the same database (its timers are gone with the old one).
    restarted = build_services(
        store=world.store,
        client=offline_client(),
        keyring=None,  # type: ignore[arg-type]
        settings=world.service.settings,
        clock_ms=lambda: 5_000,
    )
    await nursery.start(restarted.run)
    assert await world.store.read(lambda tx: tx.typing_now()) == []
    world.service = restarted
    assert await world.sync() == {"m.typing": {"user_ids": []}}


def test_migration_splits_old_rows_per_user(tmp_path: Path) -> None:
    """A database of schema version 4 (one ephemeral row per room and EDU type) moves to one
    row per user (and receipt type), keeping each row's stream position."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrations = available_migrations()
    apply_migrations(conn, migrations[:4])
    rows = [
        ("m.typing", {"room_id": ROOM, "user_id": BOB, "typing": True}, 3),
        (
            "m.receipt",
            {
                "m.read": {
                    BOB: {"event_ids": ["$a"], "data": {"ts": 1}},
                    DAVE: {"event_ids": ["$b"]},
                },
                "m.read.private": {DAVE: {"event_ids": ["$c"], "data": {}}},
            },
            4,
        ),
    ]
    for edu_type, content, pos in rows:
        conn.execute(
            "INSERT INTO ephemeral (room_id, edu_type, content_json, stream_pos) VALUES (?,?,?,?)",
            (ROOM, edu_type, json.dumps(content), pos),
        )
    apply_migrations(conn, migrations)
    found = conn.execute(
        "SELECT edu_type, user_id, receipt_type, content_json, typing, stream_pos FROM ephemeral "
        "ORDER BY edu_type, user_id, receipt_type"
    ).fetchall()
    conn.close()
    assert [(t, u, r, json.loads(c), ty, p) for t, u, r, c, ty, p in found] == [
        (
            "m.receipt",
            BOB,
            "m.read",
            {"m.read": {BOB: {"event_ids": ["$a"], "data": {"ts": 1}}}},
            0,
            4,
        ),
        ("m.receipt", DAVE, "m.read", {"m.read": {DAVE: {"event_ids": ["$b"]}}}, 0, 4),
        (
            "m.receipt",
            DAVE,
            "m.read.private",
            {"m.read.private": {DAVE: {"event_ids": ["$c"], "data": {}}}},
            0,
            4,
        ),
        ("m.typing", BOB, "", {"room_id": ROOM, "user_id": BOB, "typing": True}, 1, 3),
    ]
