"""SQLite engine only: the file itself (WAL mode, ``PRAGMA user_version``, a newer schema,
not a database). What both engines do is in tests/test_store.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from peekproxy.store import StoreError, StoreVersionError
from peekproxy.store.sqlite import open_sqlite
from peekproxy.store.sqlite.migrations import available_migrations


async def test_new_database_is_in_wal_mode_at_the_latest_user_version(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "sub" / "p.db", "a.example")
    try:
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


async def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 42")
    with pytest.raises(StoreVersionError, match=r"schema version 42.*newer peekproxy"):
        await open_sqlite(path, "a.example")


async def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    path.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open database"):
        await open_sqlite(path, "a.example")
