"""The seam between remote subscriptions and how a room is followed
(:class:`peekproxy.services.following.RoomFollower`): a follower that is not the MSC2444 peek
(as an observer join will be: a handle of its own, no renewal due soon) drives device peeks,
syncs and the stop after the last unpeek, with no network."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from peekproxy.core.subscription import SubState
from peekproxy.services.assembly import Services, build_services
from peekproxy.services.errors import PeekError
from peekproxy.services.following import (
    Followed,
    FollowFailed,
    RenewalFailed,
    Renewed,
    RoomFollower,
)
from peekproxy.store.sqlite import open_sqlite
from tests.offline import OFFLINE_SETTINGS, offline_client

ROOM = "!r:remote.test"
ALICE = ("@alice:local.test", "PHONE")


@dataclass(frozen=True)
class Snapshot:
    room_version: str
    events: dict[str, dict[str, Any]]
    redacted: frozenset[str]
    state: dict[tuple[str, str], str]
    latest_event_id: str


def _topic(event_id: str, topic: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "room_id": ROOM,
        "type": "m.room.topic",
        "state_key": "",
        "sender": "@admin:remote.test",
        "depth": 1,
        "prev_events": [],
        "content": {"topic": topic},
    }


@dataclass
class Joined:
    """A follower that "joins" rooms: it records what it is asked."""

    refuse: bool = False
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    stopped: trio.Event = field(default_factory=trio.Event)

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        self.calls.append(("follow", room_id, tuple(candidates)))
        if self.refuse:
            raise FollowFailed(
                PeekError(403, "M_FORBIDDEN", f"{room_id} is not peekable"),
                rate_limited=False,
                abandoned=(),
            )
        pdu = _topic("$topic", "hello")
        snapshot = Snapshot(
            "10", {"$topic": pdu}, frozenset(), {("m.room.topic", ""): "$topic"}, "$topic"
        )
        return Followed(
            server=candidates[0],
            handle="joined",
            interval_ms=24 * 3_600_000,
            at_ms=int(trio.current_time() * 1000),
            snapshot=snapshot,
            history=([], True),
        )

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        self.calls.append(("renew", room_id, server, handle))
        return Renewed(at_ms=int(trio.current_time() * 1000))

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        self.calls.append(("stop", room_id, server, handle))
        self.stopped.set()
        return True


async def _services(tmp_path: Path, follower: RoomFollower) -> Services:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    client = offline_client()
    return build_services(
        store=store,
        client=client,
        keyring=None,  # type: ignore[arg-type]  # the follower checks what it receives
        settings=OFFLINE_SETTINGS,
        clock_ms=lambda: int(trio.current_time() * 1000),
        follower=follower,
    )


async def test_a_room_followed_by_another_follower_is_peeked_synced_and_stopped(
    tmp_path: Path,
) -> None:
    follower = Joined()
    services = await _services(tmp_path, follower)
    async with trio.open_nursery() as nursery:
        await nursery.start(services.run)
        room_id = await services.syncing.peek(*ALICE, ROOM, ["remote.test"])
        assert room_id == ROOM
        assert follower.calls == [("follow", ROOM, ("remote.test",))]
        sub = services.subscriptions.get(ROOM)
        assert sub is not None and sub.state is SubState.ACTIVE
        assert (sub.server, sub.peek_id) == ("remote.test", "joined")
        answer = await services.syncing.sync(*ALICE, since=None, timeout_ms=0)
        assert ROOM in answer["rooms"]["peek"]
        await services.syncing.unpeek(*ALICE, ROOM)
        with trio.fail_after(5):  # linger 0: the room's task stops the following
            await follower.stopped.wait()
        assert follower.calls[-1] == ("stop", ROOM, "remote.test", "joined")
        nursery.cancel_scope.cancel()
    await services.client.aclose()
    await services.store.aclose()


async def test_a_follower_that_fails_fails_the_peek(tmp_path: Path) -> None:
    follower = Joined(refuse=True)
    services = await _services(tmp_path, follower)
    async with trio.open_nursery() as nursery:
        await nursery.start(services.run)
        with pytest.raises(PeekError) as caught:
            await services.syncing.peek(*ALICE, ROOM, ["remote.test"])
        assert caught.value.status == 403
        sub = services.subscriptions.get(ROOM)
        assert sub is not None and sub.state is SubState.ENDED
        state = await services.store.read(lambda tx: tx.device_peek_state(*ALICE, ROOM))
        assert state is None
        nursery.cancel_scope.cancel()
    await services.client.aclose()
    await services.store.aclose()
