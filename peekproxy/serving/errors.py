"""The error a server raises when it cannot start; exception groups flattened for its message."""

from __future__ import annotations

__all__ = ["ServingError", "exception_leaves", "failure_message"]


class ServingError(Exception):
    """The daemon or the testbed cannot start: a listener cannot bind, or a file it needs
    (the delegation secret; the testbed's signing key, admin token or saved rooms) cannot
    be used. The message names the config key or the file, e.g.
    ``listeners.client.bind: cannot listen on 127.0.0.1:8008: Address already in use``."""


def exception_leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``, depth first, with every (nested) exception group
    flattened away; ``[error]`` for an exception that is not a group."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in exception_leaves(inner)]
    return [error]


def failure_message(error: BaseException) -> str:
    """The messages of ``error``'s leaves (:func:`exception_leaves`) joined with ``"; "``:
    the one line that ``cannot start: ...`` shows."""
    return "; ".join(str(leaf) for leaf in exception_leaves(error))
