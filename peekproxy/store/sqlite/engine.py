"""The SQLite engine: stdlib :mod:`sqlite3` run in worker threads via :mod:`trio.to_thread`.

* One writer connection; writes wait their turn on a FIFO lock, and each :meth:`SqliteStorage.write`
  call is one ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction, so whatever it returns has been
  stored.
* A commit hook (:meth:`SqliteStorage.set_commit_hook`) reads what a write changed inside its
  transaction and is handed it after the commit, in commit order, before the next write
  starts: the live window (peekproxy/core/live.py) follows the stream this way.
* Two reader connections (WAL lets them read while the writer writes); each
  :meth:`SqliteStorage.read` is one read transaction, so its queries see one commit.
* ``journal_mode=WAL``, ``synchronous=FULL``: a committed write survives a crash of the process
  and of the machine.
* Schema migrations run on open; a database from a newer peekproxy is refused, and so is a
  database bound to another server name, and one another process holds open (an
  exclusive ``flock`` on ``<database>.lock``). A database is bound to a server name by
  :meth:`SqliteStorage.record_server_name` (the daemon calls it once it has started, so a start that
  fails leaves an unbound database that any server name may use).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from peekproxy.metrics import timed_store_operation
from peekproxy.store.interface import StoreError
from peekproxy.store.sql.migrations import refuse_newer, refuse_other_server
from peekproxy.store.sqlite.migrations import (
    apply_migrations,
    available_migrations,
    schema_version,
)
from peekproxy.store.sqlite.transaction import SqliteTransaction

__all__ = ["SqliteStorage", "open_sqlite"]

T = TypeVar("T")
#: Read-only connections (WAL lets them read while the writer writes).
READERS = 2


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _lock(path: Path) -> int:
    """Take an exclusive lock on ``<database>.lock`` so one daemon owns a database."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise StoreError(f"cannot create lock file {lock_path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(
            f"database {path} is in use by another peekproxy (pid {holder}); "
            "each daemon needs its own data_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _open_sync(
    path: Path, server_name: str, record: bool
) -> tuple[sqlite3.Connection, list[sqlite3.Connection], int]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create database directory {path.parent}: {e.strerror or e}"
        ) from None
    lock = _lock(path)
    try:
        return (*_open_locked(path, server_name, record), lock)
    except BaseException:
        os.close(lock)
        raise


def _open_locked(
    path: Path, server_name: str, record: bool
) -> tuple[sqlite3.Connection, list[sqlite3.Connection]]:
    try:
        writer = _connect(path)
        mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise StoreError(f"cannot open database {path}: {e}") from None
    try:
        if str(mode).lower() != "wal":
            raise StoreError(f"cannot switch database {path} to WAL mode (got {mode})")
        writer.execute("PRAGMA synchronous = FULL")
        migrations = available_migrations()
        refuse_newer(str(path), schema_version(writer), migrations)
        apply_migrations(writer, migrations)
        row = writer.execute("SELECT value FROM server_info WHERE key = 'server_name'").fetchone()
        if row is None and record:
            writer.execute("BEGIN IMMEDIATE")
            SqliteTransaction(writer).bind_server_name(server_name, int(time.time() * 1000))
            writer.execute("COMMIT")
        elif row is not None:
            refuse_other_server(str(path), row[0], server_name)
    except BaseException:
        writer.close()
        raise
    readers = []
    for _ in range(READERS):
        reader = _connect(path)
        reader.execute("PRAGMA query_only = ON")
        readers.append(reader)
    return writer, readers


class SqliteStorage:
    """The daemon's database (a :class:`~peekproxy.store.Storage`). Open with :meth:`open`
    (or :func:`open_sqlite`); close with :meth:`aclose`.

    ``read`` and ``write`` hand ``fn`` a :class:`SqliteTransaction` (the named operations;
    its ``connection`` is there for tests of this implementation)."""

    def __init__(
        self,
        path: Path,
        server_name: str,
        writer: sqlite3.Connection,
        readers: list[sqlite3.Connection],
        lock: int,
    ) -> None:
        self.path = path
        self.server_name = server_name
        self._lock = lock
        self._writer = writer
        self._readers = readers
        self._free_readers = list(readers)
        self._write_lock = trio.Lock()  # FIFO: writes and their hooks run in arrival order
        self._write_limiter = trio.CapacityLimiter(1)  # the writer's own worker thread slot
        self._read_limiter = trio.CapacityLimiter(len(readers))
        # Reads get worker threads of their own: trio's shared pool (40) can be full of
        # blocking DNS lookups when many remotes are unreachable.
        self._read_threads = trio.CapacityLimiter(len(readers))
        self._write_tx = SqliteTransaction(writer)
        self._read_txs = {id(reader): SqliteTransaction(reader) for reader in readers}
        self._hook_read: Callable[[SqliteTransaction], Any] | None = None
        self._hook_apply: Callable[[Any], None] | None = None

    def set_commit_hook(
        self,
        read: Callable[[SqliteTransaction], T],
        apply: Callable[[T], None],
    ) -> None:
        """After each write's ``fn``, call ``read(tx)`` in the same transaction (in the
        writer thread); once that transaction has committed, call ``apply(result)`` in the
        trio thread. ``apply`` calls happen in commit order, each before the next write
        starts. An exception from ``read`` fails the write (rolled back); one from
        ``apply`` is the hook's to handle (the write has committed)."""
        self._hook_read = read
        self._hook_apply = apply

    @classmethod
    async def open(
        cls, path: Path, server_name: str, *, record_server_name: bool = True
    ) -> SqliteStorage:
        """Open (creating and migrating as needed) the database at ``path`` for
        ``server_name``. An unbound database is bound to it at once, unless
        ``record_server_name`` is false (then :meth:`record_server_name` does it later).

        Raises:
            StoreVersionError: the database is newer than this peekproxy.
            StoreError: unusable file, or a database bound to another server name.
        """
        writer, readers, lock = await trio.to_thread.run_sync(
            _open_sync, path, server_name, record_server_name
        )
        return cls(path, server_name, writer, readers, lock)

    async def record_server_name(self) -> None:
        """Bind the database to the server name given to :meth:`open`, if it is not bound
        yet; from then on :meth:`open` refuses any other name. The daemon calls this once it
        has started, so that a start that fails (a port in use, say) leaves no binding that
        a corrected config with another server name would be refused by."""
        now_ms = int(time.time() * 1000)
        await self.write(lambda tx: tx.bind_server_name(self.server_name, now_ms))

    async def write(self, fn: Callable[[SqliteTransaction], T]) -> T:
        """Run ``fn(tx)`` in one write transaction and return its result once committed.

        Not abandoned on cancellation: a write that started is finished or rolled back.
        Timed (``peekproxy_store_operation_duration_seconds``, waiting for the writer included).
        """
        start = time.perf_counter()

        hook_read, hook_apply = self._hook_read, self._hook_apply

        def run() -> tuple[T, Any]:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._write_tx)
                changes = hook_read(self._write_tx) if hook_read is not None else None
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")
            return result, changes

        async with self._write_lock:
            result, changes = await trio.to_thread.run_sync(run, limiter=self._write_limiter)
            if hook_apply is not None:
                hook_apply(changes)
        timed_store_operation(fn, "write", time.perf_counter() - start)
        return result

    async def read(self, fn: Callable[[SqliteTransaction], T]) -> T:
        """Run ``fn(tx)`` on one of the read-only connections, in one read transaction (all
        its queries see the same commit), and return its result. Timed as :meth:`write`."""
        start = time.perf_counter()

        def run(reader: sqlite3.Connection) -> T:
            reader.execute("BEGIN")
            try:
                return fn(self._read_txs[id(reader)])
            finally:
                reader.execute("COMMIT")

        async with self._read_limiter:
            reader = self._free_readers.pop()
            try:
                result = await trio.to_thread.run_sync(run, reader, limiter=self._read_threads)
            finally:
                self._free_readers.append(reader)
        timed_store_operation(fn, "read", time.perf_counter() - start)
        return result

    async def server_info(self) -> dict[str, str]:
        """The ``server_info`` facts (``server_name``, ``created_ts`` in ms)."""
        return await self.read(lambda tx: tx.server_info_facts())

    async def ping(self) -> None:
        """``SELECT 1`` on a reader connection (for ``GET /ready``)."""
        await self.read(lambda tx: tx.connection.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        """Wait for running reads and the write, then close the connections and the lock."""
        async with self._write_lock:
            for reader in self._readers:  # wait until no read is running
                await self._read_limiter.acquire_on_behalf_of(reader)
            await trio.to_thread.run_sync(self._close_sync)

    def _close_sync(self) -> None:
        for reader in self._readers:
            reader.close()
        self._writer.close()
        os.close(self._lock)


async def open_sqlite(
    path: Path, server_name: str, *, record_server_name: bool = True
) -> SqliteStorage:
    """Open the SQLite database at ``path`` for ``server_name``: :meth:`SqliteStorage.open`."""
    return await SqliteStorage.open(path, server_name, record_server_name=record_server_name)
