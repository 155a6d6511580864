"""Process limits: the open-files limit raised for long-polls."""

from __future__ import annotations

import logging
import resource

__all__ = ["raise_open_files_limit"]

log = logging.getLogger("peekproxy")


def raise_open_files_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (every ``/sync`` long-poll holds a
    socket; the usual soft limit of 1024 caps a daemon at a few hundred waiting devices).
    Logged at debug. Returns the soft limit in force afterwards; a refusal (a seccomp
    filter, say) is logged at debug and leaves the limit as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        log.debug("open files limit: %s (hard limit %s)", soft, hard)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:
        log.debug("open files limit: %s, cannot raise it to %s: %s", soft, hard, e)
        return soft
    log.debug("open files limit raised from %s to %s (the hard limit)", soft, hard)
    return hard
