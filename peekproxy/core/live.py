"""The live window: the newest stream rows in memory, so that a woken ``/sync`` can be
answered without reading the database (the fan-out of one event to many long-polls).

Pure: no I/O, no clock. The store hands every committed write's new stream rows to
:meth:`LiveWindow.apply`, in commit order (see ``Storage.set_commit_hook``); the window keeps
the newest ``capacity`` room items (events, gaps, EDUs) and each known device's peeks.

:meth:`LiveWindow.answer` returns what :func:`~peekproxy.core.sync.build_sync` needs for one
device, or ``None`` when memory cannot answer for certain and the caller must read the
store. It answers only the common case of an incremental sync (protocol.md §2.5):

* the device's peeks are known and none changed after ``since`` (no new, restored, dormant
  or just-ended peek: those need current state or a ``leave`` entry);
* every position after ``since`` is still in the window, and ``since`` is not ahead of it;
* no peeked room has a gap after ``since`` or more events than the timeline limit (both make
  the timeline ``limited``, which needs the room's state).

Within those limits the answer equals what the store snapshot gives: the same events, the
same positions, and the same per-user ``m.typing`` / ``m.receipt`` rows. The users typing
now are kept per room outside the trimmed rows (a sync lists every user typing, however
long ago they started), from the window's start on: the service ends all typing when it
starts (``Services.run``), so nobody types before the window's start.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peekproxy.core.sync import FALLBACK_ROOM_VERSION, DevicePeek, RoomView, StreamItem
from peekproxy.core.sync_rules import quiet_from

__all__ = ["DEFAULT_CAPACITY", "LiveAnswer", "LiveWindow", "StreamChange"]

#: Room items kept in memory (events, gaps, EDUs of all rooms). About 1 KiB each for events.
DEFAULT_CAPACITY = 10_000

ROOM_KINDS = frozenset({"event", "gap", "ephemeral"})


@dataclass(frozen=True)
class StreamChange:
    """One committed row of the room stream, with what the sync needs of it.

    ``kind`` is ``event`` (``event_id``, ``pdu``, ``redacted``), ``gap``, ``ephemeral``
    (``edu_type``, ``content``) or ``device`` (``device`` = (user ID, device ID) and
    ``peek_state``; ``None`` when the row was overwritten in the same write).
    """

    pos: int
    room_id: str
    kind: str
    event_id: str | None = None
    pdu: Mapping[str, Any] | None = None
    redacted: bool = False
    edu_type: str | None = None
    content: Mapping[str, Any] | None = None
    device: tuple[str, str] | None = None
    peek_state: str | None = None


@dataclass(frozen=True)
class LiveAnswer:
    """What the window knows for one device at stream position ``upto``."""

    upto: int
    peeks: list[DevicePeek]
    #: Rooms with an active peek, sorted: what a waiting sync registers wake-ups for.
    active: list[str]
    #: A view of each active room with news in ``(since, upto]``; empty: nothing new.
    views: dict[str, RoomView] = field(default_factory=dict)
    #: Equal for two answers with the same news: ``upto`` and, per room with news, the
    #: position of its first new row. Devices woken by one event share one built response.
    key: tuple[Any, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.views)


class _Limited(Exception):
    """A room's timeline would be limited: only the store can answer."""


class LiveWindow:
    """The newest stream rows and the known devices' peeks (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        #: Every row up to here is applied; ``None`` until :meth:`start`.
        self.watermark: int | None = None
        #: Every room item after this position is in the window.
        self.complete_after = 0
        self._order: deque[tuple[int, str]] = deque()
        self._rooms: dict[str, deque[StreamChange]] = {}
        #: Each known device's peeks, one per room (a tuple: a few hundred bytes per device
        #: matter at 100,000 devices).
        self._devices: dict[tuple[str, str], tuple[DevicePeek, ...]] = {}
        #: Room views built since the last apply, by (room, first new position, limit); the
        #: devices woken by one change share them. ``None``: the timeline would be limited.
        self._views: dict[tuple[str, int, int], RoomView | None] = {}
        #: Per room, the users typing now and their latest ``m.typing`` row.
        self._typing: dict[str, dict[str, StreamChange]] = {}
        self.broken = False

    def start(self, upto: int) -> None:
        """Begin at stream position ``upto`` (the store's newest): the window is empty and
        complete after it."""
        self.watermark = upto
        self.complete_after = upto
        self._order.clear()
        self._rooms.clear()
        self._devices.clear()
        self._views.clear()
        self._typing.clear()

    def apply(self, changes: Iterable[StreamChange], upto: int) -> None:
        """Apply one committed write: its stream rows in position order, all after the
        watermark; ``upto`` becomes the watermark.

        Raises:
            ValueError: not started, or rows out of order (the window is then unusable and
                every :meth:`answer` is ``None``).
        """
        if self.watermark is None:
            raise ValueError("the live window was not started")
        last = self.watermark
        self._views.clear()
        for change in changes:
            if change.pos <= last:
                self.broken = True
                raise ValueError(f"stream row {change.pos} is not after {last}")
            last = change.pos
            if change.kind == "device":
                self._apply_device(change)
            elif change.kind in ROOM_KINDS:
                self._rooms.setdefault(change.room_id, deque()).append(change)
                self._order.append((change.pos, change.room_id))
                if change.edu_type == "m.typing":
                    self._apply_typing(change)
        if upto < last:
            self.broken = True
            raise ValueError(f"watermark {upto} is behind stream row {last}")
        self.watermark = upto
        while len(self._order) > self.capacity:
            pos, room_id = self._order.popleft()
            items = self._rooms[room_id]
            items.popleft()
            if not items:
                del self._rooms[room_id]
            self.complete_after = pos

    def _apply_typing(self, change: StreamChange) -> None:
        content = change.content or {}
        user_id = content.get("user_id")
        if not isinstance(user_id, str):
            return
        room = self._typing.setdefault(change.room_id, {})
        if content.get("typing") is True:
            room[user_id] = change
        else:
            room.pop(user_id, None)
            if not room:
                del self._typing[change.room_id]

    def _apply_device(self, change: StreamChange) -> None:
        if change.device is None or change.peek_state is None:
            return
        peeks = self._devices.get(change.device)
        if peeks is not None:
            changed = DevicePeek(sys.intern(change.room_id), change.peek_state, change.pos)
            others = tuple(peek for peek in peeks if peek.room_id != change.room_id)
            self._devices[change.device] = (*others, changed)

    def load_device(self, device: tuple[str, str], peeks: Iterable[DevicePeek], as_of: int) -> None:
        """Remember a device's peeks as read from the store at position ``as_of``. Ignored
        unless ``as_of`` is the watermark (a later change could otherwise be missing)."""
        if self.watermark is not None and as_of == self.watermark and not self.broken:
            latest: dict[str, DevicePeek] = {}
            for peek in peeks:
                known = latest.get(peek.room_id)
                if known is None or peek.changed_pos >= known.changed_pos:
                    latest[peek.room_id] = peek
            self._devices[device] = tuple(
                DevicePeek(sys.intern(p.room_id), sys.intern(p.state), p.changed_pos)
                for p in latest.values()
            )

    def forget_device(self, device: tuple[str, str]) -> None:
        self._devices.pop(device, None)

    def known_devices(self) -> int:
        return len(self._devices)

    def knows(self, device: tuple[str, str]) -> bool:
        """Whether the device's peeks are in memory."""
        return device in self._devices

    def quiet_from(self, device: tuple[str, str]) -> int | None:
        """:func:`~peekproxy.core.sync_rules.quiet_from` for a known device's peeks (``0``:
        it never peeked); ``None`` when it peeks, or the window does not know the device
        (or is unusable). Up to :attr:`watermark`: a later change of its peeks is not in it."""
        peeks = self._devices.get(device)
        if peeks is None or self.watermark is None or self.broken:
            return None
        return quiet_from(peeks)

    def answer(
        self,
        device: tuple[str, str],
        since: int,
        *,
        timeline_limit: int,
        room_version_of: Callable[[str], str | None],
    ) -> LiveAnswer | None:
        """The device's incremental sync from ``since`` out of memory, or ``None`` when
        only the store can answer (see the module docstring). ``room_version_of`` gives a
        room's version (``None``: unknown, shown with ``FALLBACK_ROOM_VERSION`` as the store
        does), for showing redacted events."""
        upto = self.watermark
        peeks = self._unchanged_peeks(device, since)
        if upto is None or peeks is None:
            return None
        active = sorted(peek.room_id for peek in peeks if peek.state == "active")
        limit = max(0, timeline_limit)
        views: dict[str, RoomView] = {}
        key: list[tuple[str, int]] = []
        for room_id in active:
            newer = self._newer(room_id, since)
            if not newer:
                continue
            memo = (room_id, newer[0].pos, limit)
            if memo in self._views:
                view = self._views[memo]
            else:
                try:
                    view = self._room_view(room_id, newer, limit, room_version_of(room_id))
                except _Limited:
                    view = None
                self._views[memo] = view
            if view is None:
                return None
            views[room_id] = view
            key.append((room_id, newer[0].pos))
        return LiveAnswer(
            upto=upto,
            peeks=list(peeks),
            active=active,
            views=views,
            key=(upto, tuple(key)),
        )

    def limited_views(
        self, device: tuple[str, str], since: int, timeline_limit: int
    ) -> tuple[tuple[str, int, int], ...] | None:
        """When :meth:`answer` gave ``None`` for this device only because rooms' timelines
        would be limited (a gap, or more new events than the limit: such a view needs the
        room's current state, which only the store has): those views' keys, which the
        devices woken by the same change share. ``None`` for any other reason (then every
        such device reads the store on its own)."""
        peeks = self._unchanged_peeks(device, since)
        if peeks is None:
            return None
        limit = max(0, timeline_limit)
        limited = []
        for peek in peeks:
            newer = self._newer(peek.room_id, since) if peek.state == "active" else []
            if newer:
                memo = (peek.room_id, newer[0].pos, limit)
                if memo not in self._views:
                    return None
                if self._views[memo] is None:
                    limited.append(memo)
        return tuple(limited) or None

    def remember_views(
        self,
        memos: Iterable[tuple[str, int, int]],
        views: Mapping[str, RoomView],
        *,
        as_of: int,
    ) -> None:
        """Keep the store's ``views`` (by room ID) in place of the limited views of
        ``memos`` (:meth:`limited_views`' keys), read as of stream position ``as_of``: the
        other devices woken by the same change are then answered from memory with them.
        Only while nothing was applied since (``as_of`` is the watermark: the memo is
        cleared by every apply)."""
        if as_of != self.watermark or self.broken:
            return
        for memo in memos:
            view = views.get(memo[0])
            if view is not None and memo in self._views and self._views[memo] is None:
                self._views[memo] = view

    def _unchanged_peeks(
        self, device: tuple[str, str], since: int
    ) -> tuple[DevicePeek, ...] | None:
        """The device's peeks when memory can answer its sync from ``since``: the window
        knows the device and holds every row after ``since``, and no peek changed after it
        or is dormant; else ``None``."""
        upto = self.watermark
        peeks = self._devices.get(device)
        if upto is None or self.broken or peeks is None or not self.complete_after <= since <= upto:
            return None
        for peek in peeks:
            if peek.changed_pos > since or peek.state not in ("active", "ended", "joined"):
                return None
        return peeks

    def _newer(self, room_id: str, since: int) -> list[StreamChange]:
        """The room's rows after ``since``, oldest first."""
        items = self._rooms.get(room_id)
        if not items or items[-1].pos <= since:
            return []
        newer: list[StreamChange] = []
        for item in reversed(items):
            if item.pos <= since:
                break
            newer.append(item)
        newer.reverse()
        return newer

    def _room_view(
        self, room_id: str, newer: list[StreamChange], limit: int, room_version: str | None
    ) -> RoomView:
        """The view of a room's rows ``newer`` (all after the device's ``since``).

        Raises:
            _Limited: the timeline would be limited (a gap, or too many events).
        """
        recent: list[StreamItem] = []
        events: dict[str, Mapping[str, Any]] = {}
        redacted: set[str] = set()
        # Who was typing before ``since`` (the rows after it are among ``newer``).
        ephemeral: list[tuple[str, Mapping[str, Any], int]] = [
            ("m.typing", row.content or {}, row.pos)
            for row in self._typing.get(room_id, {}).values()
            if row.pos < newer[0].pos
        ]
        for item in newer:
            if item.kind == "gap":
                raise _Limited
            if item.kind == "ephemeral":
                if item.edu_type is not None:
                    ephemeral.append((item.edu_type, item.content or {}, item.pos))
                continue
            if item.event_id is None or item.pdu is None:
                raise _Limited  # not expected: let the store answer
            recent.append(StreamItem(item.pos, "event", item.event_id))
            events[item.event_id] = item.pdu
            if item.redacted:
                redacted.add(item.event_id)
        if len(recent) > limit:
            raise _Limited
        ephemeral.sort(key=lambda row: row[2])
        return RoomView(
            room_id=room_id,
            room_version=room_version or FALLBACK_ROOM_VERSION,
            recent=recent,
            has_earlier=False,
            state_ids={},
            events=events,
            redacted=frozenset(redacted),
            ephemeral=ephemeral,
        )
