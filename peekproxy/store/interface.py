"""The storage interface: what the services may ask of a database, and what an
implementation must guarantee.

Services hold a :class:`Storage` and never see a connection. They call
``await storage.read(fn)`` / ``await storage.write(fn)``, where ``fn`` takes a
:class:`~peekproxy.store.reads.ReadTransaction` / :class:`~peekproxy.store.writes.WriteTransaction`
(an object of named, synchronous operations) and returns a value. SQLite
(:mod:`peekproxy.store.sqlite`, one instance) and PostgreSQL (:mod:`peekproxy.store.postgres`,
one or several instances on one database) implement it.

**What an implementation must provide** (a second one, PostgreSQL with several peekproxy
instances, issue 16, included):

* **One transaction per call.** Every operation inside one ``read`` sees the same commit;
  every operation inside one ``write`` commits together or not at all (an exception from
  ``fn`` rolls the whole call back and is raised to the caller). A ``write`` returns only
  once its transaction has committed durably.
* **Writes in commit order with their hook.** :meth:`Storage.set_commit_hook`: after each
  write's ``fn``, the hook's ``read`` runs in the same transaction; once committed, the
  hook's ``apply`` runs in the caller's trio thread, for each write in commit order, before
  the next write's ``apply`` (the live window and the notifier follow the stream this way).
  With several writers, an implementation must still hand ``apply`` every stream row once,
  in position order, with no row missing below a position it has handed on. PostgreSQL
  (several instances) also calls ``read`` in a fresh read transaction and ``apply`` under
  the same ordering when another instance commits stream rows (``LISTEN/NOTIFY``) and when
  its listening connection (re)connects; ``read`` reads above what ``apply`` last took in,
  so a row is never handed on twice.
* **Stream positions allocated by the storage**, increasing in commit order (a reader never
  sees position ``p`` before every position below ``p`` that will ever commit), never
  reused, shared by all rooms (one stream; ``pp1_<pos>`` sync tokens name positions).
* **A write is not abandoned on cancellation**: once started it is finished (committed or
  rolled back) even when the awaiting task is cancelled; the hook's ``apply`` still runs.
* **Operations are synchronous** and run off the trio thread (a worker thread, or a
  connection pool's): ``fn`` must not await and must not touch trio objects.
* **A database belongs to one server name** (:meth:`Storage.record_server_name`); opening
  one bound to another name, or written by a newer peekproxy, raises :class:`StoreError` /
  :class:`StoreVersionError`.
* :meth:`Storage.aclose` waits for running reads and writes, then releases the database.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

from peekproxy.store.reads import ReadTransaction
from peekproxy.store.writes import WriteTransaction

__all__ = [
    "ReadTransaction",
    "Storage",
    "StoreError",
    "StoreUnavailable",
    "StoreVersionError",
    "WriteTransaction",
]

T = TypeVar("T")
H = TypeVar("H")


class StoreError(Exception):
    """The database cannot be used."""


class StoreVersionError(StoreError):
    """The database was written by a newer peekproxy (its schema version is too high)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached right now (a PostgreSQL server stopped or restarting,
    a connection lost, no connection free within the pool's timeout). Nothing of the call
    was committed; the same call may succeed later, once the implementation has
    reconnected by itself. Requests answer ``503 M_UNKNOWN``; background loops back off
    and retry."""


@runtime_checkable
class Storage(Protocol):
    """The daemon's database, behind named operations (module docstring: the guarantees)."""

    async def read(self, fn: Callable[[ReadTransaction], T]) -> T:
        """Run ``fn(tx)`` in one read transaction (all its operations see one commit) and
        return its result. Reads may run concurrently with each other and with a write."""

    async def write(self, fn: Callable[[WriteTransaction], T]) -> T:
        """Run ``fn(tx)`` in one write transaction and return its result once committed.
        Writes run one at a time in arrival order (FIFO); not abandoned on cancellation."""

    def set_commit_hook(
        self, read: Callable[[ReadTransaction], H], apply: Callable[[H], None]
    ) -> None:
        """After each write's ``fn``, call ``read(tx)`` in the same transaction; once that
        transaction has committed, call ``apply(result)`` in the trio thread. ``apply``
        calls happen in commit order, each before the next write's. An exception from
        ``read`` fails the write (rolled back); one from ``apply`` is the hook's to handle
        (the write has committed). PostgreSQL also calls ``apply(read(...))`` in a fresh
        read transaction between writes, for other instances' commits and on each
        (re)connection of its listener (docs/postgresql.md): ``read`` must read what is new
        since the last ``apply`` (rows above a watermark), so that a call with nothing new
        is harmless."""

    async def record_server_name(self) -> None:
        """Bind the database to the server name it was opened for, if it is not bound yet
        (idempotent); from then on opening it for another name fails with
        :class:`StoreError`."""

    async def server_info(self) -> dict[str, str]:
        """The database's facts: ``server_name`` (once bound), ``created_ts`` (ms)."""

    async def ping(self) -> None:
        """Ask the database a trivial question (for ``GET /ready``).

        Raises:
            Exception: whatever the database raises when it cannot answer.
        """

    async def aclose(self) -> None:
        """Wait for running reads and writes, then release the database (connections,
        locks). No call may follow."""
