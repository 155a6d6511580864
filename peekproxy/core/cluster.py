"""Several peekproxy instances on one database (issue 16, docs/cluster.md): the pure rules
of the subscription leases and of the cluster-wide idle reaper. Times are ms since the
epoch; nothing here does I/O.

A **lease** (one row per remote room: owner instance, expiry) says which instance follows
the room: only its owner peeks, renews, re-peeks and DELETEs. The owner renews all its
leases every :func:`renew_every_ms`; an instance takes a room over only once the lease has
expired (:func:`may_take`), and an owner that could not renew for a whole lease stops
acting on its rooms (:func:`fenced`), so two instances never follow a room at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from peekproxy.core.subscription import Subscription, SubState

__all__ = [
    "Lease",
    "default_instance_name",
    "fenced",
    "idle_reap_at",
    "instance_of",
    "lease_owner",
    "may_take",
    "needs_follower",
    "renew_every_ms",
    "store_sync_due",
]


@dataclass(frozen=True)
class Lease:
    """A room's lease: ``owner`` (an instance name) follows ``room_id`` until
    ``expires_ms``; ``end_reason``: another instance saw the room stop being peekable
    (protocol.md decision 10) and asks the owner to end its subscription."""

    room_id: str
    owner: str
    expires_ms: int
    end_reason: str | None = None


def default_instance_name(hostname: str, pid: int) -> str:
    """``<hostname>-<pid>``: unique among running instances, new after each restart."""
    return f"{hostname}-{pid}"


def lease_owner(instance_name: str, suffix: str) -> str:
    """What a process records as the owner of the leases it takes: ``<instance_name>/<suffix>``
    (``suffix``: random, new for each process, e.g. ``pp2/3f9a1c``). Two processes started
    with the same ``instance_name`` by mistake are then still two owners: neither renews nor
    releases the other's leases."""
    return f"{instance_name}/{suffix}"


def instance_of(owner: str) -> str:
    """The instance name of a lease owner (:func:`lease_owner`): before its last ``/``."""
    return owner.rpartition("/")[0] or owner


def renew_every_ms(lease_ms: int) -> int:
    """How often an owner renews its leases (and refreshes its view): a third of the
    lease, so two renewals may fail before the lease runs out; at least 1 ms."""
    return max(1, lease_ms // 3)


def may_take(lease: Lease | None, me: str, now_ms: int) -> bool:
    """Whether instance ``me`` may own the room: nobody holds the lease, ``me`` does, or
    the owner let it expire (``expires_ms`` reached)."""
    return lease is None or lease.owner == me or now_ms >= lease.expires_ms


def fenced(held_until_ms: int | None, now_ms: int) -> bool:
    """Whether an owner must stop acting on a room: its lease, as last taken or renewed
    (``held_until_ms``: the time read *before* that write plus the lease, so never later
    than the stored expiry; ``None``: not held), has run out, so another instance may
    have taken the room over. An owner that cannot renew (the store is down) stops in
    time."""
    return held_until_ms is None or now_ms >= held_until_ms


def needs_follower(sub: Subscription, active_peeks: int) -> bool:
    """Whether a room needs an owner: some device peeks it (anywhere in the cluster), or a
    remote peek (or its DELETE) is still to be looked after. A room nobody wants whose
    following is stopped needs none (its lease may stay free)."""
    if active_peeks > 0 or sub.pending_deletes:
        return True
    return sub.state in (SubState.ACTIVE, SubState.STOPPING) and sub.server is not None


def store_sync_due(stored_ms: int | None, now_ms: int, idle_timeout_ms: int) -> bool:
    """Whether a device's sync at ``now_ms`` must be written as its last sync: the stored
    one (``None``: none) is at least a quarter of the idle timeout old. Writes stay coarse
    (at most one per device per ``idle_timeout / 4``)."""
    return stored_ms is None or now_ms - stored_ms >= idle_timeout_ms // 4


def idle_reap_at(local_ms: int | None, stored_ms: int | None, idle_timeout_ms: int) -> int | None:
    """When a device becomes idle (its peeks dormant, protocol.md decision 9), from its last
    sync seen here (``local_ms``, exact) and the last one stored by any instance
    (``stored_ms``, up to ``idle_timeout / 4`` older than the sync it stands for: see
    :func:`store_sync_due`, so it counts that much longer). ``None``: never seen."""
    at = [
        *([local_ms + idle_timeout_ms] if local_ms is not None else []),
        *([stored_ms + idle_timeout_ms + idle_timeout_ms // 4] if stored_ms is not None else []),
    ]
    return max(at, default=None)
