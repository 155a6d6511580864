"""The PostgreSQL implementation of :class:`peekproxy.store.Storage`, for one or several
peekproxy instances of one server name on one database (docs/postgresql.md).

``engine.py`` (:class:`PostgresStorage`: the pool, worker threads, the write locks, the
commit hook), ``listener.py`` (other instances' commits through ``LISTEN``),
``connection.py`` (placeholders), ``migrations.py`` with ``migrations/*.sql``. The
operations are the shared ones of ``peekproxy/store/sql/``.

May import: the standard library, ``psycopg``, ``psycopg_pool``, ``trio``,
``peekproxy.core`` and the other modules of ``peekproxy.store``.
"""

from peekproxy.store.postgres.engine import PostgresStorage, PostgresTransaction, open_postgres

__all__ = ["PostgresStorage", "PostgresTransaction", "open_postgres"]
