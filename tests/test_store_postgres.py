"""PostgreSQL engine only (a real throwaway cluster; what both engines do is in
tests/test_store.py): the schema version and its guard, several
instances on one database, positions committed in order, other instances' commits fed to
the commit hook."""

from __future__ import annotations

import time
from functools import partial

import psycopg
import pytest
import trio

from peekproxy.store import (
    ReadTransaction,
    StoreUnavailable,
    StoreVersionError,
    WriteTransaction,
)
from peekproxy.store.postgres import PostgresStorage, PostgresTransaction, listener, open_postgres
from peekproxy.store.postgres.migrations import available_migrations
from tests.pg_cluster import PgCluster
from tests.test_cluster import until

ROOM = "!r:remote.test"


def _event(tx: WriteTransaction, n: int) -> int | None:
    pdu = {"type": "m.room.message", "room_id": ROOM, "depth": n, "prev_events": []}
    return tx.append_event(ROOM, f"$e{n}", pdu, redacted=False, now_ms=n)


async def test_new_database_is_at_the_latest_schema_version(pg_dsn: str) -> None:
    store = await open_postgres(pg_dsn, "a.example")
    try:
        version = await store.read(
            lambda tx: tx.raw.execute("SELECT version FROM schema_version").fetchone()
        )
        assert version == (available_migrations()[-1].version,)
    finally:
        await store.aclose()


async def test_newer_database_is_refused(pg_dsn: str) -> None:
    await (await open_postgres(pg_dsn, "a.example")).aclose()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 42")
    with pytest.raises(StoreVersionError, match=r"schema version 42.*newer peekproxy"):
        await open_postgres(pg_dsn, "a.example")


async def test_instances_starting_at_once_migrate_once(pg_dsn: str) -> None:
    stores: list[PostgresStorage] = []

    async def start() -> None:
        stores.append(await open_postgres(pg_dsn, "a.example", pool_size=2))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(start)
    for store in stores:
        await store.aclose()
    assert len(stores) == 4


async def test_unreachable_server_is_store_unavailable(pg_dsn: str) -> None:
    bad = pg_dsn.replace("dbname=", "port=1 dbname=")
    with pytest.raises(StoreUnavailable):
        await open_postgres(bad + " connect_timeout=1", "a.example")


async def test_concurrent_writers_on_two_instances_commit_positions_in_order(
    pg_dsn: str,
) -> None:
    """Two engines append (some writes rolled back) while a reader polls: every view is a
    prefix of the final stream (no position appears before a smaller one that commits)."""
    a = await open_postgres(pg_dsn, "a.example", pool_size=4)
    b = await open_postgres(pg_dsn, "a.example", pool_size=4)
    final: list[int] = []
    committed = [0]
    views: list[list[int]] = []
    done = trio.Event()

    def positions(tx: PostgresTransaction) -> list[int]:
        return [p for p, _, _ in tx.stream_events(ROOM)]

    async def writer(store: PostgresStorage, start: int) -> None:
        for n in range(start, start + 60, 2):

            def write(tx: WriteTransaction, n: int = n) -> None:
                tx.add_gap(ROOM, n)  # a stream row in any order (an event may come late)
                if n % 7 == 0:
                    raise ValueError("rolled back: its position is a hole")

            try:
                await store.write(write)
                committed[0] += 1
            except ValueError:
                pass

    async def reader() -> None:
        while not done.is_set():
            views.append(await a.read(positions))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with trio.open_nursery() as writers:
                for i in range(3):
                    writers.start_soon(writer, a, 1000 * i)
                    writers.start_soon(writer, b, 1000 * i + 1)
            done.set()
        final = await b.read(positions)
    finally:
        await a.aclose()
        await b.aclose()
    assert len(final) == committed[0] > 100
    assert len(views) > 5
    for view in views:
        assert view == final[: len(view)]


async def test_other_instances_commits_reach_the_commit_hook_once_in_order(
    pg_dsn: str,
) -> None:
    a = await open_postgres(pg_dsn, "a.example")
    b = await open_postgres(pg_dsn, "a.example")
    seen: list[int] = []
    watermark = 0
    got_all = trio.Event()

    def read(tx: ReadTransaction) -> list[int]:
        return [c.pos for c in tx.stream_changes(watermark)[0]]

    def apply(positions: list[int]) -> None:
        nonlocal watermark
        seen.extend(positions)
        if positions:
            watermark = positions[-1]
        if len(seen) == 20:
            got_all.set()

    a.set_commit_hook(read, apply)
    try:
        for n in range(1, 11):  # half written by A itself, half by B
            await a.write(partial(_event, n=2 * n))
            await b.write(partial(_event, n=2 * n + 1))
        with trio.fail_after(10):
            await got_all.wait()
        final = await b.read(lambda tx: [p for p, _, _ in tx.stream_events(ROOM)])
    finally:
        await a.aclose()
        await b.aclose()
    assert seen == final


async def test_a_stopped_server_is_store_unavailable_within_a_second(
    own_pg_cluster: PgCluster,
) -> None:
    """Once a call has met the server away, the next ones do not wait POOL_TIMEOUT (10 s)
    for a connection the pool cannot make (engine.DOWN_POOL_TIMEOUT); once the server is
    back the calls answer within about a second, although the pool, away for 8 s, is
    backing off its own reconnects (1, 2, 4, 8 s...): a call tries a connection of its own."""
    store = await open_postgres(own_pg_cluster.new_database(), "local.test", pool_size=4)
    await store.ping()
    await trio.to_thread.run_sync(own_pg_cluster.pg_ctl, "stop", "-m", "fast")
    for _ in range(3):
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert time.monotonic() - start < 1.0
    await trio.sleep(8)  # the pool's reconnect attempts back off meanwhile
    await trio.to_thread.run_sync(own_pg_cluster.pg_ctl, "start")
    back = time.monotonic()

    async def answers() -> bool:
        try:
            await store.ping()
        except StoreUnavailable:
            return False
        return True

    await until(answers, timeout_s=30)
    assert time.monotonic() - back < 2.0
    await store.aclose()


async def test_other_instances_commit_reaches_the_hook_at_once(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notification is acted on when it arrives, not when the listener's wait times out
    (a device on A waited up to that long for an event B ingested)."""
    monkeypatch.setattr(listener, "POLL_S", 3.0)
    a = await open_postgres(pg_dsn, "a.example")
    b = await open_postgres(pg_dsn, "a.example")
    seen = trio.Event()

    def read(tx: ReadTransaction) -> list[int]:
        return [c.pos for c in tx.stream_changes(0)[0]]

    def apply(positions: list[int]) -> None:
        if positions:
            seen.set()

    try:
        assert a._listener is not None
        await trio.to_thread.run_sync(a._listener.listening.wait)
        a.set_commit_hook(read, apply)
        await b.write(partial(_event, n=1))
        with trio.fail_after(1.5):
            await seen.wait()
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_failed_catch_up_is_retried_without_another_commit(pg_dsn: str) -> None:
    """A catch-up that fails (the store away for a moment) is retried every POLL_S: the
    other instance's rows reach this one's hook without waiting for some later commit."""
    a = await open_postgres(pg_dsn, "a.example")
    b = await open_postgres(pg_dsn, "a.example")
    failures = [1]
    seen = trio.Event()

    def read(tx: ReadTransaction) -> list[int]:
        if failures[0]:
            failures[0] -= 1
            raise StoreUnavailable("away for a moment")
        return [c.pos for c in tx.stream_changes(0)[0]]

    def apply(positions: list[int]) -> None:
        if positions:
            seen.set()

    try:
        assert a._listener is not None
        await trio.to_thread.run_sync(a._listener.listening.wait)
        a.set_commit_hook(read, apply)
        await b.write(partial(_event, n=1))
        with trio.fail_after(listener.POLL_S * 6):
            await seen.wait()
        assert failures == [0]
    finally:
        await a.aclose()
        await b.aclose()
