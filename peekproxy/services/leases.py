"""This instance's subscription leases (docs/cluster.md): which remote rooms it follows
among several instances on one database. The rules are :mod:`peekproxy.core.cluster`'s;
:class:`~peekproxy.services.subscriptions.Subscriptions` asks :meth:`Leases.owns` before it
acts on a room and runs :meth:`Leases.renew` every third of the lease."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import trio

from peekproxy.core.cluster import Lease, fenced, lease_owner
from peekproxy.core.subscription import Subscription, SubState
from peekproxy.services.settings import ClusterSettings
from peekproxy.store import ReadTransaction, Storage

__all__ = ["POLL_S", "Leases"]

#: How often an instance that does not own a room looks whether its owner has set it up.
POLL_S = 0.1

log = logging.getLogger("peekproxy.peeks")


class Leases:
    """The leases this process holds, and until when it may act on each (ms, on
    ``clock_ms``; instances' clocks must agree to well under a lease). It records itself as
    their owner under :attr:`me`: ``settings.instance_name`` plus a random suffix new for
    each process (:func:`~peekproxy.core.cluster.lease_owner`, e.g. ``pp2/3f9a1c``), so two
    processes given the same name never act on or release each other's leases, and a
    restarted instance waits out the leases its previous process did not release."""

    def __init__(
        self, *, store: Storage, settings: ClusterSettings, clock_ms: Callable[[], int]
    ) -> None:
        self.store = store
        #: This process's name as a lease owner (``<instance_name>/<6 hex digits>``).
        self.me = lease_owner(settings.instance_name, secrets.token_hex(3))
        self.lease_ms = settings.lease_ms
        self.clock_ms = clock_ms
        self._until: dict[str, int] = {}

    def owns(self, room_id: str) -> bool:
        """Whether this instance follows ``room_id`` now (its lease held and not run out)."""
        return not fenced(self._until.get(room_id), self.clock_ms())

    def owned(self) -> list[str]:
        """The rooms this instance holds a live lease of, sorted."""
        return sorted(r for r in self._until if self.owns(r))

    async def take(self, room_id: str) -> bool:
        """Take (or renew) the room's lease if it is free, ours or expired; returns whether
        this instance now follows the room. Raises what the store raises."""
        now = self.clock_ms()
        until = now + self.lease_ms
        if await self.store.write(lambda tx: tx.take_lease(room_id, self.me, now, until)):
            self._until[room_id] = until
            return True
        self._until.pop(room_id, None)
        return False

    async def renew(self) -> list[str]:
        """Renew every lease this instance holds; returns the rooms it lost meanwhile (taken
        over by another instance). Raises what the store raises: the leases then run out
        here (fencing) unless a later renewal succeeds in time."""
        before = set(self._until)
        now = self.clock_ms()
        until = now + self.lease_ms
        kept = await self.store.write(lambda tx: tx.renew_leases(self.me, until))
        for room_id in kept:
            self._until[room_id] = until
        lost = sorted(before - set(kept))
        for room_id in lost:
            self._until.pop(room_id, None)
        if lost:
            log.warning("lost the lease of %d room(s) to other instances: %s", len(lost), lost)
        return lost

    async def release(self, room_id: str) -> None:
        """Give the room's lease up (its following is stopped: nothing to look after)."""
        self._until.pop(room_id, None)
        await self.store.write(lambda tx: tx.release_lease(room_id, self.me))

    async def release_all(self) -> int:
        """Give up every lease this instance holds (a clean stop: the other instances take
        the rooms over at their next look, not a whole lease later); returns how many. The
        subscriptions stay stored as they are, so the next owner renews the same peeks.
        Raises what the store raises."""
        self._until.clear()
        return len(await self.store.write(lambda tx: tx.renew_leases(self.me, 0)))

    async def stored(self, room_id: str) -> Subscription | None:
        """The room's subscription as stored (by whichever instance follows it)."""
        rows = await self.store.read(lambda tx: tx.load_subscriptions(room_id))
        return rows[0] if rows else None

    async def settled(self, room_id: str, wait_s: float) -> Subscription | None:
        """The room's stored subscription once its owner is no longer setting up its first
        following, polled every :data:`POLL_S` for at most ``wait_s`` seconds (then as it
        is). The owner is setting it up while the row is ``starting``, or while no row is
        stored yet but another instance holds a live lease of the room (it took the lease
        and is still peeking: the row is stored with the first snapshot).

        Returns ``None``: no row stored, and no instance holds a live lease of the room (its
        owner gave up or died before storing one), or the wait ran out. Raises what the
        store raises."""

        def read(tx: ReadTransaction) -> tuple[Subscription | None, Lease | None]:
            rows = tx.load_subscriptions(room_id)
            return (rows[0] if rows else None), tx.leases(room_id).get(room_id)

        with trio.move_on_after(wait_s):
            while True:
                sub, lease = await self.store.read(read)
                if sub is not None and sub.state is not SubState.STARTING:
                    return sub
                if sub is None and (lease is None or self.clock_ms() >= lease.expires_ms):
                    return None
                await trio.sleep(POLL_S)
        return await self.stored(room_id)
