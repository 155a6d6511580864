"""Wake-ups for long-polling syncs: a waiter registers for its rooms and its device, and is
woken by the first change to any of them (no polling loops). On shutdown :meth:`Notifier.drain`
wakes every waiter, and every later one at once: long-polls answer without waiting.

A federation ``/send`` holds its wake-ups (:meth:`Notifier.holding`) until its own answer has
gone out: a woken long-poll is a task of its own, and thousands of them woken first would
queue the transaction's answer behind their answers (issue 17), which holds up the sending
server's next transaction to us.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import trio

__all__ = ["HeldWakes", "Notifier"]


class HeldWakes:
    """The wake-ups a :meth:`Notifier.holding` block collected; :meth:`release` wakes them
    (once: later calls do nothing)."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.rooms: set[str] = set()
        self.devices: set[tuple[str, str]] = set()
        self.released = False

    def release(self) -> None:
        """Wake every room and device collected, and stop collecting."""
        if self.released:
            return
        self.released = True
        for room_id in self.rooms:
            self.notifier.notify_room(room_id)
        for device in self.devices:
            self.notifier.notify_device(device)


#: The hold of the running task (and of the tasks it starts: trio copies the context).
_HELD: ContextVar[HeldWakes | None] = ContextVar("peekproxy_held_wakes", default=None)


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

    @contextmanager
    def holding(self) -> Iterator[HeldWakes]:
        r"""Within the block, this task's (and its child tasks') :meth:`notify_room` and
        :meth:`notify_device` calls are collected instead of waking anyone; the caller
        :meth:`HeldWakes.release`\ s them once its answer is sent. If the block raises,
        they are released at once."""
        held = HeldWakes(self)
        token = _HELD.set(held)
        try:
            yield held
        except BaseException:
            held.release()
            raise
        finally:
            _HELD.reset(token)

    def _held(self) -> HeldWakes | None:
        held = _HELD.get()
        return held if held is not None and held.notifier is self and not held.released else None

    def notify_room(self, room_id: str, *, now: bool = False) -> None:
        """Wake the waiters of ``room_id`` (held, within :meth:`holding`, unless ``now``)."""
        held = None if now else self._held()
        if held is not None:
            held.rooms.add(room_id)
            return
        for event in self._by_room.pop(room_id, ()):
            event.set()

    def notify_device(self, device: tuple[str, str]) -> None:
        """Wake the waiters of ``device`` (held, within :meth:`holding`)."""
        held = self._held()
        if held is not None:
            held.devices.add(device)
            return
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
