"""``/send`` on any instance of a cluster (issue 16 part B, docs/cluster.md), in-process: two
service stacks over ONE store, the room followed by instance A (its lease), the remote's
signed events (a testbed room; its key stored, as the keyring persists keys) sent to B or
to both at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio
from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key

from peekproxy.core.subscription import Subscription, SubState
from peekproxy.federation.keyring import Keyring
from peekproxy.federation.signing_key import key_id
from peekproxy.services.assembly import Services, build_services
from peekproxy.store import Storage
from peekproxy.store.sqlite import SqliteTransaction, open_sqlite
from peekproxy.testbed.rooms import TestbedRoom
from tests.offline import offline_client
from tests.test_cluster import ALICE, LEASE_MS, Remote, _stack, running, until

REMOTE = "remote.test"


async def _world(tmp_path: Path) -> tuple[Storage, Remote, Services, Services, TestbedRoom, Any]:
    """The store, the remote's log, stacks A and B, and the room (followed by A)."""
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    key = generate_signing_key("k1")
    now = int(time.time() * 1000)
    verify = encode_verify_key_base64(get_verify_key(key))
    await store.write(
        lambda tx: tx.save_server_keys([(REMOTE, key_id(key), verify, now + 86_400_000, None, now)])
    )
    room = TestbedRoom.create(
        server_name=REMOTE,
        signing_key=key,
        room_version="10",
        creator=f"@admin:{REMOTE}",
        now_ms=now,
    )
    remote = Remote()
    stacks = []
    for name in "AB":
        stack = _stack(store, remote, name)
        client = offline_client()
        keyring = Keyring(client, store, [])
        await keyring.load()
        stack = build_services(
            store=store,
            client=client,
            keyring=keyring,
            settings=stack.settings,
            clock_ms=stack.clock_ms,
            follower=stack.follower,
        )
        stacks.append(stack)
    a, b = stacks
    return store, remote, a, b, room, key


async def _follow_on_a(a: Services, store: Storage, room_id: str) -> None:
    """A follows the room (its lease, its subscription stored), as after its peek."""
    assert a.subscriptions.leases is not None
    assert await a.subscriptions.leases.take(room_id)
    now = a.clock_ms()
    sub = Subscription(
        room_id,
        SubState.ACTIVE,
        (REMOTE,),
        "10",
        REMOTE,
        "peek0001",
        remote_interval_ms=3_600_000,
        last_renewed_ms=now,
        renew_at_ms=now + 1_800_000,
    )
    await store.write(lambda tx: tx.save_subscription(sub))
    await store.write(lambda tx: tx.set_device_peek(*ALICE, room_id, "active", now))
    a.subscriptions.by_room[room_id] = sub


async def _stream(store: Storage, room_id: str) -> list[str]:
    def read(tx: SqliteTransaction) -> list[str]:
        return [
            str(event_id) if kind == "event" else str(kind)
            for kind, event_id in tx.connection.execute(
                "SELECT kind, event_id FROM room_stream WHERE room_id = ? "
                "AND kind IN ('event', 'gap') ORDER BY stream_pos",
                (room_id,),
            )
        ]

    result: list[str] = await store.read(read)  # type: ignore[arg-type]
    return result


async def test_send_to_an_instance_that_does_not_follow_the_room(tmp_path: Path) -> None:
    store, _, a, b, room, _ = await _world(tmp_path)
    async with running(a), running(b):
        await _follow_on_a(a, store, room.room_id)
        assert b.subscriptions.get(room.room_id) is None  # B has not looked yet
        answer = await b.ingest.receive(REMOTE, "t1", {"pdus": room.events})
        assert all(result == {} for result in answer["pdus"].values()), answer
        assert await _stream(store, room.room_id) == room.event_ids
    await store.aclose()


async def test_concurrent_sends_to_two_instances_store_each_event_once_in_order(
    tmp_path: Path,
) -> None:
    store, _, a, b, room, key = await _world(tmp_path)
    async with running(a), running(b):
        await _follow_on_a(a, store, room.room_id)
        await a.ingest.receive(REMOTE, "t1", {"pdus": room.events})
        pdus = [
            room.send(
                key,
                sender=f"@admin:{REMOTE}",
                type="m.room.message",
                content={"msgtype": "m.text", "body": str(n)},
                now_ms=int(time.time() * 1000),
            )[1]
            for n in range(30)
        ]
        answers: dict[str, Any] = {}

        async def send(services: Services, name: str, txn_id: str) -> None:
            # Each instance gets the events in its own order (split transactions).
            for start in range(0, len(pdus), 10):
                chunk = pdus[start : start + 10]
                answers[f"{name}{start}"] = await services.ingest.receive(
                    REMOTE, f"{txn_id}-{start}", {"pdus": chunk}
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, a, "A", "ta")
            nursery.start_soon(send, b, "B", "tb")
        for answer in answers.values():
            assert all(result == {} for result in answer["pdus"].values()), answer
        stream = await _stream(store, room.room_id)
        assert stream == room.event_ids, stream  # every event once, in DAG order, no gap
    await store.aclose()


async def test_a_non_owner_that_sees_the_room_stop_being_peekable_tells_the_owner(
    tmp_path: Path,
) -> None:
    store, remote, a, b, room, key = await _world(tmp_path)
    async with running(a), running(b):
        await _follow_on_a(a, store, room.room_id)
        await a.ingest.receive(REMOTE, "t1", {"pdus": room.events})
        _, pdu = room.send(
            key,
            sender=f"@admin:{REMOTE}",
            type="m.room.history_visibility",
            state_key="",
            content={"history_visibility": "joined"},
            now_ms=int(time.time() * 1000),
        )
        await b.ingest.receive(REMOTE, "t2", {"pdus": [pdu]})  # to B, not the owner
        assert await store.read(lambda tx: tx.device_peek_state(*ALICE, room.room_id)) == "ended"

        async def owner_ended_it() -> bool:
            sub = a.subscriptions.get(room.room_id)
            return ("A", "stop", "peek0001") in remote.calls and (
                sub is not None and sub.state is SubState.ENDED
            )

        await until(owner_ended_it, timeout_s=5 * LEASE_MS / 1000)
        assert ("B", "stop", "peek0001") not in remote.calls
    await store.aclose()
