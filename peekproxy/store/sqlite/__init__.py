"""The SQLite implementation of :class:`peekproxy.store.Storage`.

``engine.py`` (:class:`SqliteStorage`: connections, worker threads, the write lock, the
commit hook), ``migrations.py`` with ``migrations/*.sql``, and the operations by concern,
mixins composed into :class:`SqliteTransaction` (``transaction.py``): ``subscriptions.py``,
``events.py`` (room events, stream, state, gaps), ``devices.py``, ``ephemeral.py``,
``txns.py``, ``keys.py``, ``history.py`` (``/messages`` paging), ``sync.py``.

May import: the standard library (``sqlite3``), ``trio``, ``peekproxy.core`` and the
interface modules of ``peekproxy.store``.
"""

from peekproxy.store.sqlite.engine import SqliteStorage, open_sqlite
from peekproxy.store.sqlite.transaction import SqliteTransaction

__all__ = ["SqliteStorage", "SqliteTransaction", "open_sqlite"]
