"""The settings the peek services share, and their default clock."""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["ObserverSettings", "PeekSettings", "now_ms"]


@dataclass(frozen=True)
class PeekSettings:
    """The ``[peeks]`` config section in the units the services use (durations in ms).

    ``linger_ms``: how long a remote peek nobody wants is kept before its DELETE;
    ``renewal_max_ms``: the longest wait between renewals of a remote peek;
    ``max_peeks_per_device`` / ``max_remote_peeks``: caps (403 / 503 beyond them);
    ``idle_timeout_ms``: a device silent this long has its peeks made dormant;
    ``sync_section``: the key of the peeked rooms in a ``/sync`` answer (MSC2753: ``peek``);
    ``observer``: the observer user (docs/observer-join.md; ``None``: none at all).
    """

    linger_ms: int
    renewal_max_ms: int
    max_peeks_per_device: int
    max_remote_peeks: int
    idle_timeout_ms: int = 600_000
    sync_section: str = "peek"
    observer: ObserverSettings | None = None


@dataclass(frozen=True)
class ObserverSettings:
    """The observer user of the observer join fallback.

    ``user_id``: the observer, ``@<observer_localpart>:<server_name>``; ``displayname``:
    its ``m.room.member`` display name; ``linger_ms``: how long an observed room nobody
    peeks stays joined before the observer leaves; ``max_rooms``: most rooms joined at once;
    ``joins``: whether new rooms are joined (``[peeks] fallback = "observer_join"``). With
    ``joins`` off the observer still leaves the rooms it was in, and answers for them.
    """

    user_id: str
    joins: bool
    displayname: str
    linger_ms: int = 3_600_000
    max_rooms: int = 100

    @property
    def server_name(self) -> str:
        """Our server name: the observer's user ID's."""
        return self.user_id.partition(":")[2]


def now_ms() -> int:
    """The wall clock in ms since the epoch."""
    return int(time.time() * 1000)
