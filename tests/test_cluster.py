"""Several instances on one database (issue 16 part B, docs/cluster.md), in-process: two
service stacks over ONE store, each with its own instance name, a fake remote server shared
by both (it records which instance asked what). Real time, short leases (600 ms): each wait
polls with a deadline."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio
from prometheus_client import REGISTRY

from peekproxy.core.cluster import instance_of
from peekproxy.core.subscription import SubState
from peekproxy.services.assembly import Services, build_services
from peekproxy.services.following import Followed, RenewalFailed, Renewed
from peekproxy.services.gauges import ScrapeGauges
from peekproxy.services.settings import ClusterSettings
from peekproxy.store import Storage, StoreUnavailable
from peekproxy.store.sqlite import SqliteTransaction, open_sqlite
from tests.offline import OFFLINE_SETTINGS, offline_client
from tests.test_following import Snapshot, _topic

ROOM = "!r:remote.test"
ALICE = ("@alice:local.test", "PHONE")
BOB = ("@bob:local.test", "LAPTOP")
CAROL = ("@carol:local.test", "TABLET")
LEASE_MS = 600


def _now_ms() -> int:
    return int(trio.current_time() * 1000)


@dataclass
class Remote:
    """The remote server: the peeks it holds, and every request of each instance."""

    peeks: set[str] = field(default_factory=set)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def of(self, instance: str, kind: str) -> list[str]:
        return [peek for who, what, peek in self.calls if (who, what) == (instance, kind)]


@dataclass
class Follower:
    """One instance's way to the :class:`Remote` (a RoomFollower)."""

    remote: Remote
    instance: str

    async def follow(self, room_id: str, candidates: Sequence[str]) -> Followed:
        n = next(self.remote.ids)
        peek_id = f"peek-{n}"
        self.remote.peeks.add(peek_id)
        self.remote.calls.append((self.instance, "follow", peek_id))
        # The room moved on since the last peek: a newer latest event each time.
        latest = f"$topic{n}"
        pdu = {**_topic(latest, f"topic {n}"), "depth": n}
        snapshot = Snapshot(
            "10", {latest: pdu}, frozenset(), {("m.room.topic", ""): latest}, latest
        )
        return Followed(
            server=candidates[0],
            handle=peek_id,
            interval_ms=3_600_000,
            at_ms=_now_ms(),
            snapshot=snapshot,
            history=([], True),
        )

    async def renew(self, room_id: str, server: str, handle: str) -> Renewed | RenewalFailed:
        self.remote.calls.append((self.instance, "renew", handle))
        if handle in self.remote.peeks:
            return Renewed(at_ms=_now_ms())
        return RenewalFailed(refused=True, at_ms=_now_ms(), error="404 unknown peek")

    async def stop(self, room_id: str, server: str, handle: str) -> bool:
        self.remote.calls.append((self.instance, "stop", handle))
        self.remote.peeks.discard(handle)
        return True


def _stack(
    store: Storage,
    remote: Remote,
    name: str,
    idle_timeout_ms: int = 60_000,
    lease_ms: int = LEASE_MS,
) -> Services:
    settings = replace(
        OFFLINE_SETTINGS,
        idle_timeout_ms=idle_timeout_ms,
        cluster=ClusterSettings(instance_name=name, lease_ms=lease_ms),
    )
    return build_services(
        store=store,
        client=offline_client(),
        keyring=None,  # type: ignore[arg-type]  # the fake follower checks nothing
        settings=settings,
        clock_ms=_now_ms,
        follower=Follower(remote, name),
    )


@asynccontextmanager
async def running(services: Services) -> AsyncIterator[trio.CancelScope]:
    """``services`` running until the block ends or the yielded scope is cancelled (an
    instance that stops dead: nothing released)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(services.run)
        yield nursery.cancel_scope
        nursery.cancel_scope.cancel()
    await services.client.aclose()


async def until(check: Callable[[], Any], timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not await check():  # noqa: ASYNC110 -- the store and a remote log: no event
            await trio.sleep(0.02)


async def _gaps(store: Storage) -> int:
    def read(tx: SqliteTransaction) -> int:
        row = tx.connection.execute(
            "SELECT COUNT(*) FROM room_stream WHERE room_id = ? AND kind = 'gap'", (ROOM,)
        ).fetchone()
        return int(row[0])

    result: int = await store.read(read)  # type: ignore[arg-type]
    return result


async def _owner(store: Storage) -> str | None:
    lease = (await store.read(lambda tx: tx.leases())).get(ROOM)
    return None if lease is None else instance_of(lease.owner)


async def _state(store: Storage, device: tuple[str, str]) -> str | None:
    return await store.read(lambda tx: tx.device_peek_state(*device, ROOM))


async def test_devices_on_two_instances_share_one_remote_peek(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    remote = Remote()
    a, b = _stack(store, remote, "A"), _stack(store, remote, "B")
    async with running(a), running(b):
        await a.syncing.peek(*ALICE, ROOM, ["remote.test"])
        await b.syncing.peek(*BOB, ROOM, ["remote.test"])
        assert [(who, what) for who, what, _ in remote.calls] == [("A", "follow")]
        assert a.subscriptions.owns(ROOM) and not b.subscriptions.owns(ROOM)
        assert await _owner(store) == "A"
        answer = await b.syncing.sync(*BOB, since=None, timeout_ms=0)
        assert ROOM in answer["rooms"]["peek"]
        # Several renewals of the lease later, still one peek, still A's.
        await trio.sleep(3 * LEASE_MS / 1000)
        assert remote.of("B", "follow") == [] and remote.of("B", "renew") == []
        assert await _owner(store) == "A"
        # The last device goes (on B, which does not follow the room): A stops the peek.
        await a.syncing.unpeek(*ALICE, ROOM)
        assert remote.of("A", "stop") == []  # bob on B still peeks it
        await b.syncing.unpeek(*BOB, ROOM)

        async def stopped() -> bool:
            return remote.of("A", "stop") == ["peek-1"] and await _owner(store) is None

        await until(stopped)
    await store.aclose()


async def test_metrics_and_status_name_each_room_s_follower(
    tmp_path: Path,
) -> None:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    remote = Remote()
    a, b = _stack(store, remote, "A"), _stack(store, remote, "B")

    def followed(services: Services) -> float:
        ScrapeGauges(subscriptions=services.subscriptions, store=store).refresh()
        return sum(
            REGISTRY.get_sample_value("peekproxy_subscriptions", {"state": state, "transport": t})
            or 0.0
            for state in ("active", "starting")
            for t in ("msc2444", "none")
        )

    async with running(a), running(b):
        await a.syncing.peek(*ALICE, ROOM, ["remote.test"])
        await b.syncing.peek(*BOB, ROOM, ["remote.test"])
        assert b.subscriptions.get(ROOM) is not None  # B views the room A follows ...
        assert (followed(a), followed(b)) == (1.0, 0.0)  # ... and counts it not
        # Both instances' status names the follower: A's lease (name and suffix).
        for services in (a, b):
            (entry,) = (await services.status.report(ROOM))["subscriptions"]
            assert instance_of(entry["follower"]) == "A"
            assert entry["follower"] == a.subscriptions.leases.me  # type: ignore[union-attr]
    await store.aclose()


async def _take_over(tmp_path: Path, *, remote_expires: bool) -> tuple[Remote, Storage, float]:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    remote = Remote()
    a, b = _stack(store, remote, "A"), _stack(store, remote, "B")
    async with running(b):
        async with running(a) as a_scope:
            await a.syncing.peek(*ALICE, ROOM, ["remote.test"])
            await b.syncing.peek(*BOB, ROOM, ["remote.test"])
            assert await _gaps(store) == 0
            if remote_expires:
                remote.peeks.clear()
            a_scope.cancel()  # A dies: its lease is not released
        died = trio.current_time()

        async def taken() -> bool:
            return bool(remote.of("B", "renew")) and await _owner(store) == "B"

        await until(taken)
        took_s = trio.current_time() - died
        if remote_expires:

            async def repeeked() -> bool:
                sub = b.subscriptions.get(ROOM)
                return sub is not None and sub.state is SubState.ACTIVE and sub.peek_id != "peek-1"

            await until(repeeked)
    return remote, store, took_s


async def test_owner_dies_and_another_instance_renews_the_same_peek(tmp_path: Path) -> None:
    remote, store, took_s = await _take_over(tmp_path, remote_expires=False)
    assert remote.of("B", "renew")[0] == "peek-1"
    assert remote.of("B", "follow") == []  # the same peek: nothing missed, no gap
    assert await _gaps(store) == 0
    assert took_s < (LEASE_MS + LEASE_MS / 3) / 1000 + 0.5
    sub = (await store.read(lambda tx: tx.load_subscriptions(ROOM)))[0]
    assert sub.peek_id == "peek-1" and sub.state is SubState.ACTIVE
    await store.aclose()


async def test_owner_dies_and_the_remote_expired_the_peek_a_gap_is_marked(
    tmp_path: Path,
) -> None:
    remote, store, _ = await _take_over(tmp_path, remote_expires=True)
    assert remote.of("B", "renew")[0] == "peek-1"  # tried first: refused (404)
    assert remote.of("B", "follow") == ["peek-2"]
    assert await _gaps(store) == 1  # events could have been lost meanwhile
    await store.aclose()


async def test_a_clean_stop_hands_the_rooms_over_without_waiting_for_the_lease(
    tmp_path: Path,
) -> None:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    remote = Remote()
    lease_ms = 3_000
    a, b = (_stack(store, remote, name, lease_ms=lease_ms) for name in ("A", "B"))
    async with running(b):
        async with running(a) as a_scope:
            await a.syncing.peek(*ALICE, ROOM, ["remote.test"])
            await b.syncing.peek(*BOB, ROOM, ["remote.test"])
            assert await a.subscriptions.leases.release_all() == 1  # type: ignore[union-attr]
            a_scope.cancel()
        stopped = trio.current_time()

        async def taken() -> bool:
            return bool(remote.of("B", "renew")) and await _owner(store) == "B"

        await until(taken)
        # At B's next look (a third of the lease), not once A's lease would have run out.
        assert trio.current_time() - stopped < lease_ms / 1000 / 3 + 0.5
        assert remote.of("B", "renew")[0] == "peek-1" and remote.of("B", "follow") == []
    await store.aclose()


async def test_the_reaper_spares_devices_syncing_on_another_instance(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    remote = Remote()
    idle_ms = 1_200
    a, b = (_stack(store, remote, name, idle_timeout_ms=idle_ms) for name in "AB")
    async with running(a), running(b):
        await a.syncing.peek(*ALICE, ROOM, ["remote.test"])  # alice peeks on A ...
        await a.syncing.peek(*CAROL, ROOM, ["remote.test"])
        started = trio.current_time()
        while trio.current_time() - started < 2.5 * idle_ms / 1000:
            await b.syncing.sync(*ALICE, since=None, timeout_ms=0)  # ... then syncs on B
            await trio.sleep(0.1)
        assert await _state(store, ALICE) == "active"
        assert await _state(store, CAROL) == "dormant"  # never synced: idle
        # The reaper of each instance reads the store; the in-memory heap is not kept.
        assert a.syncing._idle_heap == [] and b.syncing._idle_heap == []

        async def alice_dormant() -> bool:
            return await _state(store, ALICE) == "dormant"

        await until(alice_dormant, timeout_s=2 * idle_ms / 1000)  # she stopped syncing
    await store.aclose()


async def test_an_owner_that_cannot_renew_its_leases_stops_acting_on_its_rooms(
    tmp_path: Path,
) -> None:
    """Fencing: A's renewals fail (its store writes refused); once its lease runs out it no
    longer renews the remote peek, and B, having taken the room over, does."""
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    remote = Remote()
    a, b = _stack(store, remote, "A"), _stack(store, remote, "B")
    async with running(a), running(b):
        await a.syncing.peek(*ALICE, ROOM, ["remote.test"])
        assert a.subscriptions.leases is not None

        async def refused() -> list[str]:
            raise StoreUnavailable("the database is gone (for A)")

        a.subscriptions.leases.renew = refused  # type: ignore[method-assign]

        async def taken() -> bool:
            return not a.subscriptions.owns(ROOM) and await _owner(store) == "B"

        await until(taken)
        renewals_by_a = len(remote.of("A", "renew"))

        async def b_renewed() -> bool:
            return remote.of("B", "renew") == ["peek-1"]

        await until(b_renewed)
        a.subscriptions.poke(ROOM)  # A's task looks again: not its room any more
        await trio.sleep(3 * LEASE_MS / 1000)
        assert len(remote.of("A", "renew")) == renewals_by_a
    await store.aclose()
