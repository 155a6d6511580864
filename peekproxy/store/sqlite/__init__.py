"""The SQLite implementation of :class:`peekproxy.store.Storage`.

``engine.py`` (:class:`SqliteStorage`: connections, worker threads, the write lock, the
commit hook), ``migrations.py`` with ``migrations/*.sql``, and :class:`SqliteTransaction`
(``transaction.py``): the shared operations of ``peekproxy/store/sql/`` over a ``sqlite3``
connection.

May import: the standard library (``sqlite3``), ``trio``, ``peekproxy.core`` and the
interface modules of ``peekproxy.store``.
"""

from peekproxy.store.sqlite.engine import SqliteStorage, open_sqlite
from peekproxy.store.sqlite.transaction import SqliteTransaction

__all__ = ["SqliteStorage", "SqliteTransaction", "open_sqlite"]
