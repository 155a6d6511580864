"""Several instances on one database (docs/cluster.md): races between instances, on both
backends (tests/test_cluster.py's in-process harness; with PostgreSQL each instance has its
own connection pool). A room's first peek takes a while at the remote here, so other
instances see the lease taken and no subscription row stored yet."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from peekproxy.services.assembly import Services
from peekproxy.services.following import Followed
from peekproxy.store import Storage, StoreUnavailable
from peekproxy.store.sqlite import SqliteStorage
from tests.conftest import OpenStore
from tests.test_cluster import ALICE, BOB, CAROL, LEASE_MS, ROOM, Follower, Remote, _stack, running

#: How long the remote takes to answer the first peek of a room (seconds).
FIRST_FOLLOW_S = 0.8


@dataclass
class SlowFollower(Follower):
    """The remote answers the first peek after :data:`FIRST_FOLLOW_S`."""

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        if not self.remote.calls:
            self.remote.calls.append((self.instance, "follow-started", ""))
            await trio.sleep(FIRST_FOLLOW_S)
            self.remote.calls.remove((self.instance, "follow-started", ""))
        return await super().follow(room_id, candidates)


def _slow_stack(store: Storage, remote: Remote, name: str) -> Services:
    services = _stack(store, remote, name)
    services.subscriptions.follower = SlowFollower(remote, name)
    return services


async def _stores(open_store: OpenStore, n: int) -> list[Storage]:
    """``n`` stores on the test's database: one SQLite store shared (one process owns a
    SQLite database), or ``n`` PostgreSQL stores (a pool each, as ``n`` processes)."""
    first = await open_store(record_server_name=True)
    if isinstance(first, SqliteStorage):
        return [first] * n
    return [first, *[await open_store() for _ in range(n - 1)]]


async def _close(stores: list[Storage]) -> None:
    for store in dict.fromkeys(stores):
        await store.aclose()


async def test_concurrent_first_peeks_on_three_instances_all_succeed(
    open_store: OpenStore,
) -> None:
    """The owner took the lease and is still peeking (no row stored): the other instances
    wait for its row instead of answering 502, and the remote sees one peek."""
    stores = await _stores(open_store, 3)
    remote = Remote()
    stacks = [_slow_stack(store, remote, name) for store, name in zip(stores, "ABC", strict=True)]
    answers: dict[str, str] = {}
    async with running(stacks[0]), running(stacks[1]), running(stacks[2]):

        async def peek(services: Services, device: tuple[str, str], name: str) -> None:
            await services.syncing.peek(*device, ROOM, ["remote.test"])
            answers[name] = "ok"

        async with trio.open_nursery() as nursery:
            for services, device, name in zip(stacks, (ALICE, BOB, CAROL), "ABC", strict=True):
                nursery.start_soon(peek, services, device, name)
        assert answers == {"A": "ok", "B": "ok", "C": "ok"}
        assert [what for _, what, _ in remote.calls] == ["follow"]
        assert sum(s.subscriptions.owns(ROOM) for s in stacks) == 1
    await _close(stores)


async def test_send_on_a_non_owner_waits_for_the_owners_first_peek(
    open_store: OpenStore,
) -> None:
    """``/send`` on B while A (the lease holder) is still peeking: B reads A's row once A has
    stored it, so the room's events are accepted, not taken for an unknown room's."""
    stores = await _stores(open_store, 2)
    remote = Remote()
    a, b = _slow_stack(stores[0], remote, "A"), _slow_stack(stores[1], remote, "B")
    async with running(a), running(b), trio.open_nursery() as nursery:
        nursery.start_soon(a.syncing.peek, *ALICE, ROOM, ["remote.test"])
        with trio.fail_after(5):
            while not a.subscriptions.owns(ROOM):  # noqa: ASYNC110 -- no event to wait on
                await trio.sleep(0.01)
        started = trio.current_time()
        await b.subscriptions.refresh([ROOM])
        sub = b.subscriptions.get(ROOM)
        assert sub is not None and sub.accepts_events
        assert trio.current_time() - started < FIRST_FOLLOW_S + 1
    await _close(stores)


async def test_two_processes_with_the_same_instance_name_are_two_lease_owners(
    open_store: OpenStore,
) -> None:
    """A configuration mistake: two processes named ``pp``. Each records its own lease
    owner (``pp/<random>``): one follows the room, and a clean stop of the other releases
    nothing of the first's."""
    stores = await _stores(open_store, 2)
    remote = Remote()
    a, b = _stack(stores[0], remote, "pp"), _stack(stores[1], remote, "pp")
    assert a.subscriptions.leases is not None and b.subscriptions.leases is not None
    async with running(a), running(b):
        await a.syncing.peek(*ALICE, ROOM, ["remote.test"])
        await b.syncing.peek(*BOB, ROOM, ["remote.test"])
        assert [what for _, what, _ in remote.calls] == ["follow"]
        assert a.subscriptions.owns(ROOM) and not b.subscriptions.owns(ROOM)
        assert await b.subscriptions.leases.release_all() == 0
        lease = (await stores[0].read(lambda tx: tx.leases()))[ROOM]
        assert lease.owner == a.subscriptions.leases.me
        await trio.sleep(2 * LEASE_MS / 1000)  # B's looks: the lease is A's, live
        assert a.subscriptions.owns(ROOM) and not b.subscriptions.owns(ROOM)
        assert remote.of("pp", "follow") == ["peek-1"]
    assert a.subscriptions.leases.me.startswith("pp/") and b.subscriptions.leases.me != "pp"
    await _close(stores)


async def test_a_failed_write_of_a_devices_last_sync_is_tried_again_at_its_next_sync(
    open_store: OpenStore,
) -> None:
    """The write of the device's last sync fails (the database away a moment): the next sync
    writes it, rather than taking it for stored for a quarter of the idle timeout."""
    (store,) = await _stores(open_store, 1)
    services = _stack(store, Remote(), "A")
    write = store.write
    failed: list[bool] = []

    async def failing_once(fn: Any) -> Any:
        if not failed:
            failed.append(True)
            raise StoreUnavailable("the database is away a moment")
        return await write(fn)

    store.write = failing_once  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        await services.syncing._record_sync(ALICE)
    store.write = write  # type: ignore[method-assign]
    await services.syncing._record_sync(ALICE)
    assert await store.read(lambda tx: tx.last_sync(*ALICE)) is not None
    await services.client.aclose()
    await _close([store])
