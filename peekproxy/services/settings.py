"""The settings the peek services share, and their default clock."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

from peekproxy.core.cluster import default_instance_name

__all__ = [
    "ClusterSettings",
    "LiveSettings",
    "ObserverSettings",
    "PeekSettings",
    "cluster_settings",
    "now_ms",
]


@dataclass
class LiveSettings:
    """The settings a reload (SIGHUP, :mod:`peekproxy.reload`) changes in a running daemon:
    one mutable object built by the daemon and shared by everything that reads them, each
    reading it at use time (never copying a value).

    ``max_peeks_per_device``: rooms one device may peek (403 ``M_RESOURCE_LIMIT_EXCEEDED``
    beyond); ``max_remote_peeks``: rooms followed at once (503 beyond);
    ``max_observed_rooms``: rooms the observer user is joined to at once (503 beyond);
    ``rate_limit_per_second`` / ``rate_limit_burst``: how fast each user may start peeks
    (token bucket; 429 beyond); ``delegation_secret``: the delegation API's bearer secret
    (``None``: that API is off). Config keys: ``peeks.*`` of the same names and
    ``delegation.shared_secret_file``.
    """

    max_peeks_per_device: int = 100
    max_remote_peeks: int = 10_000
    max_observed_rooms: int = 100
    rate_limit_per_second: float = 1.0
    rate_limit_burst: int = 10
    delegation_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PeekSettings:
    """The ``[peeks]`` config section in the units the services use (durations in ms).

    ``linger_ms``: how long a remote peek nobody wants is kept before its DELETE;
    ``renewal_max_ms``: the longest wait between renewals of a remote peek;
    ``live``: the caps and limits a reload changes (:class:`LiveSettings`, shared);
    ``idle_timeout_ms``: a device silent this long has its peeks made dormant;
    ``sync_section``: the key of the peeked rooms in a ``/sync`` answer (MSC2753: ``peek``);
    ``observer``: the observer user (docs/observer-join.md; ``None``: none at all);
    ``cluster``: this instance among several on one database (docs/cluster.md; ``None``:
    the only instance, no leases).
    """

    linger_ms: int
    renewal_max_ms: int
    live: LiveSettings = field(default_factory=LiveSettings)
    idle_timeout_ms: int = 600_000
    sync_section: str = "peek"
    observer: ObserverSettings | None = None
    cluster: ClusterSettings | None = None


@dataclass(frozen=True)
class ClusterSettings:
    """The ``[cluster]`` config section (docs/cluster.md): ``instance_name`` names this
    instance in the subscription leases (unique among the running instances);
    ``lease_ms``: how long a room's lease lasts unless renewed (renewed every third of it).
    """

    instance_name: str
    lease_ms: int = 15_000


@dataclass(frozen=True)
class ObserverSettings:
    """The observer user of the observer join fallback.

    ``user_id``: the observer, ``@<observer_localpart>:<server_name>``; ``displayname``:
    its ``m.room.member`` display name; ``linger_ms``: how long an observed room nobody
    peeks stays joined before the observer leaves (its cap on rooms joined at once is
    :attr:`LiveSettings.max_observed_rooms`); ``joins``: whether new rooms are joined
    (``[peeks] fallback = "observer_join"``). With ``joins`` off the observer still leaves
    the rooms it was in, and answers for them.
    """

    user_id: str
    joins: bool
    displayname: str
    linger_ms: int = 3_600_000

    @property
    def server_name(self) -> str:
        """Our server name: the observer's user ID's."""
        return self.user_id.partition(":")[2]


def now_ms() -> int:
    """The wall clock in ms since the epoch."""
    return int(time.time() * 1000)


def cluster_settings(instance_name: str | None, lease_s: float) -> ClusterSettings:
    """The ``[cluster]`` section in the services' units: ``instance_name`` (``None``:
    ``<hostname>-<pid>``), ``lease_s`` seconds → :attr:`ClusterSettings.lease_ms`."""
    name = instance_name or default_instance_name(socket.gethostname(), os.getpid())
    return ClusterSettings(instance_name=name, lease_ms=int(lease_s * 1000))
