"""The sync service's use of the live window, in-process over a real store: what it loads
and shares stays equal to what the store would answer (regressions from a review)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from peekproxy.core.sync import build_sync, decode_token
from peekproxy.services.assembly import PeekSettings, Services, build_services
from peekproxy.services.settings import LiveSettings
from peekproxy.store import Storage
from peekproxy.store.sqlite import SqliteTransaction, open_sqlite
from tests.test_live_window import set_peek, snapshot_of

ROOM = "!room:remote.test"
OTHER = "!other:remote.test"
ALICE = ("@alice:local.test", "PHONE")


def _pdu(n: int, room_id: str) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "sender": "@carol:remote.test",
        "content": {"msgtype": "m.text", "body": f"message {n}"},
        "origin_server_ts": 1_000 + n,
        "room_id": room_id,
    }


async def _service(tmp_path: Path) -> tuple[Storage, Services]:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    service = build_services(
        store=store,
        client=None,  # type: ignore[arg-type]  # not used by sync
        keyring=None,  # type: ignore[arg-type]
        settings=PeekSettings(
            linger_ms=0, renewal_max_ms=1_800_000, live=LiveSettings(max_remote_peeks=10)
        ),
        clock_ms=lambda: 5_000,
    )
    # What Services.run does first.
    store.set_commit_hook(service.syncing._read_changes, service.syncing._apply_changes)
    await store.write(lambda tx: None)
    return store, service


async def _set_peek(store: Storage, room_id: str, state: str) -> int:
    return await store.write(
        lambda tx: tx.set_device_peek(
            user_id=ALICE[0],
            device_id=ALICE[1],
            room_id=room_id,
            state=state,
            now_ms=0,
        )
    )


async def _event(store: Storage, n: int, room_id: str) -> None:
    await store.write(
        lambda tx: tx.append_event(
            room_id=room_id,
            event_id=f"$e{n}",
            pdu=_pdu(n, room_id),
            redacted=False,
            now_ms=0,
        )
    )


async def _store_answer(
    store: Storage, since: int, device: tuple[str, str] = ALICE
) -> dict[str, Any]:
    snap = await snapshot_of(store, device, since, 10)
    return build_sync(
        since=since,
        upto=snap.upto,
        peeks=snap.peeks,
        rooms=snap.views,
        timeline_limit=10,
        now_ms=5_000,
    )


@pytest.mark.parametrize("racing", ["new-peek", "unpeek"])
async def test_a_peek_change_during_a_store_read_does_not_stick_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, racing: str
) -> None:
    """A write of this device's peek that commits (and reaches the window) between the
    snapshot's queries must not leave the window with the peeks from before it: the snapshot
    is one read transaction, so its ``upto`` and its peeks belong to the same commit."""
    store, service = await _service(tmp_path)
    await _set_peek(store, ROOM, "active")
    await _event(store, 1, ROOM)

    # An earlier sync: the service now watches ROOM for Alice.
    await service.syncing.sync(*ALICE, since=None, timeout_ms=0)

    real_device_peeks = SqliteTransaction.device_peeks
    raced = False

    def device_peeks_then_a_write(tx: SqliteTransaction, user_id: str, device_id: str) -> Any:
        nonlocal raced
        peeks = real_device_peeks(tx, user_id, device_id)
        if not raced:
            raced = True
            # Another task's write commits (and its hook is applied) right now.
            if racing == "new-peek":
                trio.from_thread.run(_set_peek, store, OTHER, "active")
            else:
                trio.from_thread.run(_set_peek, store, ROOM, "ended")
        return peeks

    monkeypatch.setattr(SqliteTransaction, "device_peeks", device_peeks_then_a_write)
    initial = await service.syncing.sync(*ALICE, since=None, timeout_ms=0)  # store path
    monkeypatch.setattr(SqliteTransaction, "device_peeks", real_device_peeks)
    since = decode_token(initial["next_batch"])

    # New events after the token, in both rooms.
    await _event(store, 2, ROOM)
    await _event(store, 3, OTHER)

    answer = await service.syncing.sync(*ALICE, since=initial["next_batch"], timeout_ms=0)
    stored = await _store_answer(store, since)
    assert answer == stored  # fails: memory shows the old peek set


async def test_a_shared_response_is_not_reused_with_a_stale_age(tmp_path: Path) -> None:
    """_built_answer's cache has no notion of time: with no new stream row, a sync minutes
    later (same news) gets the first build, with its ``unsigned.age``."""
    store, service = await _service(tmp_path)
    now = [5_000]
    service.syncing.clock_ms = lambda: now[0]
    await _set_peek(store, ROOM, "active")
    first = await service.syncing.sync(*ALICE, since=None, timeout_ms=0)
    await _event(store, 1, ROOM)
    live = await service.syncing.sync(*ALICE, since=first["next_batch"], timeout_ms=0)
    assert live["rooms"]["peek"][ROOM]["timeline"]["events"][0]["unsigned"]["age"] == 4_000 - 1
    now[0] += 600_000  # ten minutes later, the client retries the same token
    again = await service.syncing.sync(*ALICE, since=first["next_batch"], timeout_ms=0)
    age = again["rooms"]["peek"][ROOM]["timeline"]["events"][0]["unsigned"]["age"]
    assert age == 604_000 - 1  # fails: still 3999


async def _typing(store: Storage, room_id: str, user_id: str, typing: bool) -> None:
    content = {"room_id": room_id, "user_id": user_id, "typing": typing}
    await store.write(
        lambda tx: tx.save_ephemeral(
            room_id=room_id, edu_type="m.typing", content=content, now_ms=0
        )
    )


async def test_several_users_typing_from_memory_equal_the_store(tmp_path: Path) -> None:
    """Typing per user (issue 10 item 8): memory lists everyone typing, including users who
    started before ``since``, exactly as the store does."""
    store, service = await _service(tmp_path)
    await _set_peek(store, ROOM, "active")
    first = await service.syncing.sync(*ALICE, since=None, timeout_ms=0)
    await _typing(store, ROOM, "@bob:other.test", True)
    await _typing(store, ROOM, "@dave:other.test", True)
    tokens = [first["next_batch"]]
    for user, typing in [("@erin:third.test", True), ("@bob:other.test", False)]:
        answer = await service.syncing.sync(*ALICE, since=tokens[-1], timeout_ms=0)
        tokens.append(answer["next_batch"])
        await _typing(store, ROOM, user, typing)
    await _event(store, 9, ROOM)
    shown = []
    for token in tokens:
        before = service.syncing.live.answer(
            ALICE, decode_token(token), timeline_limit=10, room_version_of=lambda r: "10"
        )
        assert before is not None  # answered from memory
        answer = await service.syncing.sync(*ALICE, since=token, timeout_ms=0)
        assert answer == await _store_answer(store, decode_token(token))
        events = answer["rooms"]["peek"][ROOM]["ephemeral"]["events"]
        shown.append([e["content"]["user_ids"] for e in events if e["type"] == "m.typing"])
    assert shown == [
        [["@dave:other.test", "@erin:third.test"]],
        [["@dave:other.test", "@erin:third.test"]],
        [["@dave:other.test", "@erin:third.test"]],
    ]


async def test_devices_woken_into_a_limited_timeline_share_one_store_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17: more new events than the timeline limit (a 50-PDU /send) make every woken
    device's timeline limited, which needs the room's current state: one device reads the
    store, the others wait for it and are answered from memory with its view, each equal to
    what the store answers that device."""
    store, service = await _service(tmp_path)
    devices = [("@alice:local.test", f"D{n}") for n in range(5)]
    for device in devices:
        await set_peek(store, device, ROOM, "active")
    await _event(store, 0, ROOM)
    tokens = {}
    for device in devices:
        tokens[device] = (await service.syncing.sync(*device, since=None, timeout_ms=0))[
            "next_batch"
        ]
    reads = [0]
    real_snapshot = SqliteTransaction.sync_snapshot

    def counted(tx: SqliteTransaction, **kwargs: Any) -> Any:
        reads[0] += 1
        return real_snapshot(tx, **kwargs)

    monkeypatch.setattr(SqliteTransaction, "sync_snapshot", counted)
    answers: dict[tuple[str, str], dict[str, Any]] = {}

    async def long_poll(device: tuple[str, str]) -> None:
        answers[device] = await service.syncing.sync(
            *device, since=tokens[device], timeout_ms=30_000
        )

    async with trio.open_nursery() as nursery:
        for device in devices:
            nursery.start_soon(long_poll, device)
        await trio.testing.wait_all_tasks_blocked()

        def twenty(tx: Any) -> None:
            for n in range(1, 21):
                tx.append_event(
                    room_id=ROOM, event_id=f"$e{n}", pdu=_pdu(n, ROOM), redacted=False, now_ms=0
                )

        await store.write(twenty)
    assert reads[0] == 1  # one store read for the five woken devices
    for device in devices:
        room = answers[device]["rooms"]["peek"][ROOM]
        assert room["timeline"]["limited"] is True and len(room["timeline"]["events"]) == 10
        monkeypatch.setattr(SqliteTransaction, "sync_snapshot", real_snapshot)
        assert answers[device] == await _store_answer(store, decode_token(tokens[device]), device)
