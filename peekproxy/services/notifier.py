"""Wake-ups for long-polling syncs: a waiter registers for its rooms and its device, and is
woken by the first change to any of them (no polling loops). On shutdown :meth:`Notifier.drain`
wakes every waiter, and every later one at once: long-polls answer without waiting."""

from __future__ import annotations

from collections.abc import Iterable

import trio

__all__ = ["Notifier"]


class Notifier:
    """``notify_room(room_id)`` / ``notify_device(key)`` wake every waiter registered for it."""

    def __init__(self) -> None:
        self._by_room: dict[str, set[trio.Event]] = {}
        self._by_device: dict[tuple[str, str], set[trio.Event]] = {}
        self._draining = trio.Event()

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` was called: long-polls must answer now."""
        return self._draining.is_set()

    def drain(self) -> None:
        """The daemon is stopping (SIGTERM): wake every waiter now, and make every later
        :meth:`register` return an event already set. Idempotent."""
        self._draining.set()
        self.notify_all()

    async def wait_drain(self) -> None:
        """Return once :meth:`drain` is called (at once if it was)."""
        await self._draining.wait()

    def notify_room(self, room_id: str) -> None:
        for event in self._by_room.pop(room_id, ()):
            event.set()

    def notify_device(self, device: tuple[str, str]) -> None:
        for event in self._by_device.pop(device, ()):
            event.set()

    def notify_all(self) -> None:
        for waiters in (*self._by_room.values(), *self._by_device.values()):
            for event in waiters:
                event.set()
        self._by_room.clear()
        self._by_device.clear()

    def register(self, rooms: Iterable[str], device: tuple[str, str]) -> trio.Event:
        """An event set by the next change to ``rooms`` or ``device``. Register *before*
        looking for changes, so none is missed; call :meth:`unregister` when done. While
        draining the event is set already."""
        event = trio.Event()
        if self.draining:
            event.set()
            return event
        for room_id in rooms:
            self._by_room.setdefault(room_id, set()).add(event)
        self._by_device.setdefault(device, set()).add(event)
        return event

    def unregister(self, event: trio.Event, rooms: Iterable[str], device: tuple[str, str]) -> None:
        for room_id in rooms:
            waiters = self._by_room.get(room_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._by_room[room_id]
        waiters = self._by_device.get(device)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._by_device[device]
