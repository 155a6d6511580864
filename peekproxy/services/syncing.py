"""Device peeks (MSC2753) and their ``/sync`` long-polls.

A device peeks a room (:meth:`Syncing.peek`): the room is resolved
(:class:`~peekproxy.services.directory.RoomDirectory`) and followed through
:class:`~peekproxy.services.subscriptions.Subscriptions`, and the device peek stored; an
unpeek ends it (the room is released when no device wants it). ``/sync``
(:meth:`Syncing.sync`) registers wake-ups (:class:`~peekproxy.services.notifier.Notifier`)
and answers from the live window of the newest stream rows (:mod:`peekproxy.core.live`) when
it can, else from a store snapshot, with :func:`peekproxy.core.sync.build_sync`. A device
that stops syncing for ``idle_timeout`` has its peeks made dormant (the idle reaper,
protocol.md decision 9); its next sync restores them (the rooms followed again, with a gap).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import trio

from peekproxy.core.identifiers import InvalidIdentifier, RoomId
from peekproxy.core.live import LiveAnswer, LiveWindow, StreamChange
from peekproxy.core.outcomes import candidate_servers
from peekproxy.core.sync import InvalidToken, SyncSnapshot, build_sync, decode_token
from peekproxy.metrics import SYNC_ANSWERS, WAKE_SECONDS
from peekproxy.outage import OUTAGE, retry_store_errors, store_unavailable_in
from peekproxy.services.directory import RoomDirectory
from peekproxy.services.errors import PeekError
from peekproxy.services.idle_reaper import IdleReaper
from peekproxy.services.notifier import Notifier
from peekproxy.services.settings import PeekSettings, now_ms
from peekproxy.services.subscriptions import Subscriptions
from peekproxy.store import ReadTransaction, Storage, WriteTransaction

__all__ = ["Syncing"]

log = logging.getLogger("peekproxy.peeks")


class Syncing(IdleReaper):
    """Device peeks, ``/sync`` long-polls, dormant restore and the idle reaper."""

    def __init__(
        self,
        *,
        store: Storage,
        directory: RoomDirectory,
        subscriptions: Subscriptions,
        notifier: Notifier,
        settings: PeekSettings,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.directory = directory
        self.subscriptions = subscriptions
        self.notifier = notifier
        self.settings = settings
        self.clock_ms = clock_ms
        self._device_locks: dict[tuple[str, str], trio.Lock] = {}
        #: Last /sync (or peek) of each device with peeks, ms; for the idle drop.
        self._seen: dict[tuple[str, str], int] = {}
        #: (seen at, device) for each device in _seen, the earliest first; an entry may be
        #: older than _seen says (the device synced again): the reaper then pushes it again.
        self._idle_heap: list[tuple[int, tuple[str, str]]] = []
        self._seen_changed = trio.Event()
        #: With ``[cluster]``: each device's last sync as this instance last stored it (ms).
        self._stored: dict[tuple[str, str], int] = {}
        #: The rooms each device's last sync watched, to register wake-ups before reading.
        self._watched: dict[tuple[str, str], list[str]] = {}
        #: The newest stream rows in memory: most woken syncs are answered from here.
        self.live = LiveWindow()
        #: The last response built from the window, and what it answered (read-only: the
        #: devices woken together share it).
        self._built_key: tuple[Any, ...] | None = None
        self._built: dict[str, Any] = {}
        #: When the last write that brought stream rows committed (perf_counter, s).
        self._committed_at = 0.0
        #: Store reads in flight of limited room views that woken devices share, by the
        #: views' keys (:meth:`_read_snapshot`).
        self._reading: dict[tuple[tuple[str, int, int], ...], trio.Event] = {}

    async def open_live_window(self) -> None:
        """Feed the live window from every write's new stream rows (the store's commit
        hook), starting at the newest row. Call once, before anything else writes."""
        self.store.set_commit_hook(self._read_changes, self._apply_changes)
        await self.store.write(lambda tx: None)  # starts the live window at the newest row

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the idle clock of every device with an active peek, then reap idle devices
        until cancelled."""
        now = self.clock_ms()
        if self.settings.cluster is not None:  # several instances: reap from the store
            await self.store.write(lambda tx: tx.record_unsynced_devices(now))
            task_status.started()
            await self._reap_stored(self.settings.cluster.lease_ms)
            return
        active = await self.store.read(lambda tx: tx.active_devices())
        for device in active:  # the idle clock restarts with the daemon
            self._mark_seen(device, now)
        task_status.started()
        await retry_store_errors(self.store.ping, "the idle reaper", self._reap_idle)

    def _read_changes(self, tx: ReadTransaction) -> tuple[list[StreamChange], int]:
        # In the writer thread, inside the write's transaction; the watermark only moves in
        # _apply_changes, which runs before the next write starts.
        return tx.stream_changes(self.live.watermark)

    def _apply_changes(self, result: tuple[list[StreamChange], int]) -> None:
        changes, upto = result
        self._wake(changes)
        try:
            if self.live.watermark is None:
                self.live.start(upto)
            else:
                self.live.apply(changes, upto)
            if changes:
                self._committed_at = time.perf_counter()
        except ValueError:
            log.exception("the live window is out of step: syncs read the database from now on")

    def _wake(self, changes: list[StreamChange]) -> None:
        """Wake the long-polls waiting on the changed rooms and devices: rows another
        instance committed (PostgreSQL) wake no one else here. Local writers notify too; the
        duplicates are harmless. Within a :meth:`Notifier.holding` block (a federation
        ``/send``) these wake-ups wait for its answer, as the writer's own do."""
        for change in changes:
            self.notifier.notify_room(change.room_id)
            if change.device is not None:
                self.notifier.notify_device(change.device)

    async def peek(
        self, user_id: str, device_id: str, room_id_or_alias: str, hints: Sequence[str] = ()
    ) -> str:
        """Start (or keep) ``device_id``'s peek of a room; returns the room ID once the room
        is subscribed and stored.

        Raises:
            PeekError: with the status and errcode the client should get (protocol.md
                decision 6): 400 malformed, 403 not peekable, 404 unknown, 502 no server.
        """
        room_id, alias_servers = await self.directory.resolve(room_id_or_alias)
        candidates = tuple(candidate_servers(hints, alias_servers, room_id))
        device_lock = self._device_locks.setdefault((user_id, device_id), trio.Lock())
        async with device_lock:  # the per-device cap is checked and applied atomically
            return await self._peek_locked(user_id, device_id, room_id, candidates)

    async def peek_with_expiry(
        self, user_id: str, device_id: str, room_id_or_alias: str, hints: Sequence[str] = ()
    ) -> tuple[str, int]:
        """:meth:`peek`, and the peek's ``peek_expiry_ts`` (ms since the epoch; MSC2753
        ``peek_room`` answer, protocol.md decision 5): idle drop (decision 9) makes a device's
        peeks dormant after ``idle_timeout_ms`` without a sync, and each sync keeps them alive,
        so this is when the peek lapses if the device never syncs. Raises as :meth:`peek`."""
        room_id = await self.peek(user_id, device_id, room_id_or_alias, hints)
        return room_id, self.clock_ms() + self.settings.idle_timeout_ms

    async def _peek_locked(
        self, user_id: str, device_id: str, room_id: str, candidates: tuple[str, ...]
    ) -> str:
        current = await self.store.read(
            lambda tx: tx.device_peek_state(user_id, device_id, room_id)
        )
        if current != "active":
            count = await self.store.read(lambda tx: tx.device_peeks_of_device(user_id, device_id))
            cap = self.settings.live.max_peeks_per_device
            if count >= cap:
                raise PeekError(
                    403,
                    "M_RESOURCE_LIMIT_EXCEEDED",
                    f"a device may peek at most {cap} rooms; unpeek some first",
                )
        async with self.subscriptions.room_lock(room_id):
            sub = await self.subscriptions.want(room_id, candidates)
            if current != "active":
                # Only a new (or dormant, or ended) peek moves the device peek: its
                # changed_pos makes the next sync show the room afresh. Peeking again
                # changes nothing a client sees (acceptance scenario 9).
                now = self.clock_ms()
                await self.store.write(
                    lambda tx: tx.set_device_peek(user_id, device_id, room_id, "active", now)
                )
        self.subscriptions.poke(room_id)
        self.notifier.notify_room(room_id)
        self.notifier.notify_device((user_id, device_id))
        self._mark_seen((user_id, device_id))
        await self._record_sync((user_id, device_id))
        log.info("%s/%s peeks %s via %s", user_id, device_id, room_id, sub.server)
        return room_id

    async def unpeek(self, user_id: str, device_id: str, room_id: str) -> None:
        """End a device's peek, active or dormant; its next sync shows the room in
        ``rooms.leave`` (protocol.md decision 7, with its errors).

        Raises:
            PeekError: 404 M_NOT_FOUND never peeked / unknown room; 400 M_BAD_STATE known
                room this device is not peeking; 400 M_INVALID_PARAM not a room ID.
        """
        try:
            RoomId.parse(room_id)
        except InvalidIdentifier as e:
            raise PeekError(400, "M_INVALID_PARAM", str(e)) from None
        async with self.subscriptions.room_lock(room_id):
            state = await self.store.read(
                lambda tx: tx.device_peek_state(user_id, device_id, room_id)
            )
            if state is None:
                known = self.subscriptions.get(room_id)
                if known is not None and known.room_version is not None:
                    raise PeekError(400, "M_BAD_STATE", f"this device is not peeking {room_id}")
                raise PeekError(404, "M_NOT_FOUND", f"{room_id} was never peeked")
            if state in ("ended", "joined"):
                raise PeekError(400, "M_BAD_STATE", f"this device is not peeking {room_id}")
            # An active peek, or a dormant one (its device went idle, decision 9): both end
            # here, and the room goes to rooms.leave rather than being restored.
            now = self.clock_ms()

            def end(tx: WriteTransaction) -> int:
                tx.set_device_peek(user_id, device_id, room_id, "ended", now)
                return tx.device_peek_count(room_id)

            remaining = await self.store.write(end)
            if remaining == 0:
                await self.subscriptions.unwanted(room_id, now)
        self.subscriptions.poke(room_id)
        self.notifier.notify_room(room_id)
        self.notifier.notify_device((user_id, device_id))

    async def end_joined(self, user_id: str, room_ids: Iterable[str]) -> list[str]:
        """The user joined these rooms on the homeserver (the front's ``/sync`` saw them in
        ``rooms.join``): end every peek of them by any of the user's devices **without** a
        ``rooms.leave`` entry (state ``joined``, never shown again; docs/front.md). A room no
        device peeks any more is released (linger, then the remote peek is stopped).
        Returns the rooms whose peeks ended, sorted. Rooms peekproxy does not follow are
        skipped without a store read, rooms only others peek with one read."""
        ended = []
        for room_id in sorted(set(room_ids)):
            if self.subscriptions.get(room_id) is None:
                continue
            peeks = await self.store.read(
                lambda tx: tx.user_room_peeks(user_id, room_id)  # noqa: B023
            )
            if not any(state in ("active", "dormant") for _, state in peeks):
                continue  # a read, not a write, for the joined rooms others peek
            async with self.subscriptions.room_lock(room_id):
                now = self.clock_ms()

                def join(
                    tx: WriteTransaction, room_id: str = room_id, now: int = now
                ) -> tuple[list[str], int]:
                    devices = [
                        device
                        for device, state in tx.user_room_peeks(user_id, room_id)
                        if state in ("active", "dormant")
                    ]
                    for device_id in devices:
                        tx.set_device_peek(user_id, device_id, room_id, "joined", now)
                    return devices, tx.device_peek_count(room_id)

                devices, remaining = await self.store.write(join)
                if not devices:
                    continue
                if remaining == 0:
                    await self.subscriptions.unwanted(room_id, now)
            ended.append(room_id)
            log.info("%s joined %s: %d device peek(s) of it end", user_id, room_id, len(devices))
            self.subscriptions.poke(room_id)
            self.notifier.notify_room(room_id)
            for device_id in devices:
                self.notifier.notify_device((user_id, device_id))
        return ended

    # -- /sync -------------------------------------------------------------------------------

    def quiet_position(self, user_id: str, device_id: str, delivered: int | None) -> int | None:
        """The newest stream position when memory knows that the device's peek sync shows
        nothing from ``delivered`` (the peek position it was last given; ``None``: unknown)
        up to it: the device never peeked, or every peek of it ended or was joined by
        ``delivered`` (:func:`~peekproxy.core.sync_rules.quiet_from`). ``None`` otherwise:
        it peeks, or the live window does not know the device. A sync from the returned
        position shows any peek that starts after it, afresh."""
        floor = self.live.quiet_from((user_id, device_id))
        if floor is None or (delivered or 0) < floor:
            return None
        return self.live.watermark

    async def sync(
        self,
        user_id: str,
        device_id: str,
        *,
        since: str | None,
        timeout_ms: int,
        full_state: bool = False,
        timeline_limit: int = 10,
    ) -> dict[str, Any]:
        """:meth:`_sync`, save that the database unreachable meanwhile
        (:class:`~peekproxy.store.StoreUnavailable`, issue 16) ends a sync with a ``since``
        token at once with nothing new: ``next_batch`` its ``since`` (valid on every
        instance, as a drained answer's), ``peekproxy_sync_answers{source="store_unavailable"}``.

        Raises:
            StoreUnavailable: for an initial sync (no ``since``): the API answers 503.
            PeekError: as :meth:`_sync`.
        """
        try:
            return await self._sync(
                user_id,
                device_id,
                since=since,
                timeout_ms=timeout_ms,
                full_state=full_state,
                timeline_limit=timeline_limit,
            )
        except Exception as e:
            unavailable = store_unavailable_in(e)
            if since is None or unavailable is None:
                raise
            OUTAGE.failed("a /sync", unavailable)
            SYNC_ANSWERS.labels("store_unavailable").inc()
            position = decode_token(since)  # _sync decoded it before any store call
            return build_sync(
                since=position,
                upto=position,
                peeks=(),
                rooms={},
                now_ms=self.clock_ms(),
                section=self.settings.sync_section,
            )

    async def _sync(
        self,
        user_id: str,
        device_id: str,
        *,
        since: str | None,
        timeout_ms: int,
        full_state: bool = False,
        timeline_limit: int = 10,
    ) -> dict[str, Any]:
        """``{next_batch, rooms: {peek, leave}}`` for one device (MSC2753). The caller must
        not modify it: devices woken by the same change share one response.

        Long-polls up to ``timeout_ms`` for something new for this device. A device that was
        idle has its dormant peeks restored first (the remote peek again, with a gap). While
        the daemon drains (:meth:`Notifier.drain`, SIGTERM) it answers at once with what
        there is, often nothing: its ``next_batch`` stays valid after a restart (stream
        positions are stored), and no dormant peek is restored then.

        Raises:
            PeekError: 400 M_INVALID_PARAM for a token this server did not issue.
        """
        device = (user_id, device_id)
        self._mark_seen(device)
        await self._record_sync(device)
        try:
            position = decode_token(since) if since else None
        except InvalidToken:
            raise PeekError(400, "M_INVALID_PARAM", f"unknown since token {since!r}") from None
        deadline = trio.current_time() + max(0, timeout_ms) / 1000
        watched = self._watched.get(device, [])
        restored = False
        live: LiveAnswer | None = None
        woke: float | None = None  # the commit that woke this long-poll (perf_counter)
        while True:
            # Register for wake-ups first, then look: no change can slip in between.
            registered = watched
            event = self.notifier.register(registered, device)
            try:
                live = None
                if position is not None and not full_state:
                    live = self.live.answer(
                        device,
                        position,
                        timeline_limit=timeline_limit,
                        room_version_of=self.subscriptions.room_version_of,
                    )
                shared = None
                if live is None and position is not None and not full_state:
                    shared = self.live.limited_views(device, position, timeline_limit)
                    reading = self._reading.get(shared) if shared is not None else None
                    if reading is not None:  # another woken device reads these views:
                        await reading.wait()  # then look again (in memory now, mostly)
                        continue
                if live is not None:
                    active, changed = live.active, live.changed
                else:
                    snapshot = await self._read_snapshot(
                        user_id, device_id, position, full_state, timeline_limit, shared
                    )
                    dormant = [p.room_id for p in snapshot.peeks if p.state == "dormant"]
                    if dormant and not restored and not self.notifier.draining:
                        restored = True
                        # Shielded: a sync cancelled meanwhile (the front's homeserver part
                        # answered first, a client gone) must not leave a re-peek half done.
                        with trio.CancelScope(shield=True):
                            await self._restore_dormant(user_id, device_id, dormant)
                        continue  # the restored peeks changed what there is to show
                    self.live.load_device(device, snapshot.peeks, as_of=snapshot.upto)
                    active, changed = snapshot.active, snapshot.changed
                if active != watched:
                    watched = active
                    self._watched[device] = watched
                    continue  # registered for the wrong rooms: register again and look again
                remaining = deadline - trio.current_time()
                if changed or remaining <= 0 or self.notifier.draining:
                    break
                waited = time.perf_counter()
                with trio.move_on_after(remaining):
                    await event.wait()
                woke = (
                    self._committed_at if event.is_set() and self._committed_at > waited else None
                )
            finally:
                self.notifier.unregister(event, registered, device)
        self._mark_seen(device)
        if live is not None and position is not None:
            SYNC_ANSWERS.labels("memory").inc()
            return _woken(woke, self._built_answer(live, position, timeline_limit))
        SYNC_ANSWERS.labels("store").inc()
        upto = snapshot.upto
        if position is not None and position > upto:
            raise PeekError(400, "M_INVALID_PARAM", f"since token {since!r} is from the future")
        answer: dict[str, Any] = build_sync(
            since=position,
            upto=upto,
            peeks=snapshot.peeks,
            rooms=snapshot.views,
            timeline_limit=timeline_limit,
            full_state=full_state,
            now_ms=self.clock_ms(),
            section=self.settings.sync_section,
        )
        return _woken(woke, answer)

    async def _read_snapshot(
        self,
        user_id: str,
        device_id: str,
        since: int | None,
        full_state: bool,
        timeline_limit: int,
        shared: tuple[tuple[str, int, int], ...] | None,
    ) -> SyncSnapshot:
        """The device's sync snapshot from the store. ``shared``: the keys of the limited
        room views it reads for every device woken by the same change
        (:meth:`LiveWindow.limited_views`): they wait for this read, which leaves the views
        in the live window (issue 17: a 50-event transaction woke 100 devices, and each read
        the store and built its answer alone)."""
        if shared is not None:
            self._reading[shared] = trio.Event()
        try:
            snapshot = await self.store.read(
                lambda tx: tx.sync_snapshot(
                    user_id=user_id,
                    device_id=device_id,
                    since=since,
                    full_state=full_state,
                    limit=timeline_limit,
                )
            )
            if shared is not None:
                self.live.remember_views(shared, snapshot.views, as_of=snapshot.upto)
            return snapshot
        finally:
            if shared is not None:
                self._reading.pop(shared).set()

    def _built_answer(self, live: LiveAnswer, since: int, timeline_limit: int) -> dict[str, Any]:
        """The sync response for a window answer. The devices woken by one change get the
        same news: they share one built response, for up to a second (``unsigned.age`` as
        of the first)."""
        key = (live.key, timeline_limit, self.clock_ms() // 1000)
        if self._built_key != key:
            self._built_key = key
            self._built = build_sync(
                since=since,
                upto=live.upto,
                peeks=live.peeks,
                rooms=live.views,
                timeline_limit=timeline_limit,
                full_state=False,
                now_ms=self.clock_ms(),
                section=self.settings.sync_section,
            )
        return self._built

    async def _restore_dormant(self, user_id: str, device_id: str, room_ids: list[str]) -> None:
        """Make the device's dormant peeks of ``room_ids`` active again, re-peeking the rooms
        no other device kept alive (with a gap)."""
        for room_id in room_ids:
            async with self.subscriptions.room_lock(room_id):
                sub = self.subscriptions.get(room_id)
                # The lambdas run before the loop moves on (awaited at once): B023 cannot see it.
                state = await self.store.read(
                    lambda tx: tx.device_peek_state(user_id, device_id, room_id)  # noqa: B023
                )
                if sub is None or state != "dormant":  # unpeeked meanwhile: stays ended
                    continue
                try:
                    await self.subscriptions.restore(room_id)
                except PeekError as e:
                    log.warning(
                        "could not restore the peek of %s for %s/%s: %s",
                        room_id,
                        user_id,
                        device_id,
                        e.error,
                    )
                now = self.clock_ms()
                await self.store.write(
                    lambda tx: tx.set_device_peek(user_id, device_id, room_id, "active", now)  # noqa: B023
                )
            log.info("restored %s/%s's peek of %s after an idle drop", user_id, device_id, room_id)
            self.subscriptions.poke(room_id)


def _woken(committed_at: float | None, answer: dict[str, Any]) -> dict[str, Any]:
    """``answer``, its wake latency observed when a commit woke the long-poll (at
    ``committed_at``, perf_counter seconds): ``peekproxy_wake_latency_seconds``."""
    if committed_at is not None:
        WAKE_SECONDS.observe(time.perf_counter() - committed_at)
    return answer
