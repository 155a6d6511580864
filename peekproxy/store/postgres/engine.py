"""The PostgreSQL engine: sync psycopg 3 and :class:`psycopg_pool.ConnectionPool`, run in
worker threads via :mod:`trio.to_thread` (psycopg's async API is asyncio-only), as SQLite's.

* **Reads**: one ``REPEATABLE READ READ ONLY`` transaction per call, on a pooled connection,
  in a worker thread of the engine's own (a :class:`trio.CapacityLimiter` of ``pool_size``).
* **Writes**: one transaction per call, FIFO within the instance (a trio lock, as SQLite's),
  and one at a time across every instance on the database: each write first takes the
  transaction-scoped advisory lock :data:`WRITE_LOCK` (``pg_advisory_xact_lock``).

  Why every write and not only those that allocate stream positions: (1) positions must
  commit in position order cluster-wide (a reader never sees ``p`` while a smaller position
  can still commit). A sequence alone does not give that: a writer can take 7, another 8,
  and 8 commit first; a sync token ``pp1_8`` would then skip 7 forever. Holding a lock from
  before the first ``nextval`` until the commit makes stream-writing transactions commit one
  at a time, in position order (Synapse's MultiWriterIdGenerator instead tracks a
  "persisted up to" position per writer; one lock is simpler and enough here, since writes
  are short). (2) The shared operations decide by reading first (is this event already on
  the stream? the next gap ``seq``?), as written for one writer at a time, which is what
  :meth:`~peekproxy.store.Storage.write` promises. Taking the lock lazily at the first stream
  row would let two instances both decide "not held" and fail on the unique index, so the
  lock is taken at ``BEGIN``. The price: writes are as serial as SQLite's, cluster-wide
  (docs/postgresql.md has the figures). Rolled-back transactions leave holes in the
  positions; holes never fill, which is harmless.
* **The commit hook across instances**: a write that added stream rows sends
  ``NOTIFY peekproxy_stream`` (payload: this instance's ID) inside its transaction, so it is
  delivered on commit. :class:`~peekproxy.store.postgres.listener.StreamListener` holds one
  ``LISTEN`` connection; on another instance's notification (and on each (re)connect) it
  runs the hook's ``read`` in a fresh read transaction and ``apply`` in the trio thread under
  the same trio lock as local writes' applies, so ``apply`` sees every row once, in order
  (the hook reads rows above the live window's watermark, so it dedupes itself).
* **Migrations** on open (``migrations.py``): under an advisory lock, in one transaction.
* Errors of the connection (the server stopped, a connection lost, no connection within
  the pool's timeout) are raised as :class:`~peekproxy.store.StoreUnavailable`; the pool
  reconnects by itself.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import trio

from peekproxy.metrics import timed_store_operation
from peekproxy.store.interface import StoreError, StoreUnavailable
from peekproxy.store.postgres.connection import PgConnection
from peekproxy.store.postgres.listener import CHANNEL, StreamListener
from peekproxy.store.postgres.migrations import available_migrations, migrate
from peekproxy.store.sql.migrations import refuse_other_server
from peekproxy.store.sql.transaction import SqlTransaction

__all__ = [
    "WRITE_LOCK",
    "PostgresStorage",
    "PostgresTransaction",
    "database_name",
    "open_postgres",
]

T = TypeVar("T")
#: The advisory lock key every write transaction holds until it ends ("peekwrt1").
WRITE_LOCK = 0x7065656B77727431
#: Seconds to wait for a pooled connection before :class:`StoreUnavailable`.
POOL_TIMEOUT = 10.0
#: Seconds to wait for a pooled connection while the last attempt found the server away: a
#: pool with no live connection can only wait for its reconnect, so requests are answered
#: ``StoreUnavailable`` (503) within this instead of :data:`POOL_TIMEOUT`.
DOWN_POOL_TIMEOUT = 0.5
#: While the server was away and the pool has no connection: at most one connection of a
#: call's own every this many seconds (the pool may be backing off its reconnects although
#: the server is back), each attempt bounded by DIRECT_TIMEOUT seconds (libpq's
#: ``connect_timeout``: whole seconds, at least 2).
DIRECT_EVERY_S = 0.5
DIRECT_TIMEOUT = 2
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)


class PostgresTransaction(SqlTransaction):
    """:class:`~peekproxy.store.sql.SqlTransaction` over a psycopg connection; notes whether
    the transaction allocated stream positions (then the engine notifies the others)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        super().__init__(PgConnection(conn))
        self.raw = conn
        self.stream_written = False

    def _before_stream_row(self) -> None:
        self.stream_written = True


def database_name(params: dict[str, Any]) -> str:
    """How errors and logs name the database of parsed conninfo ``params``
    (:func:`psycopg.conninfo.conninfo_to_dict`): ``dbname@host:port``, each part libpq's
    default when absent (``PGDATABASE``/``PGHOST``/``PGPORT``, else the user name, the local
    socket, 5432). Never the DSN itself, which may hold a password."""
    dbname = params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user") or ""
    host = params.get("host") or os.environ.get("PGHOST") or "localhost"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    return f"{dbname}@{host}:{port}"


def _unavailable(e: BaseException, where: str) -> StoreUnavailable:
    return StoreUnavailable(f"PostgreSQL database {where} unavailable: {e}")


class PostgresStorage:
    """The daemon's database on PostgreSQL (a :class:`~peekproxy.store.Storage`), shared by
    several peekproxy instances of one server name. Open with :func:`open_postgres`; close
    with :meth:`aclose`."""

    def __init__(
        self,
        pool: psycopg_pool.ConnectionPool,
        where: str,
        server_name: str,
        pool_size: int,
        conninfo: dict[str, Any],
    ) -> None:
        self.where = where
        self.server_name = server_name
        #: This instance's ID: the payload of its notifications, so it skips its own.
        self.instance_id = uuid.uuid4().hex
        self._pool = pool
        self._write_lock = trio.Lock()  # FIFO: local writes and all applies, in order
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(max(1, pool_size - 1))  # one left for writes
        self._hook_read: Callable[[SqlTransaction], Any] | None = None
        self._hook_apply: Callable[[Any], None] | None = None
        self._listener: StreamListener | None = None
        #: Whether the last transaction met the server away (then waits are short).
        self._down = False
        #: How a call connects on its own (:meth:`_run`): the pool's conninfo and kwargs.
        self._conninfo = conninfo
        self._direct_lock = threading.Lock()
        self._direct_at = 0.0

    def set_commit_hook(
        self, read: Callable[[SqlTransaction], T], apply: Callable[[T], None]
    ) -> None:
        """As :meth:`peekproxy.store.Storage.set_commit_hook`; ``apply`` also runs for the
        rows other instances commit (module docstring)."""
        self._hook_read = read
        self._hook_apply = apply

    def _run(self, fn: Callable[[PostgresTransaction], T], begin: str, lock: bool) -> T:
        """In a worker thread: ``fn`` in one transaction on a pooled connection. While the
        server was away, a pool that finds no connection within ``DOWN_POOL_TIMEOUT`` may
        still be backing off its reconnects (psycopg_pool waits 1, 2, 4... s between
        attempts) although the server is back: then one connection of the call's own is
        tried (:meth:`_direct_due`), so the daemon answers again as soon as the server does."""
        try:
            timeout = DOWN_POOL_TIMEOUT if self._down else POOL_TIMEOUT
            try:
                with self._pool.connection(timeout=timeout) as conn:
                    result = self._transact(conn, fn, begin, lock)
            except psycopg_pool.PoolTimeout:
                if not self._down or not self._direct_due():
                    raise
                with psycopg.connect(**self._conninfo, connect_timeout=DIRECT_TIMEOUT) as conn:
                    result = self._transact(conn, fn, begin, lock)
            self._down = False
            return result
        except _UNAVAILABLE as e:
            self._down = True
            raise _unavailable(e, self.where) from e

    def _direct_due(self) -> bool:
        """Whether a call may try a connection of its own now: at most one attempt every
        :data:`DIRECT_EVERY_S` seconds for the whole instance (no hammering a down server)."""
        with self._direct_lock:
            now = time.monotonic()
            if now - self._direct_at < DIRECT_EVERY_S:
                return False
            self._direct_at = now
            return True

    def _transact(
        self,
        conn: psycopg.Connection[Any],
        fn: Callable[[PostgresTransaction], T],
        begin: str,
        lock: bool,
    ) -> T:
        conn.execute(begin)
        tx = PostgresTransaction(conn)
        try:
            if lock:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            result = fn(tx)
            if tx.stream_written:
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self.instance_id))
        except BaseException:
            if not conn.closed:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def write(self, fn: Callable[[PostgresTransaction], T]) -> T:
        """Run ``fn(tx)`` in one write transaction and return its result once committed
        (``StoreUnavailable`` when the database cannot be reached: nothing committed).

        Not abandoned on cancellation. Timed (``peekproxy_store_operation_duration_seconds``,
        waiting for the write locks included)."""
        start = time.perf_counter()
        hook_read, hook_apply = self._hook_read, self._hook_apply

        def body(tx: PostgresTransaction) -> tuple[T, Any]:
            result = fn(tx)
            return result, hook_read(tx) if hook_read is not None else None

        async with self._write_lock:
            result, changes = await trio.to_thread.run_sync(
                self._run, body, "BEGIN", True, limiter=self._write_limiter
            )
            if hook_apply is not None:
                hook_apply(changes)
        timed_store_operation(fn, "write", time.perf_counter() - start)
        return result

    async def read(self, fn: Callable[[PostgresTransaction], T]) -> T:
        """Run ``fn(tx)`` in one ``REPEATABLE READ READ ONLY`` transaction (all its queries
        see one commit) and return its result. Timed as :meth:`write`."""
        start = time.perf_counter()
        result = await trio.to_thread.run_sync(
            self._run,
            fn,
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            False,
            limiter=self._read_limiter,
        )
        timed_store_operation(fn, "read", time.perf_counter() - start)
        return result

    async def catch_up(self) -> None:
        """Hand the commit hook what other instances committed: ``read`` in a fresh read
        transaction, ``apply`` under the writes' lock (called by the listener)."""
        hook_read, hook_apply = self._hook_read, self._hook_apply
        if hook_read is None or hook_apply is None:
            return
        async with self._write_lock:
            hook_apply(await self.read(hook_read))

    async def record_server_name(self) -> None:
        """Bind the database to the server name given at open, unless it is bound."""
        now_ms = int(time.time() * 1000)
        await self.write(lambda tx: tx.bind_server_name(self.server_name, now_ms))

    async def server_info(self) -> dict[str, str]:
        """The ``server_info`` facts (``server_name``, ``created_ts`` in ms)."""
        return await self.read(lambda tx: tx.server_info_facts())

    async def ping(self) -> None:
        """``SELECT 1`` on a pooled connection (for ``GET /ready``)."""
        await self.read(lambda tx: tx.raw.execute("SELECT 1").fetchone())

    def _open_sync(self, record: bool) -> None:
        try:
            self._pool.open(wait=True, timeout=POOL_TIMEOUT)
        except _UNAVAILABLE as e:
            self._pool.close()
            raise _unavailable(e, self.where) from e

        def migrate_and_check(tx: PostgresTransaction) -> None:
            migrate(tx.raw, self.where, available_migrations())
            bound = tx.server_info_facts().get("server_name")
            if bound is None and record:
                tx.bind_server_name(self.server_name, int(time.time() * 1000))
            refuse_other_server(self.where, bound, self.server_name)

        try:
            self._run(migrate_and_check, "BEGIN", True)
        except BaseException:
            self._pool.close()
            raise

    async def _start(self, record: bool, listener_conninfo: dict[str, Any]) -> None:
        await trio.to_thread.run_sync(self._open_sync, record)
        self._listener = StreamListener(
            listener_conninfo, self.instance_id, self.catch_up, trio.lowlevel.current_trio_token()
        )
        self._listener.start()

    def _notify(self) -> None:
        """``NOTIFY`` with this instance's own ID: wakes its listener (the other instances
        catch up and find nothing new). Blocking."""
        with self._pool.connection(timeout=1) as conn:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self.instance_id))

    async def aclose(self) -> None:
        """Stop the listener, wait for running reads and writes, close the pool."""
        if self._listener is not None:
            await trio.to_thread.run_sync(self._listener.stop, self._notify)
        async with self._write_lock:
            for _ in range(int(self._read_limiter.total_tokens)):
                await self._read_limiter.acquire_on_behalf_of(object())
            await trio.to_thread.run_sync(self._pool.close)


async def open_postgres(
    dsn: str,
    server_name: str,
    *,
    password: str | None = None,
    pool_size: int = 10,
    record_server_name: bool = True,
) -> PostgresStorage:
    """Open the PostgreSQL database ``dsn`` (a libpq conninfo string or URI, without the
    password) for ``server_name``: migrate it, check its server name (bind it now unless
    ``record_server_name`` is false) and start listening for other instances' commits.

    Raises:
        StoreUnavailable: the server cannot be reached (within 10 s).
        StoreVersionError: the database is newer than this peekproxy.
        StoreError: a database bound to another server name, or a bad ``dsn``.
    """
    try:
        where = database_name(psycopg.conninfo.conninfo_to_dict(dsn))
    except psycopg.ProgrammingError:
        # Not the parser's message: it may quote the DSN, with a password in it.
        raise StoreError("bad PostgreSQL dsn: not a libpq conninfo string or URI") from None
    kwargs: dict[str, Any] = {"autocommit": True}
    if password is not None:
        kwargs["password"] = password
    pool = psycopg_pool.ConnectionPool(
        dsn, kwargs=kwargs, min_size=1, max_size=pool_size, open=False, name="peekproxy"
    )
    conninfo = {"conninfo": dsn, **kwargs}
    store = PostgresStorage(pool, where, server_name, pool_size, conninfo)
    await store._start(record_server_name, conninfo)
    return store
