"""The SQLite transaction object: every operations mixin composed over one connection."""

from __future__ import annotations

from peekproxy.store.sqlite.ephemeral import EphemeralOps
from peekproxy.store.sqlite.front import FrontPositionOps
from peekproxy.store.sqlite.history import HistoryOps
from peekproxy.store.sqlite.keys import ServerKeyOps
from peekproxy.store.sqlite.leases import LeaseOps
from peekproxy.store.sqlite.sync import SyncOps
from peekproxy.store.sqlite.txns import TxnOps

__all__ = ["SqliteTransaction"]


class SqliteTransaction(
    SyncOps, HistoryOps, EphemeralOps, TxnOps, ServerKeyOps, FrontPositionOps, LeaseOps
):
    """The named operations of :class:`~peekproxy.store.WriteTransaction` (and so of
    :class:`~peekproxy.store.ReadTransaction`) over the connection the engine began a
    transaction on. A read gets one over a ``query_only`` reader connection: the write
    operations are there too, and SQLite refuses them."""
