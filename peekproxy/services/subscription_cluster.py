"""The part of :class:`~peekproxy.services.subscriptions.Subscriptions` that only matters
with several instances on one database (``[cluster]``, docs/cluster.md): which rooms this
instance follows (their leases, :class:`~peekproxy.services.leases.Leases`), taking a room
over, the view of rooms another instance follows, and ``wanted`` counted over the device
peeks of the whole cluster. Without ``[cluster]`` (``leases`` is ``None``) this instance
owns every room and nothing here reads the store."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from peekproxy.core import subscription as subs
from peekproxy.core.cluster import needs_follower
from peekproxy.core.subscription import Subscription, SubState
from peekproxy.services.errors import PeekError
from peekproxy.services.leases import Leases
from peekproxy.store import Storage

__all__ = ["OWNER_WAIT_S", "ClusterSubscriptions"]

log = logging.getLogger("peekproxy.peeks")

#: How long a peek on an instance that does not follow the room waits for its owner's first
#: following (as a ``/send`` waits for a peek being set up: ``SETUP_WAIT_S``), seconds.
OWNER_WAIT_S = 30.0


class ClusterSubscriptions:
    """Mixed into :class:`~peekproxy.services.subscriptions.Subscriptions` (which provides
    the attributes and methods declared below)."""

    store: Storage
    by_room: dict[str, Subscription]
    leases: Leases | None
    clock_ms: Callable[[], int]

    if TYPE_CHECKING:

        async def _save(self, sub: Subscription) -> None: ...

        @staticmethod
        def _resume(sub: Subscription, now_ms: int, spread_ms: int) -> Subscription: ...

        def room_lock(self, room_id: str) -> trio.Lock: ...

        def poke(self, room_id: str) -> None: ...

        async def unwanted(self, room_id: str, now_ms: int) -> None: ...

    async def _take_free(self, loaded: list[Subscription]) -> list[Subscription]:
        """Of the stored subscriptions, those whose lease this instance took (free or
        expired, and the room needs a follower); the others are only viewed."""
        assert self.leases is not None
        active = await self.store.read(lambda tx: tx.device_peek_counts())
        taken = []
        for sub in loaded:
            self.by_room[sub.room_id] = sub
            needed = needs_follower(sub, active.get(sub.room_id, (0, 0))[0])
            if needed and await self.leases.take(sub.room_id):
                taken.append(sub)
        return taken

    def owns(self, room_id: str) -> bool:
        """Whether this instance follows ``room_id`` (always, without ``[cluster]``)."""
        return self.leases is None or self.leases.owns(room_id)

    async def _take_over(self, room_id: str) -> bool:
        """Take the room's lease if it is free or expired; then its stored subscription is
        resumed here as after a restart (``subs.resumed``: the same peek renewed at once, or
        re-peeked with a gap if it lapsed meanwhile), not yet saved. Returns whether this
        instance follows the room now; if not, the local view is the stored row."""
        assert self.leases is not None
        taken = await self.leases.take(room_id)
        stored = await self.leases.stored(room_id)
        if stored is not None:
            self.by_room[room_id] = self._resume(stored, self.clock_ms(), 0) if taken else stored
        return taken

    async def adopt(self, room_id: str) -> bool:
        """Follow ``room_id`` if its lease is free or expired (its owner died, or stopped
        following it): resumed, saved, its task started. Returns whether it was taken."""
        async with self.room_lock(room_id):
            if not await self._take_over(room_id):
                return False
            sub = self.by_room.get(room_id)
            if sub is not None:
                await self._save(sub)
                log.info("took %s over (peek %s, %s)", room_id, sub.peek_id, sub.state)
        self.poke(room_id)
        return True

    async def _owner_view(self, room_id: str, wait_s: float) -> Subscription | None:
        """The subscription another instance follows, once its first following is set up
        (waiting for it at most ``wait_s`` seconds: :meth:`Leases.settled`). ``None``: no row
        stored and no live lease (its owner gave up or died before storing one): the caller
        may take the room over.

        Raises:
            PeekError: 403 the room is not peekable; 502 the owner could not follow it, or
                was still setting it up when the wait ran out.
        """
        assert self.leases is not None
        sub = await self.leases.settled(room_id, wait_s)
        if sub is None:
            return None
        if sub.state is SubState.STARTING:
            raise PeekError(502, "M_UNKNOWN", f"another instance is still peeking {room_id}")
        self.by_room[room_id] = sub
        if sub.state is SubState.ENDED:
            raise PeekError(403, "M_FORBIDDEN", sub.ended_reason or f"{room_id} is not peekable")
        if sub.state is SubState.FAILED:
            raise PeekError(502, "M_UNKNOWN", sub.ended_reason or f"could not peek {room_id}")
        return sub

    async def _follow_or_view(self, room_id: str) -> Subscription | None:
        """Before a device's peek of ``room_id`` (with ``[cluster]``, the room's lock held):
        ``None`` when this instance follows the room (it holds or took the lease), else the
        subscription its owner follows, waiting (at most :data:`OWNER_WAIT_S` in all) while
        the owner sets up its first following; a lease left without a row (its owner died or
        gave up meanwhile) is taken.

        Raises:
            PeekError: as :meth:`_owner_view`; 502 when the owner was still peeking the room
                when the wait ran out.
        """
        deadline = trio.current_time() + OWNER_WAIT_S
        while not self.owns(room_id) and not await self._take_over(room_id):
            left = deadline - trio.current_time()
            viewed = await self._owner_view(room_id, max(0.0, left))
            if viewed is not None:
                return viewed
            if left <= 0 or trio.current_time() >= deadline:
                raise PeekError(502, "M_UNKNOWN", f"another instance is still peeking {room_id}")
        return None

    async def match_wanted(self, room_id: str) -> None:
        """An owned room is wanted exactly while some device of the cluster peeks it (the
        device peeks table, not this instance's memory): started again, or let linger."""
        async with self.room_lock(room_id):
            sub = self.by_room.get(room_id)
            if sub is None or not self.owns(room_id):
                return
            active = await self._active_peeks(room_id)
            if bool(active) == sub.wanted:
                return
            if active:
                await self._save(subs.wanted(sub))
            else:
                await self.unwanted(room_id, self.clock_ms())
        self.poke(room_id)

    async def refresh(self, room_ids: Iterable[str]) -> None:
        """Before ``/send`` decides (with ``[cluster]``): rooms another instance may follow
        that the local view does not accept events for are read again from the store
        (waiting, as :meth:`wait_for_setups`, at most :data:`OWNER_WAIT_S` seconds, for a
        first following being set up: a ``starting`` row, or another instance's live lease
        with no row stored yet). Raises what the store raises."""
        if self.leases is None:
            return
        for room_id in room_ids:
            sub = self.by_room.get(room_id)
            if self.owns(room_id) or (sub is not None and sub.accepts_events):
                continue
            # A live lease and no row yet: the owner's first peek is in flight (the remote
            # may push its events before the owner has stored the snapshot): wait for it.
            stored = await self.leases.settled(room_id, OWNER_WAIT_S)
            if stored is not None:
                self.by_room[room_id] = stored

    async def _stop_unless_wanted(self, room_id: str) -> None:
        """Linger over: stop following the room, unless (with ``[cluster]``) a device of
        another instance peeks it now."""
        sub = self.by_room[room_id]
        if self.leases is not None and await self._active_peeks(room_id):
            await self._save(subs.wanted(sub))
        else:
            await self._save(subs.stopping(sub))

    async def _active_peeks(self, room_id: str) -> int:
        return await self.store.read(lambda tx: tx.device_peek_count(room_id))
