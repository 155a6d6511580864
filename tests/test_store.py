"""The store on both engines (the ``open_store`` fixture): binding to a server name,
transactions rolled back whole. Engine-only checks: tests/test_store_sqlite.py,
tests/test_store_postgres.py."""

from __future__ import annotations

import pytest

from peekproxy.store import StoreError, WriteTransaction
from tests.conftest import OpenStore
from tests.store_sql import run

ROOM = "!r:remote.test"


def _event(tx: WriteTransaction, n: int) -> int | None:
    pdu = {"type": "m.room.message", "room_id": ROOM, "depth": n, "prev_events": []}
    return tx.append_event(ROOM, f"$e{n}", pdu, redacted=False, now_ms=n)


async def test_new_database_is_migrated_and_bound(open_store: OpenStore) -> None:
    store = await open_store("a.example")
    try:
        info = await store.server_info()
        assert info["server_name"] == "a.example"
        assert int(info["created_ts"]) > 1_600_000_000_000
        assert await store.read(lambda tx: tx.max_stream_pos()) == 0
    finally:
        await store.aclose()


async def test_failed_write_rolls_back(open_store: OpenStore) -> None:
    store = await open_store("a.example")

    def insert_then_fail(tx: WriteTransaction) -> None:
        run(tx, "INSERT INTO server_info (key, value) VALUES ('x', 'y')")
        _event(tx, 1)
        raise RuntimeError("boom")

    def insert(tx: WriteTransaction) -> int | None:
        run(tx, "INSERT INTO server_info (key, value) VALUES ('x', 'z')")
        return _event(tx, 1)

    try:
        with pytest.raises(RuntimeError):
            await store.write(insert_then_fail)
        assert "x" not in await store.server_info()
        assert await store.read(lambda tx: tx.max_stream_pos()) == 0
        assert await store.write(insert) is not None
        assert (await store.server_info())["x"] == "z"
        assert await store.read(lambda tx: tx.known_event_ids(["$e1"])) == {"$e1"}
    finally:
        await store.aclose()


async def test_database_of_another_server_is_refused(open_store: OpenStore) -> None:
    await (await open_store("a.example")).aclose()
    with pytest.raises(StoreError, match=r"belongs to server name 'a\.example'"):
        await open_store("b.example")


async def test_server_name_is_recorded_only_when_asked(open_store: OpenStore) -> None:
    """The daemon opens with ``record_server_name=False`` and records once started: until
    then another server name may still open the database."""
    unbound = await open_store("typo.example", record_server_name=False)
    assert "server_name" not in await unbound.server_info()
    await unbound.aclose()
    store = await open_store("b.example", record_server_name=False)
    await store.record_server_name()
    await store.record_server_name()  # idempotent
    assert (await store.server_info())["server_name"] == "b.example"
    await store.aclose()
    with pytest.raises(StoreError, match=r"belongs to server name 'b\.example'"):
        await open_store("typo.example", record_server_name=False)
