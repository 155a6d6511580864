"""The storage operations in SQL both engines run (SQLite and PostgreSQL).

``base.py`` (the :class:`Connection` protocol and :class:`SqlBase`), the operations by
concern, mixins composed into :class:`SqlTransaction` (``transaction.py``):
``subscriptions.py``, ``events.py`` (room events, stream, state, gaps), ``devices.py``,
``ephemeral.py``, ``txns.py``, ``keys.py``, ``history.py`` (``/messages`` paging),
``sync.py``. The engines (``store/sqlite/``, ``store/postgres/``) hold the connections,
the migrations and the dialect differences.

May import: the standard library, ``peekproxy.core`` and the interface modules of
``peekproxy.store``; no database driver.
"""

from peekproxy.store.sql.base import Connection, Cursor, SqlBase, dumps
from peekproxy.store.sql.transaction import SqlTransaction

__all__ = ["Connection", "Cursor", "SqlBase", "SqlTransaction", "dumps"]
