"""Storage behind an interface of named operations.

Here: the interface (:class:`Storage`, :class:`ReadTransaction`, :class:`WriteTransaction`,
in ``interface.py``, ``reads.py``, ``writes.py``) and the errors. Implementations live in
subpackages: today ``sqlite/`` (opened with :func:`peekproxy.store.sqlite.open_sqlite`), which
this package does not import. Services type their store as :class:`Storage`; only the daemon
and tests name an implementation.

May import: the standard library, ``trio`` and ``peekproxy.core`` (the types operations take
and return). Must not import the services, the API or the federation shell.
"""

from peekproxy.store.interface import Storage, StoreError, StoreUnavailable, StoreVersionError
from peekproxy.store.reads import ReadTransaction, ServerKeyRow
from peekproxy.store.writes import WriteTransaction

__all__ = [
    "ReadTransaction",
    "ServerKeyRow",
    "Storage",
    "StoreError",
    "StoreUnavailable",
    "StoreVersionError",
    "WriteTransaction",
]
