"""Storage: SQLite through ``trio.to_thread`` (one writer connection, WAL)."""

from peekproxy.store.sqlite import Store, StoreError, StoreVersionError

__all__ = ["Store", "StoreError", "StoreVersionError"]
