"""SQLite store: migrations, schema-version guard, server-name guard, transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from peekproxy.store import StoreError, StoreVersionError
from peekproxy.store.sqlite import SqliteTransaction, open_sqlite
from peekproxy.store.sqlite.migrations import available_migrations


async def test_new_database_is_migrated_and_in_wal_mode(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "sub" / "p.db", "a.example")
    try:
        info = await store.server_info()
        assert info["server_name"] == "a.example"
        assert int(info["created_ts"]) > 1_600_000_000_000
        mode = await store.read(
            lambda tx: tx.connection.execute("PRAGMA journal_mode").fetchone()[0]
        )
        assert mode == "wal"
        version = await store.read(
            lambda tx: tx.connection.execute("PRAGMA user_version").fetchone()[0]
        )
        assert version == available_migrations()[-1].version
    finally:
        await store.aclose()


async def test_failed_write_rolls_back(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "p.db", "a.example")

    def insert_then_fail(tx: SqliteTransaction) -> None:
        tx.connection.execute("INSERT INTO server_info (key, value) VALUES ('x', 'y')")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.write(insert_then_fail)
    assert "x" not in await store.server_info()
    await store.write(
        lambda tx: tx.connection.execute("INSERT INTO server_info (key, value) VALUES ('x', 'z')")
    )
    assert (await store.server_info())["x"] == "z"
    await store.aclose()


async def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 42")
    with pytest.raises(StoreVersionError, match=r"schema version 42.*newer peekproxy"):
        await open_sqlite(path, "a.example")


async def test_database_of_another_server_is_refused(tmp_path: Path) -> None:
    await (await open_sqlite(tmp_path / "p.db", "a.example")).aclose()
    with pytest.raises(StoreError, match=r"belongs to server name 'a\.example'"):
        await open_sqlite(tmp_path / "p.db", "b.example")


async def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    path.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open database"):
        await open_sqlite(path, "a.example")


async def test_server_name_is_recorded_only_when_asked(tmp_path: Path) -> None:
    """The daemon opens with ``record_server_name=False`` and records once started: until
    then another server name may still open the database."""
    path = tmp_path / "p.db"
    unbound = await open_sqlite(path, "typo.example", record_server_name=False)
    assert "server_name" not in await unbound.server_info()
    await unbound.aclose()
    store = await open_sqlite(path, "b.example", record_server_name=False)
    await store.record_server_name()
    await store.record_server_name()  # idempotent
    assert (await store.server_info())["server_name"] == "b.example"
    await store.aclose()
    with pytest.raises(StoreError, match=r"belongs to server name 'b\.example'"):
        await open_sqlite(path, "typo.example", record_server_name=False)
