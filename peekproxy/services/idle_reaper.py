"""The idle reaper of device peeks (protocol.md decision 9), a part of
:class:`~peekproxy.services.syncing.Syncing`: a device that has not synced for
``peeks.idle_timeout`` has its peeks made dormant, and a room left with no active peek is
released. One instance alone keeps each device's last sync in memory (:meth:`_reap_idle`);
with ``[cluster]`` each device's last sync is also stored, coarsely, and every instance
reaps from the store (:meth:`_reap_stored`, docs/cluster.md), so none reaps a device that
syncs on another.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable

import trio

from peekproxy.core.cluster import idle_reap_at, renew_every_ms, store_sync_due
from peekproxy.core.live import LiveWindow
from peekproxy.outage import OUTAGE
from peekproxy.services.settings import PeekSettings
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.store import Storage, StoreError, WriteTransaction

__all__ = ["IdleReaper"]

log = logging.getLogger("peekproxy.peeks")


class IdleReaper:
    """The reaper's state and loops; :class:`~peekproxy.services.syncing.Syncing` sets the
    attributes below in its ``__init__``."""

    store: Storage
    settings: PeekSettings
    subscriptions: Subscriptions
    live: LiveWindow
    clock_ms: Callable[[], int]
    #: Last /sync (or peek) of each device with peeks, ms; for the idle drop.
    _seen: dict[tuple[str, str], int]
    #: (seen at, device) for each device in _seen, the earliest first.
    _idle_heap: list[tuple[int, tuple[str, str]]]
    _seen_changed: trio.Event
    #: With ``[cluster]``: the last sync stored for each device, ms.
    _stored: dict[tuple[str, str], int]

    def _mark_seen(self, device: tuple[str, str], now_ms: int | None = None) -> None:
        """Restart the device's idle clock. O(log devices): only a device new to the reaper
        can need it to wake earlier than it planned. With ``[cluster]`` only the time is
        kept (:meth:`_reap_stored` reads it); the heap and its wake-up serve
        :meth:`_reap_idle` alone, which does not run then (the heap would only grow)."""
        now = self.clock_ms() if now_ms is None else now_ms
        new = device not in self._seen
        self._seen[device] = now
        if new and self.settings.cluster is None:
            entry = (now, device)
            heapq.heappush(self._idle_heap, entry)
            if self._idle_heap[0] is entry:
                self._seen_changed.set()
                self._seen_changed = trio.Event()

    async def _reap_idle(self) -> None:
        """Make the peeks of devices that have not synced for ``idle_timeout`` dormant
        (protocol.md decision 9); a room left with no active peek is then released."""
        idle = self.settings.idle_timeout_ms
        while True:
            heap = self._idle_heap
            while heap and heap[0][0] + idle <= self.clock_ms():
                _, device = heapq.heappop(heap)
                seen = self._seen.get(device)
                if seen is None:
                    continue
                if seen + idle > self.clock_ms():  # synced since: look again later
                    heapq.heappush(heap, (seen, device))
                    continue
                del self._seen[device]
                try:
                    await self._make_dormant(*device)
                except StoreError:
                    self._mark_seen(device, seen)  # still idle: reaped once the store answers
                    raise
            wake = heap[0][0] + idle if heap else None
            changed = self._seen_changed
            if wake is None:
                await changed.wait()
            else:
                with trio.move_on_after(max(0.0, (wake - self.clock_ms()) / 1000)):
                    await changed.wait()

    async def _record_sync(self, device: tuple[str, str]) -> None:
        """With ``[cluster]``: store the device's sync as its last one when the stored one
        is a quarter of the idle timeout old (:func:`~peekproxy.core.cluster.store_sync_due`),
        for the reaper of every instance. Marked as stored only once the write succeeded,
        so a failed write is tried again at the device's next sync. Raises what the store
        raises."""
        now = self.clock_ms()
        idle = self.settings.idle_timeout_ms
        if self.settings.cluster is None or not store_sync_due(self._stored.get(device), now, idle):
            return
        await self.store.write(lambda tx: tx.record_sync(*device, now))
        self._stored[device] = now

    async def _reap_stored(self, lease_ms: int) -> None:
        """With ``[cluster]``: every third of the lease, at most every quarter of the idle
        timeout, make the peeks of devices idle by their stored last sync dormant (whichever
        instance they synced on; :func:`~peekproxy.core.cluster.idle_reap_at`, this
        instance's own exact last sync counted too)."""
        idle = self.settings.idle_timeout_ms
        every_s = min(renew_every_ms(lease_ms), idle // 4) / 1000
        while True:
            now = self.clock_ms()
            try:
                candidates = await self.store.read(lambda tx: tx.idle_devices(now - idle))  # noqa: B023
                for user_id, device_id, stored in candidates:
                    at = idle_reap_at(self._seen.get((user_id, device_id)), stored, idle)
                    if at is not None and at <= self.clock_ms():
                        self._seen.pop((user_id, device_id), None)
                        self._stored.pop((user_id, device_id), None)
                        await self._make_dormant(user_id, device_id)
            except StoreError as e:  # one WARNING per outage; looked at again next time
                OUTAGE.failed("the idle reaper", e)
            await trio.sleep(every_s)

    async def _make_dormant(self, user_id: str, device_id: str) -> None:
        # An idle device leaves the live window; its next sync reads the store (and restores).
        self.live.forget_device((user_id, device_id))
        peeks = await self.store.read(lambda tx: tx.device_peeks(user_id, device_id))
        for room_id, state, _ in peeks:
            if state != "active":
                continue
            async with self.subscriptions.room_lock(room_id):
                now = self.clock_ms()

                def drop(tx: WriteTransaction, room_id: str = room_id, now: int = now) -> int:
                    tx.set_device_peek(user_id, device_id, room_id, "dormant", now)
                    return tx.device_peek_count(room_id)

                remaining = await self.store.write(drop)
                if remaining == 0:
                    await self.subscriptions.unwanted(room_id, now)
            log.info("%s/%s idle: its peek of %s is dormant", user_id, device_id, room_id)
            self.subscriptions.poke(room_id)
