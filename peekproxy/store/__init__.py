"""Storage behind an interface of named operations.

Here: the interface (:class:`Storage`, :class:`ReadTransaction`, :class:`WriteTransaction`,
in ``interface.py``, ``reads.py``, ``writes.py``), the errors, and the SQLite implementation
(``sqlite/``, opened with :func:`open_sqlite`). Services type their store as
:class:`Storage`; only the daemon and tests name the SQLite implementation.

May import: the standard library, ``trio`` and ``peekproxy.core`` (the types operations take
and return). Must not import the services, the API or the federation shell.
"""

from peekproxy.store.interface import Storage, StoreError, StoreVersionError
from peekproxy.store.reads import ReadTransaction, ServerKeyRow
from peekproxy.store.sqlite import SqliteStorage, open_sqlite
from peekproxy.store.writes import WriteTransaction

__all__ = [
    "ReadTransaction",
    "ServerKeyRow",
    "SqliteStorage",
    "Storage",
    "StoreError",
    "StoreVersionError",
    "WriteTransaction",
    "open_sqlite",
]
