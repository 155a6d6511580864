"""The storage seam: both engines satisfy the ``Storage`` Protocol (checked by mypy on the
assignments below and, through ``open_store``, at run time on each engine)."""

from __future__ import annotations

from peekproxy.store import ReadTransaction, Storage, WriteTransaction
from peekproxy.store.postgres import PostgresStorage, PostgresTransaction
from peekproxy.store.sqlite import SqliteStorage, SqliteTransaction
from tests.conftest import OpenStore


def _as_storage(store: SqliteStorage | PostgresStorage) -> Storage:
    return store  # mypy: each engine is a Storage


def _as_write(tx: SqliteTransaction | PostgresTransaction) -> WriteTransaction:
    return tx  # mypy: each engine's transaction has every named operation


def _members(protocol: type) -> set[str]:
    return {
        name
        for klass in protocol.__mro__
        if klass is not object and getattr(klass, "_is_protocol", False)
        for name in vars(klass)
        if not name.startswith("_")
    }


async def test_each_engine_implements_the_storage_protocol(open_store: OpenStore) -> None:
    storage = await open_store()
    try:
        assert isinstance(storage, Storage)
        transaction = await storage.read(type)
        assert await storage.write(type) is transaction
        for protocol, implementation in [
            (Storage, type(storage)),
            (ReadTransaction, transaction),
            (WriteTransaction, transaction),
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
        await storage.aclose()
