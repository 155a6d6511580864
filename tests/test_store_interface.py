"""The storage seam: the SQLite implementation satisfies the ``Storage`` Protocol (checked by
mypy on the assignments below and at run time), and nothing outside ``peekproxy/store/``
reaches SQLite."""

from __future__ import annotations

from pathlib import Path

from peekproxy.store import ReadTransaction, Storage, WriteTransaction
from peekproxy.store.sqlite import SqliteStorage, SqliteTransaction, open_sqlite

PACKAGE = Path(__file__).resolve().parent.parent / "peekproxy"


def _as_storage(store: SqliteStorage) -> Storage:
    return store  # mypy: SqliteStorage is a Storage


def _as_write(tx: SqliteTransaction) -> WriteTransaction:
    return tx  # mypy: SqliteTransaction has every named operation


def _members(protocol: type) -> set[str]:
    return {
        name
        for klass in protocol.__mro__
        if klass is not object and getattr(klass, "_is_protocol", False)
        for name in vars(klass)
        if not name.startswith("_")
    }


async def test_sqlite_implements_the_storage_protocol(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "p.db", "local.test")
    try:
        storage = _as_storage(store)
        assert isinstance(storage, Storage)
        for protocol, implementation in [
            (Storage, SqliteStorage),
            (ReadTransaction, SqliteTransaction),
            (WriteTransaction, SqliteTransaction),
        ]:
            missing = sorted(
                name
                for name in _members(protocol)
                if not callable(getattr(implementation, name, None))
            )
            assert missing == [], f"{implementation.__name__} lacks {missing}"
        assert await storage.read(lambda tx: isinstance(tx, ReadTransaction))
        assert await storage.write(lambda tx: isinstance(tx, WriteTransaction))
        await storage.ping()
        assert await storage.read(lambda tx: tx.max_stream_pos()) == 0
    finally:
        await store.aclose()
