"""The I/O shell around the peek core: remote subscriptions, device peeks, ``/send`` ingest.

One :class:`PeekService` per daemon. It owns a task per subscribed room that asks
:func:`peekproxy.core.subscription.plan` what to do and does it: PUT a peek through the
candidate servers, re-PUT it before it lapses, DELETE it when no device wants it any more
(after ``peeks.linger``), re-peek after a lapse (recording a gap). Client requests never wait
for a renewal or a DELETE; they wait only for the first PUT of a room nobody peeks yet.

Everything a remote server sends is checked (:func:`peekproxy.core.pdu.check_pdu`,
:func:`peekproxy.core.validation.validate_peek_response`) and stored before it is
acknowledged.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import trio

from peekproxy.core import subscription as subs
from peekproxy.core.backoff import backoff_delay
from peekproxy.core.events import compute_event_id, event_refs
from peekproxy.core.identifiers import InvalidIdentifier, RoomAlias, RoomId, UserId
from peekproxy.core.live import LiveAnswer, LiveWindow, StreamChange
from peekproxy.core.outcomes import (
    PeekAttemptFailure,
    PeekFailureKind,
    candidate_servers,
    classify_peek_error,
    new_peek_id,
    summarize_failures,
)
from peekproxy.core.pdu import check_pdu
from peekproxy.core.room_versions import KNOWN_ROOM_VERSIONS, UnknownRoomVersion, room_version
from peekproxy.core.subscription import Action, Subscription, SubState
from peekproxy.core.sync import (
    InvalidToken,
    build_sync,
    decode_token,
)
from peekproxy.core.unsupported import UnsupportedServers
from peekproxy.core.validation import (
    InvalidPeekResponse,
    ValidatedPeek,
    is_empty_renewal,
    peek_response_pdus,
    response_room_version,
    validate_peek_response,
)
from peekproxy.federation.client import FederationClient, FederationError, RemoteError, path_segment
from peekproxy.federation.keyring import Keyring
from peekproxy.metrics import SYNC_ANSWERS
from peekproxy.peeks import history
from peekproxy.peeks.notifier import Notifier
from peekproxy.store import ReadTransaction, Storage, WriteTransaction

__all__ = ["PeekError", "PeekService"]

log = logging.getLogger("peekproxy.peeks")

SUPPORTED_VERSIONS = sorted(KNOWN_ROOM_VERSIONS, key=int)
MAX_PDUS, MAX_EDUS = 50, 100
#: Events asked for per ``get_missing_events`` round, and at most this many rounds' worth
#: in one fill (of one room in one ``/send``, or of one renewal reply).
MISSING_EVENTS_LIMIT = 20
MISSING_EVENTS_MAX = 200
#: One fill (all its rounds together) may take this long, in seconds.
MISSING_EVENTS_TIMEOUT_S = 10.0
RATE_LIMIT_WAIT_MAX_MS = 10_000
#: One candidate may hold a new peek up this long (the room is locked meanwhile).
PEEK_PUT_TIMEOUT_S = 15.0
#: How long a ``/send`` waits for the peek of its room being set up meanwhile.
SETUP_WAIT_S = 30.0
#: Retries of failed DELETEs of a room: 1 s doubling to 5 min, ±20 % (re-peeks and renewals
#: back off in the subscription itself: ``subscription.RETRY_BACKOFF_MS``).
DELETE_BACKOFF_S = (1.0, 300.0)
#: A remote user stops typing this long after the last ``m.typing`` saying they type (the
#: EDU's ``timeout`` is not sent over federation). Synapse's receiving side uses the same
#: 60 s (``FEDERATION_TIMEOUT``) and its sending side repeats ``typing: true`` every 40 s.
TYPING_TIMEOUT_MS = 60_000


class PeekError(Exception):
    """A peek request failed; ``status``/``errcode``/``error`` go to the client as is."""

    def __init__(self, status: int, errcode: str, error: str, **extra: Any) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status, self.errcode, self.error, self.extra = status, errcode, error, extra


@dataclass(frozen=True)
class PeekSettings:
    linger_ms: int
    renewal_max_ms: int
    max_peeks_per_device: int
    max_remote_peeks: int
    idle_timeout_ms: int = 600_000
    sync_section: str = "peek"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _peek_path(room_id: str, peek_id: str) -> str:
    return f"/_matrix/federation/v1/peek/{path_segment(room_id)}/{path_segment(peek_id)}"


class PeekService:
    """Remote peek subscriptions and device peeks (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Storage,
        client: FederationClient,
        keyring: Keyring,
        settings: PeekSettings,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.store = store
        self.client = client
        self.keyring = keyring
        self.settings = settings
        self.clock_ms = clock_ms
        self.subscriptions: dict[str, Subscription] = {}
        self._changed: dict[str, trio.Event] = {}
        self._tasks: set[str] = set()
        self._room_locks: dict[str, trio.Lock] = {}
        #: /send is serialized per (origin, txnId) (idempotency) and per room (append order).
        self._txn_locks: dict[tuple[str, str], trio.Lock] = {}
        self._ingest_locks: dict[str, trio.Lock] = {}
        self._device_locks: dict[tuple[str, str], trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.notifier = Notifier()
        #: Last /sync (or peek) of each device with peeks, ms; for the idle drop.
        self._seen: dict[tuple[str, str], int] = {}
        #: (seen at, device) for each device in _seen, the earliest first; an entry may be
        #: older than _seen says (the device synced again): the reaper then pushes it again.
        self._idle_heap: list[tuple[int, tuple[str, str]]] = []
        self._seen_changed = trio.Event()
        #: The rooms each device's last sync watched, to register wake-ups before reading.
        self._watched: dict[tuple[str, str], list[str]] = {}
        #: The newest stream rows in memory: most woken syncs are answered from here.
        self.live = LiveWindow()
        #: The last response built from the window, and what it answered (read-only: the
        #: devices woken together share it).
        self._built_key: tuple[Any, ...] | None = None
        self._built: dict[str, Any] = {}
        #: Servers that showed they lack MSC2444: skipped by _establish for an hour.
        self.unsupported = UnsupportedServers()
        #: (expires at ms, room, user, stream position) per ``typing: true`` row stored.
        self._typing_heap: list[tuple[int, str, str, int]] = []
        self._typing_changed = trio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load subscriptions, resume them (renew at once; a lapse while down becomes a
        gap) and keep them going until cancelled."""
        now = self.clock_ms()
        self.store.set_commit_hook(self._read_changes, self._apply_changes)
        await self.store.write(lambda tx: None)  # starts the live window at the newest row
        # Typing does not outlive a restart (its expiry timers are in memory): whoever was
        # typing has stopped; a remote that still types says so again within 40 s.
        await self.store.write(
            lambda tx: [tx.stop_typing(r, u, p, now) for r, u, p in tx.typing_now()]
        )
        loaded = await self.store.read(lambda tx: tx.load_subscriptions())
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            spread = subs.resume_spread_ms(len(loaded))
            resumed = [self._resume(sub, now, spread) for sub in loaded]

            # One transaction: one fsync, not one per room.
            def save_all(tx: WriteTransaction) -> None:
                for sub in resumed:
                    tx.save_subscription(sub)

            await self.store.write(save_all)
            for sub in resumed:
                self.subscriptions[sub.room_id] = sub
                self._ensure_task(sub.room_id)
            if loaded:
                log.info("resumed %d subscriptions", len(loaded))
            active = await self.store.read(lambda tx: tx.active_devices())
            for user_id, device_id in active:  # the idle clock restarts with the daemon
                self._mark_seen((str(user_id), str(device_id)), now)
            nursery.start_soon(self._reap_idle)
            nursery.start_soon(self._expire_typing)
            task_status.started()
            await trio.sleep_forever()

    def _room_version_of(self, room_id: str) -> str | None:
        sub = self.subscriptions.get(room_id)
        return sub.room_version if sub is not None else None

    def _read_changes(self, tx: ReadTransaction) -> tuple[list[StreamChange], int]:
        # In the writer thread, inside the write's transaction; the watermark only moves in
        # _apply_changes, which runs before the next write starts.
        return tx.stream_changes(self.live.watermark)

    def _apply_changes(self, result: tuple[list[StreamChange], int]) -> None:
        changes, upto = result
        try:
            if self.live.watermark is None:
                self.live.start(upto)
            else:
                self.live.apply(changes, upto)
        except ValueError:
            log.exception("the live window is out of step: syncs read the database from now on")

    @staticmethod
    def _resume(sub: Subscription, now_ms: int, spread_ms: int) -> Subscription:
        # Renewals (and re-peeks) after a restart are spread out, each still in time.
        return subs.resumed(sub, now_ms=now_ms, draw=random.random(), spread_ms=spread_ms)

    def _ensure_task(self, room_id: str) -> None:
        if room_id in self._tasks or self._nursery is None:
            return
        self._tasks.add(room_id)
        self._nursery.start_soon(self._run_subscription, room_id)

    def _poke(self, room_id: str) -> None:
        event = self._changed.pop(room_id, None)
        if event is not None:
            event.set()
        self._ensure_task(room_id)

    def _lock(self, room_id: str) -> trio.Lock:
        return self._room_locks.setdefault(room_id, trio.Lock())

    async def _save(self, sub: Subscription) -> None:
        self.subscriptions[sub.room_id] = sub
        await self.store.write(lambda tx: tx.save_subscription(sub))

    # -- client-facing -----------------------------------------------------------------------

    async def resolve(self, room_id_or_alias: str) -> tuple[str, list[str]]:
        """A room ID, or an alias resolved over federation: (room ID, servers from the
        directory).

        Raises:
            PeekError: 400 malformed, 404 unknown alias, 502 directory unreachable.
        """
        try:
            if room_id_or_alias.startswith("#"):
                alias = RoomAlias.parse(room_id_or_alias)
            else:
                return str(RoomId.parse(room_id_or_alias)), []
        except InvalidIdentifier as e:
            raise PeekError(400, "M_INVALID_PARAM", str(e)) from None  # e names the value, cut
        server = str(alias.server_name)
        try:
            answer = await self.client.get_json(
                server, "/_matrix/federation/v1/query/directory", query={"room_alias": str(alias)}
            )
        except RemoteError as e:
            if e.status == 404:
                raise PeekError(404, "M_NOT_FOUND", f"{alias} not found on {server}") from None
            raise PeekError(
                502, "M_UNKNOWN", f"alias lookup at {server} failed: {e.reason}"
            ) from None
        except FederationError as e:
            raise PeekError(
                502, "M_UNKNOWN", f"alias lookup at {server} failed: {e.reason}"
            ) from None
        room_id = answer.get("room_id") if isinstance(answer, dict) else None
        servers = answer.get("servers") if isinstance(answer, dict) else None
        try:
            RoomId.parse(str(room_id))
        except InvalidIdentifier:
            raise PeekError(
                502, "M_UNKNOWN", f"{server} answered the alias lookup with no valid room_id"
            ) from None
        listed = [s for s in servers if isinstance(s, str)] if isinstance(servers, list) else []
        return str(room_id), [*listed, server]

    async def peek(
        self, user_id: str, device_id: str, room_id_or_alias: str, hints: Sequence[str] = ()
    ) -> str:
        """Start (or keep) ``device_id``'s peek of a room; returns the room ID once the room
        is subscribed and stored.

        Raises:
            PeekError: with the status and errcode the client should get (protocol.md
                decision 6): 400 malformed, 403 not peekable, 404 unknown, 502 no server.
        """
        room_id, alias_servers = await self.resolve(room_id_or_alias)
        candidates = tuple(candidate_servers(hints, alias_servers, room_id))
        device_lock = self._device_locks.setdefault((user_id, device_id), trio.Lock())
        async with device_lock:  # the per-device cap is checked and applied atomically
            return await self._peek_locked(user_id, device_id, room_id, candidates)

    async def _peek_locked(
        self, user_id: str, device_id: str, room_id: str, candidates: tuple[str, ...]
    ) -> str:
        current = await self.store.read(
            lambda tx: tx.device_peek_state(user_id, device_id, room_id)
        )
        if current != "active":
            count = await self.store.read(lambda tx: tx.device_peeks_of_device(user_id, device_id))
            if count >= self.settings.max_peeks_per_device:
                raise PeekError(
                    403,
                    "M_RESOURCE_LIMIT_EXCEEDED",
                    f"a device may peek at most {self.settings.max_peeks_per_device}"
                    " rooms; unpeek some first",
                )
        async with self._lock(room_id):
            sub = self.subscriptions.get(room_id)
            if sub is None:
                live = sum(
                    1
                    for s in self.subscriptions.values()
                    if s.wanted and s.state is not SubState.FAILED
                )
                if live >= self.settings.max_remote_peeks:
                    raise PeekError(
                        503,
                        "M_RESOURCE_LIMIT_EXCEEDED",
                        "this server peeks as many rooms as it may",
                    )
                sub = Subscription(room_id=room_id, candidates=candidates)
            sub = subs.wanted(sub, candidates)
            if not sub.has_remote_peek:
                try:
                    sub = await self._establish(sub, gap=sub.room_version is not None)
                except PeekError as e:
                    await self._after_failed_start(room_id, e)
                    raise
            await self._save(sub)
            if current != "active":
                # Only a new (or dormant, or ended) peek moves the device peek: its
                # changed_pos makes the next sync show the room afresh. Peeking again
                # changes nothing a client sees (acceptance scenario 9).
                now = self.clock_ms()
                await self.store.write(
                    lambda tx: tx.set_device_peek(user_id, device_id, room_id, "active", now)
                )
        self._poke(room_id)
        self.on_room_change(room_id)
        self.notifier.notify_device((user_id, device_id))
        self._mark_seen((user_id, device_id))
        log.info("%s/%s peeks %s via %s", user_id, device_id, room_id, sub.server)
        return room_id

    def on_room_change(self, room_id: str) -> None:
        """Something new was stored for ``room_id``: wake the syncs waiting on it."""
        self.notifier.notify_room(room_id)

    def _mark_seen(self, device: tuple[str, str], now_ms: int | None = None) -> None:
        """Restart the device's idle clock. O(log devices): only a device new to the reaper
        can need it to wake earlier than it planned."""
        now = self.clock_ms() if now_ms is None else now_ms
        new = device not in self._seen
        self._seen[device] = now
        if new:
            entry = (now, device)
            heapq.heappush(self._idle_heap, entry)
            if self._idle_heap[0] is entry:
                self._seen_changed.set()
                self._seen_changed = trio.Event()

    async def _after_failed_start(self, room_id: str, error: PeekError) -> None:
        """A device's peek failed. Devices already peeking the room keep their subscription
        retrying (it stays lapsed); otherwise nobody wants the room, and it does not count
        towards ``max_remote_peeks``."""
        sub = self.subscriptions[room_id]
        others = await self.store.read(lambda tx: tx.device_peek_count(room_id))
        if others and sub.state is SubState.FAILED and sub.room_version is not None:
            # Every candidate just failed: the room's task retries after the back-off.
            sub = subs.repeek_failed(
                replace(sub, wanted=True),
                now_ms=self.clock_ms(),
                draw=random.random(),
                not_before_ms=_retry_after(self.clock_ms(), error),
            )
        elif not others:
            sub = replace(sub, wanted=False)
        await self._save(sub)
        self._poke(room_id)

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
        async with self._lock(room_id):
            state = await self.store.read(
                lambda tx: tx.device_peek_state(user_id, device_id, room_id)
            )
            if state is None:
                known = self.subscriptions.get(room_id)
                if known is not None and known.room_version is not None:
                    raise PeekError(400, "M_BAD_STATE", f"this device is not peeking {room_id}")
                raise PeekError(404, "M_NOT_FOUND", f"{room_id} was never peeked")
            if state == "ended":
                raise PeekError(400, "M_BAD_STATE", f"this device is not peeking {room_id}")
            # An active peek, or a dormant one (its device went idle, decision 9): both end
            # here, and the room goes to rooms.leave rather than being restored.
            now = self.clock_ms()

            def end(tx: WriteTransaction) -> int:
                tx.set_device_peek(user_id, device_id, room_id, "ended", now)
                return tx.device_peek_count(room_id)

            remaining = await self.store.write(end)
            sub = self.subscriptions.get(room_id)
            if sub is not None and remaining == 0:
                await self._save(subs.unwanted(sub, now_ms=now, linger_ms=self.settings.linger_ms))
        self._poke(room_id)
        self.on_room_change(room_id)
        self.notifier.notify_device((user_id, device_id))

    # -- /sync -------------------------------------------------------------------------------

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
        """``{next_batch, rooms: {peek, leave}}`` for one device (MSC2753). The caller must
        not modify it: devices woken by the same change share one response.

        Long-polls up to ``timeout_ms`` for something new for this device. A device that was
        idle has its dormant peeks restored first (the remote peek again, with a gap).

        Raises:
            PeekError: 400 M_INVALID_PARAM for a token this server did not issue.
        """
        device = (user_id, device_id)
        self._mark_seen(device)
        try:
            position = decode_token(since) if since else None
        except InvalidToken:
            raise PeekError(400, "M_INVALID_PARAM", f"unknown since token {since!r}") from None
        deadline = trio.current_time() + max(0, timeout_ms) / 1000
        watched = self._watched.get(device, [])
        restored = False
        live: LiveAnswer | None = None
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
                        room_version_of=self._room_version_of,
                    )
                if live is not None:
                    active, changed = live.active, live.changed
                else:
                    snapshot = await self.store.read(
                        lambda tx: tx.sync_snapshot(
                            user_id=user_id,
                            device_id=device_id,
                            since=position,
                            full_state=full_state,
                            limit=timeline_limit,
                        )
                    )
                    dormant = [p.room_id for p in snapshot["peeks"] if p.state == "dormant"]
                    if dormant and not restored:
                        restored = True
                        await self._restore_dormant(user_id, device_id, dormant)
                        continue  # the restored peeks changed what there is to show
                    self.live.load_device(device, snapshot["peeks"], as_of=snapshot["upto"])
                    active, changed = snapshot["active"], snapshot["changed"]
                if active != watched:
                    watched = active
                    self._watched[device] = watched
                    continue  # registered for the wrong rooms: register again and look again
                remaining = deadline - trio.current_time()
                if changed or remaining <= 0:
                    break
                with trio.move_on_after(remaining):
                    await event.wait()
            finally:
                self.notifier.unregister(event, registered, device)
        self._mark_seen(device)
        if live is not None and position is not None:
            SYNC_ANSWERS.labels("memory").inc()
            return self._built_answer(live, position, timeline_limit)
        SYNC_ANSWERS.labels("store").inc()
        upto: int = snapshot["upto"]
        if position is not None and position > upto:
            raise PeekError(400, "M_INVALID_PARAM", f"since token {since!r} is from the future")
        answer: dict[str, Any] = build_sync(
            since=position,
            upto=upto,
            peeks=snapshot["peeks"],
            rooms=snapshot["views"],
            timeline_limit=timeline_limit,
            full_state=full_state,
            now_ms=self.clock_ms(),
            section=self.settings.sync_section,
        )
        return answer

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
            async with self._lock(room_id):
                sub = self.subscriptions.get(room_id)
                state = await self.store.read(
                    lambda tx: tx.device_peek_state(
                        user_id=user_id,
                        device_id=device_id,
                        room_id=room_id,  # noqa: B023
                    )
                )
                if sub is None or state != "dormant":  # unpeeked meanwhile: stays ended
                    continue
                sub = subs.wanted(sub)
                if not sub.has_remote_peek:
                    try:
                        sub = await self._establish(sub, gap=True)
                    except PeekError as e:
                        log.warning(
                            "could not restore the peek of %s for %s/%s: %s",
                            room_id,
                            user_id,
                            device_id,
                            e.error,
                        )
                        sub = self.subscriptions[room_id]
                        if e.status != 403:  # the room's task retries after the back-off
                            sub = subs.repeek_failed(
                                sub,
                                now_ms=self.clock_ms(),
                                draw=random.random(),
                                not_before_ms=_retry_after(self.clock_ms(), e),
                            )
                await self._save(sub)
                now = self.clock_ms()
                await self.store.write(
                    lambda tx: tx.set_device_peek(
                        user_id=user_id,
                        device_id=device_id,
                        room_id=room_id,  # noqa: B023
                        state="active",
                        now_ms=now,  # noqa: B023
                    )
                )
            log.info("restored %s/%s's peek of %s after an idle drop", user_id, device_id, room_id)
            self._poke(room_id)

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
                await self._make_dormant(*device)
            wake = heap[0][0] + idle if heap else None
            changed = self._seen_changed
            if wake is None:
                await changed.wait()
            else:
                with trio.move_on_after(max(0.0, (wake - self.clock_ms()) / 1000)):
                    await changed.wait()

    async def _make_dormant(self, user_id: str, device_id: str) -> None:
        # An idle device leaves the live window; its next sync reads the store (and restores).
        self.live.forget_device((user_id, device_id))
        peeks = await self.store.read(lambda tx: tx.device_peeks(user_id, device_id))
        for room_id, state, _ in peeks:
            if state != "active":
                continue
            async with self._lock(room_id):
                now = self.clock_ms()

                def drop(tx: WriteTransaction, room_id: str = room_id, now: int = now) -> int:
                    tx.set_device_peek(user_id, device_id, room_id, "dormant", now)
                    return tx.device_peek_count(room_id)

                remaining = await self.store.write(drop)
                sub = self.subscriptions.get(room_id)
                if sub is not None and remaining == 0:
                    await self._save(
                        subs.unwanted(sub, now_ms=now, linger_ms=self.settings.linger_ms)
                    )
            log.info("%s/%s idle: its peek of %s is dormant", user_id, device_id, room_id)
            self._poke(room_id)

    # -- the subscription task ------------------------------------------------------------

    async def _run_subscription(self, room_id: str) -> None:
        delete_failures = 0
        try:
            while True:
                changed = self._changed.setdefault(room_id, trio.Event())
                sub = self.subscriptions[room_id]
                action, wake = subs.plan(sub, self.clock_ms())
                if action is None:
                    if wake is None:
                        if sub.state in (SubState.DORMANT, SubState.FAILED, SubState.ENDED):
                            return  # a later peek starts a new task
                        await changed.wait()
                    else:
                        with trio.move_on_after(max(0.0, (wake - self.clock_ms()) / 1000)):
                            await changed.wait()
                    continue
                if action is Action.RENEW:
                    await self._renew(room_id)
                elif action is Action.STOP:
                    async with self._lock(room_id):
                        await self._save(subs.stopping(self.subscriptions[room_id]))
                elif action is Action.DELETE:
                    if await self._delete_pending(room_id):
                        delete_failures = 0
                    else:
                        delete_failures += 1
                        delay = backoff_delay(delete_failures, *DELETE_BACKOFF_S, random.random())
                        async with self._lock(room_id):
                            retry_at = self.clock_ms() + int(delay * 1000)
                            await self._save(
                                subs.delete_failed(self.subscriptions[room_id], retry_at)
                            )
                elif action is Action.PEEK:
                    async with self._lock(room_id):
                        sub = self.subscriptions[room_id]
                        if subs.plan(sub, self.clock_ms())[0] is not Action.PEEK:
                            continue
                        try:
                            sub = await self._establish(sub, gap=sub.room_version is not None)
                        except PeekError as e:
                            # _establish saved the failed attempt (its old peek queued for
                            # DELETE); the room waits out its back-off in plan(), which a
                            # poke cannot cut short.
                            sub = self.subscriptions[room_id]
                            if e.status == 403:
                                sub = subs.ended(sub, e.error)
                                await self._end_device_peeks(room_id)
                            else:
                                sub = subs.repeek_failed(
                                    sub,
                                    now_ms=self.clock_ms(),
                                    draw=random.random(),
                                    not_before_ms=_retry_after(self.clock_ms(), e),
                                )
                            log.warning(
                                "re-peek of %s failed (%d in a row): %s",
                                room_id,
                                sub.failures,
                                e.error,
                            )
                        await self._save(sub)
        finally:
            self._tasks.discard(room_id)

    async def _establish(self, sub: Subscription, *, gap: bool) -> Subscription:
        """PUT a new peek through the candidates; store the validated snapshot.

        Raises:
            PeekError: every candidate failed (the summary names each and why).
        """
        room_id = sub.room_id
        sub = subs.replace_peek(sub)
        failures: list[PeekAttemptFailure] = []
        for server in sub.candidates:
            skipped = self.unsupported.skip(server, self.clock_ms())
            if skipped is not None:
                failures.append(skipped)  # still named in the device's error
                continue
            for attempt in (1, 2):
                peek_id = new_peek_id()
                try:
                    body = await self.client.put_json(
                        server,
                        _peek_path(room_id, peek_id),
                        {},
                        timeout=PEEK_PUT_TIMEOUT_S,
                        query={"ver": SUPPORTED_VERSIONS},
                    )
                except Exception as error:
                    failure = classify_peek_error(server, error)
                    wait = failure.retry_after_ms
                    if (
                        failure.kind is PeekFailureKind.RATE_LIMITED
                        and attempt == 1
                        and wait is not None
                        and wait <= RATE_LIMIT_WAIT_MAX_MS
                    ):
                        await trio.sleep(wait / 1000)
                        continue
                    failures.append(failure)
                    self.unsupported.record(failure, self.clock_ms())
                    break
                try:
                    validated = await self._validate(body, room_id)
                except InvalidPeekResponse as e:
                    log.warning("invalid peek response from %s for %s: %s", server, room_id, e)
                    failures.append(classify_peek_error(server, e))
                    sub = replace(sub, pending_deletes=(*sub.pending_deletes, (server, peek_id)))
                    break
                now = self.clock_ms()
                sub = subs.started(
                    sub,
                    server=server,
                    peek_id=peek_id,
                    room_version=validated.room_version,
                    remote_interval_ms=validated.renewal_interval_ms,
                    now_ms=now,
                    max_renewal_ms=self.settings.renewal_max_ms,
                )
                await self._store_snapshot(sub, validated, gap=gap)
                log.info(
                    "peeking %s through %s (peek %s, interval %d ms%s)",
                    room_id,
                    server,
                    peek_id,
                    validated.renewal_interval_ms,
                    ", after a gap" if gap else "",
                )
                return sub
            if failures and failures[-1].kind is PeekFailureKind.FORBIDDEN:
                break
        summary = summarize_failures(room_id, failures)
        if failures and all(f.kind is PeekFailureKind.RATE_LIMITED for f in failures):
            wait = max((f.retry_after_ms or 1000) for f in failures)
            sub = subs.start_failed(sub, summary.error)
            await self._save(sub)
            raise PeekError(429, "M_LIMIT_EXCEEDED", summary.error, retry_after_ms=wait)
        if summary.status == 403:
            sub = subs.ended(sub, summary.error)
        else:
            sub = subs.start_failed(sub, summary.error)
        await self._save(sub)
        self._poke(room_id)
        raise PeekError(summary.status, summary.errcode, summary.error)

    async def _fetch_signer_keys(self, pdus: Iterable[Mapping[str, Any]], version: str) -> None:
        try:
            rules = room_version(version)
        except UnknownRoomVersion:
            return
        for problem in await self.keyring.fetch_signer_keys(pdus, rules):
            log.info("keys for PDUs: %s", problem)

    async def _validate(self, body: Any, room_id: str) -> ValidatedPeek:
        if not isinstance(body, dict):
            raise InvalidPeekResponse("response is not a JSON object")
        version = response_room_version(body)
        await self._fetch_signer_keys(peek_response_pdus(body), version)
        return validate_peek_response(
            body, room_id=room_id, supported_versions=SUPPORTED_VERSIONS, keys=self.keyring.lookup
        )

    async def _store_snapshot(
        self, sub: Subscription, validated: ValidatedPeek, *, gap: bool
    ) -> None:
        """Store a new snapshot with the newest events before its latest event, fetched
        from the peeked server (:func:`_first_view`): the first sync then shows up to the
        timeline limit of them, as on a join; a gap precedes them when older history is
        missing."""
        found = await self._first_view(sub, validated)
        now = self.clock_ms()

        def write(tx: WriteTransaction) -> None:
            tx.store_snapshot(
                sub.room_id,
                events=validated.events,
                redacted=validated.redacted,
                state=validated.state,
                latest_event_id=validated.latest_event_id,
                gap=gap,
                now_ms=now,
                history=None if found is None else found[0],
                history_complete=found is not None and found[1],
            )
            tx.save_subscription(sub)

        await self.store.write(write)
        self.subscriptions[sub.room_id] = sub
        self.on_room_change(sub.room_id)

    async def _first_view(
        self, sub: Subscription, validated: ValidatedPeek
    ) -> tuple[list[tuple[str, dict[str, Any], bool]], bool] | None:
        """Up to ``history.FIRST_VIEW_LIMIT`` events before the snapshot's latest event from
        the peeked server's ``/backfill`` (bounded by ``history.FIRST_VIEW_TIMEOUT_S``),
        oldest first, without those a client already sees, and whether nothing is missing
        before them. ``None`` when the latest event is already held (nothing to add) or
        there is no server or room version; a failed fetch gives ``([], False)`` (a gap)."""
        latest = validated.latest_event_id
        if sub.server is None or sub.room_version is None:
            return None
        if await self.store.read(lambda tx: tx.held_event_ids(sub.room_id, [latest])):
            return None
        fetched: list[history.Backfilled] | None = None
        # One deadline for the whole fetch, its signers' keys included: the room's lock is
        # held meanwhile, and /send of the room waits for it (_wait_for_setups).
        with trio.move_on_after(history.FIRST_VIEW_TIMEOUT_S):
            try:
                fetched = await history.fetch_backfill(
                    self.client,
                    self.keyring,
                    server=sub.server,
                    room_id=sub.room_id,
                    version=sub.room_version,
                    anchors=[latest],
                    limit=history.FIRST_VIEW_LIMIT + 1,  # /backfill includes the anchor
                    timeout=history.FIRST_VIEW_TIMEOUT_S,
                )
            except history.BackfillFailed as e:
                log.info("no history before the latest event of %s (%s): a gap", sub.room_id, e)
                return [], False
        if fetched is None:
            log.info("no history before the latest event of %s (timed out): a gap", sub.room_id)
            return [], False
        ids = [e.event_id for e in fetched]
        held = await self.store.read(lambda tx: tx.held_event_ids(sub.room_id, ids))
        new, complete = history.new_history(fetched, anchors=[latest], held=held)
        return [(e.event_id, e.pdu, e.redacted) for e in reversed(new)], complete

    async def _renew(self, room_id: str) -> None:
        sub = self.subscriptions[room_id]
        assert sub.server is not None and sub.peek_id is not None
        server, peek_id = sub.server, sub.peek_id
        try:
            body = await self.client.put_json(
                server, _peek_path(room_id, peek_id), {}, query={"ver": SUPPORTED_VERSIONS}
            )
        except Exception as error:
            refused = isinstance(error, RemoteError) and error.status in (400, 403, 404)
            log.warning(
                "renewal of %s through %s failed%s: %s",
                room_id,
                server,
                " (peek lapsed)" if refused else "",
                error,
            )
            async with self._lock(room_id):
                current = self.subscriptions[room_id]
                if current.peek_id == peek_id:
                    await self._save(
                        subs.renewal_failed(
                            current, refused=refused, now_ms=self.clock_ms(), draw=random.random()
                        )
                    )
            return
        now = self.clock_ms()
        if is_empty_renewal(body):
            async with self._lock(room_id):
                current = self.subscriptions[room_id]
                if current.peek_id == peek_id:
                    await self._save(
                        subs.renewed(
                            current, now_ms=now, max_renewal_ms=self.settings.renewal_max_ms
                        )
                    )
                    log.debug("renewed peek %s of %s", peek_id, room_id)
            return
        try:
            validated = await self._validate(body, room_id)
        except InvalidPeekResponse as e:
            log.warning("invalid renewal reply from %s for %s: %s", server, room_id, e)
            async with self._lock(room_id):
                current = self.subscriptions[room_id]
                if current.peek_id == peek_id:
                    await self._save(
                        subs.renewal_failed(current, refused=True, now_ms=now, draw=random.random())
                    )
            return
        # A full reply to a live renewal (Dendrite always answers so) is not a lapse: what
        # lies between our newest events and its latest event is fetched, not skipped.
        fill = await self._renewal_fill(server, room_id, validated)
        async with self._lock(room_id):
            current = self.subscriptions[room_id]
            if current.peek_id != peek_id:
                return
            renewed = subs.renewed(
                current,
                now_ms=now,
                max_renewal_ms=self.settings.renewal_max_ms,
                remote_interval_ms=validated.renewal_interval_ms,
            )
            changed, gap = await self._store_renewal(renewed, validated, fill)
        if changed:
            self.on_room_change(room_id)
        if gap:
            log.info("renewal reply for %s shows events we cannot fetch: recorded a gap", room_id)

    async def _renewal_fill(
        self, server: str, room_id: str, validated: ValidatedPeek
    ) -> list[tuple[str, dict[str, Any], bool]]:
        """The events between our newest stored ones and a full renewal reply's latest
        event (``get_missing_events`` from ``server``); none when we hold that event."""
        latest = validated.latest_event_id
        prevs = event_refs(validated.events[latest].get("prev_events"))
        known = await self.store.read(lambda tx: tx.known_event_ids(event_ids=[latest, *prevs]))
        if latest in known or all(p in known for p in prevs):
            return []
        fill = await self._fetch_missing(
            server, room_id, [latest], room_version(validated.room_version), known=known
        )
        log.info(
            "renewal reply for %s is ahead of us: fetched %d events before its latest event",
            room_id,
            len(fill),
        )
        return fill

    async def _store_renewal(
        self,
        sub: Subscription,
        validated: ValidatedPeek,
        fill: list[tuple[str, dict[str, Any], bool]],
    ) -> tuple[bool, bool]:
        """Store a full renewal reply: the fetched events and its latest event appended in
        DAG order (a gap only before what could not be fetched), then its state. A reply
        whose latest event we hold already changes nothing but the state, and that only
        when that event is still our newest. Returns whether the room changed and whether a
        gap was recorded."""
        now = self.clock_ms()
        room_id, latest = sub.room_id, validated.latest_event_id

        def write(tx: WriteTransaction) -> tuple[bool, bool]:
            tx.save_subscription(sub)
            if tx.known_event_ids([latest]):
                newest = tx.newest_event_ids(room_id, 1) == [latest]
                if newest and tx.current_state_ids(room_id) != validated.state:
                    tx.replace_state(room_id, validated.state)
                    return True, False
                return False, False
            _, gap = tx.append_in_dag_order(
                room_id,
                [*fill, (latest, validated.events[latest], latest in validated.redacted)],
                now_ms=now,
            )
            tx.store_snapshot(
                room_id,
                events=validated.events,
                redacted=validated.redacted,
                state=validated.state,
                latest_event_id=latest,
                gap=False,
                now_ms=now,
            )
            return True, gap

        changed, gap = await self.store.write(write)
        self.subscriptions[room_id] = sub
        return changed, gap

    async def _delete_pending(self, room_id: str) -> bool:
        """DELETE every pending peek; True when none is left."""
        sub = self.subscriptions[room_id]
        for server, peek_id in sub.pending_deletes:
            try:
                await self.client.request("DELETE", server, _peek_path(room_id, peek_id))
            except FederationError as e:
                if not (isinstance(e, RemoteError) and e.status == 404):  # 404: already gone
                    log.info(
                        "DELETE of peek %s of %s at %s failed: %s; will retry",
                        peek_id,
                        room_id,
                        server,
                        e,
                    )
                    continue
            async with self._lock(room_id):
                await self._save(subs.deleted(self.subscriptions[room_id], server, peek_id))
            log.info("stopped peek %s of %s at %s", peek_id, room_id, server)
        return not self.subscriptions[room_id].pending_deletes

    async def _end_device_peeks(self, room_id: str) -> None:
        now = self.clock_ms()
        ended = await self.store.write(lambda tx: tx.end_room_peeks(room_id, now))
        if ended:
            log.info("ended %d device peeks of %s", ended, room_id)
        self.on_room_change(room_id)

    # -- /send ingest ----------------------------------------------------------------------

    async def ingest(self, origin: str, txn_id: str, body: Any) -> dict[str, Any]:
        """Handle ``PUT /_matrix/federation/v1/send/{txnId}`` from ``origin`` (verified).

        Idempotent per (origin, txn_id): a replay gets the stored answer and stores nothing.
        Answers ``{"pdus": {event_id: {} | {"error": reason}}}`` once everything accepted
        is stored.

        Raises:
            PeekError: 400 for a malformed transaction (not an object, > 50 PDUs, > 100 EDUs).
        """
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("pdus", []), list)
            or not isinstance(body.get("edus", []), list)
        ):
            raise PeekError(400, "M_BAD_JSON", "a transaction needs pdus (and edus) lists")
        pdus, edus = body.get("pdus", []), body.get("edus", [])
        if len(pdus) > MAX_PDUS or len(edus) > MAX_EDUS:
            raise PeekError(
                400,
                "M_BAD_JSON",
                f"a transaction may hold at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs",
            )
        self.client.heard_from(origin)  # it is up: fetching what its events lack may go on
        key = (origin, txn_id)
        lock = self._txn_locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                stored = await self.store.read(lambda tx: tx.txn_response(origin, txn_id))
                if stored is not None:
                    return stored
                return await self._ingest_locked(origin, txn_id, pdus, edus)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._txn_locks.pop(key, None)

    async def _ingest_locked(
        self, origin: str, txn_id: str, pdus: list[Any], edus: list[Any]
    ) -> dict[str, Any]:
        results: dict[str, dict[str, str]] = {}
        by_room: dict[str, list[dict[str, Any]]] = {}
        await self._wait_for_setups(pdus)
        for pdu in pdus:
            room_id = pdu.get("room_id") if isinstance(pdu, dict) else None
            sub = self.subscriptions.get(room_id) if isinstance(room_id, str) else None
            if sub is None or not sub.accepts_events:
                event_id = _best_effort_event_id(pdu)
                if event_id is not None:
                    results[event_id] = {"error": "this server is not peeking that room"}
                continue
            assert isinstance(room_id, str)
            by_room.setdefault(room_id, []).append(pdu)

        unpeekable: dict[str, str] = {}
        # Rooms stored while others of the transaction are still pending are shown at once;
        # the rest wake their devices after the transaction's record is written, so that
        # this last write does not wait behind the woken long-polls.
        pending = len(by_room)
        woken_later: set[str] = set()

        async def one_room(room_id: str, room_pdus: list[dict[str, Any]]) -> None:
            nonlocal pending
            # Rooms are independent: one waiting for get_missing_events holds up no other.
            lock = self._ingest_locks.setdefault(room_id, trio.Lock())
            async with lock:
                changed = await self._ingest_room(origin, room_id, room_pdus, results, unpeekable)
            pending -= 1
            if changed and pending:
                self.on_room_change(room_id)
            elif changed:
                woken_later.add(room_id)

        async with trio.open_nursery() as nursery:
            for room_id, room_pdus in by_room.items():
                nursery.start_soon(one_room, room_id, room_pdus)
        ephemeral = self._accepted_ephemeral(origin, edus)
        response = {"pdus": results}
        now = self.clock_ms()

        def write(tx: WriteTransaction) -> tuple[set[str], list[tuple[str, str, int]]]:
            edu_rooms: set[str] = set()
            typing: list[tuple[str, str, int]] = []
            for room_id, edu_type, user_id, content, relayed in ephemeral:
                # A relayed EDU counts only for a user joined to the room, as the state
                # stands after this transaction's PDUs.
                if relayed and tx.membership(room_id, user_id) != "join":
                    log.debug("ignored %s of %s relayed by %s", edu_type, user_id, origin)
                    continue
                for _, position, is_typing in tx.save_ephemeral(room_id, edu_type, content, now):
                    edu_rooms.add(room_id)
                    if is_typing:
                        typing.append((room_id, user_id, position))
            tx.save_txn(origin, txn_id, response, now)
            return edu_rooms, typing

        edu_rooms, typing = await self.store.write(write)
        self._typing_started(typing, now)
        for room_id in edu_rooms | woken_later:
            self.on_room_change(room_id)
        for room_id, reason in unpeekable.items():
            async with self._lock(room_id):
                await self._save(subs.ended(self.subscriptions[room_id], reason))
            await self._end_device_peeks(room_id)
            self._poke(room_id)
            log.info("%s is no longer peekable (%s): peeks ended", room_id, reason)
        return response

    async def _wait_for_setups(self, pdus: list[Any]) -> None:
        """Wait (at most :data:`SETUP_WAIT_S`) for the peeks being set up of the rooms these
        PDUs belong to. A target pushes a room's events as soon as it has answered the
        peek's PUT, while peekproxy is still checking the answer and fetching the first
        view; refused, such an event would not be sent again (until a later event brings it
        with ``get_missing_events``, or never in a quiet room)."""
        rooms = {
            p["room_id"] for p in pdus if isinstance(p, dict) and isinstance(p.get("room_id"), str)
        }
        for room_id in rooms:
            lock = self._room_locks.get(room_id)
            sub = self.subscriptions.get(room_id)
            if lock is None or not lock.locked() or (sub is not None and sub.accepts_events):
                continue
            with trio.move_on_after(SETUP_WAIT_S):
                async with lock:  # the set-up holds the room's lock until it is stored
                    pass

    def _accepted_ephemeral(
        self, origin: str, edus: list[Any]
    ) -> list[tuple[str, str, str, dict[str, Any], bool]]:
        """The per-user ``m.typing`` / ``m.receipt`` contents of a transaction's EDUs that
        peekproxy keeps: (room ID, EDU type, user ID, content, relayed).

        A server speaks for its own users; the room's current peek target (the server its
        subscription peeks through) also relays EDUs of other servers' users, as it relays
        their events (MSC2444: the target sends what it sees "as if it were joined") —
        ``relayed`` ones count only for users joined to the room (checked when stored).
        Everything else is ignored: rooms not peeked, other servers' users from a server
        that is not the target, malformed EDUs, other EDU types.
        """
        kept = []
        for edu in edus:
            for room_id, edu_type, user_id, content in _ephemeral(edu):
                sub = self.subscriptions.get(room_id)
                if sub is None or not sub.accepts_events:
                    continue
                if user_id.partition(":")[2] == origin:
                    kept.append((room_id, edu_type, user_id, content, False))
                elif origin == sub.server:
                    kept.append((room_id, edu_type, user_id, content, True))
        return kept

    def _typing_started(self, typing: list[tuple[str, str, int]], now_ms: int) -> None:
        """Each (room, user, stream position) of a stored ``typing: true`` ends after
        ``TYPING_TIMEOUT_MS`` unless a newer ``m.typing`` of the user replaced it."""
        if not typing:
            return
        for room_id, user_id, position in typing:
            heapq.heappush(
                self._typing_heap, (now_ms + TYPING_TIMEOUT_MS, room_id, user_id, position)
            )
        self._typing_changed.set()
        self._typing_changed = trio.Event()

    async def _expire_typing(self) -> None:
        """Store ``typing: false`` for each user whose typing timed out (their ``m.typing``
        row was not replaced since), so that syncs show them stopping."""
        heap = self._typing_heap
        while True:
            now = self.clock_ms()
            due = []
            while heap and heap[0][0] <= now:
                due.append(heapq.heappop(heap))
            if due:

                def expire(
                    tx: WriteTransaction, due: list[tuple[int, str, str, int]] = due, now: int = now
                ) -> set[str]:
                    return {r for _, r, u, p in due if tx.stop_typing(r, u, p, now)}

                for room_id in await self.store.write(expire):
                    self.on_room_change(room_id)
                continue
            changed = self._typing_changed
            if not heap:
                await changed.wait()
            else:
                with trio.move_on_after(max(0.0, (heap[0][0] - now) / 1000)):
                    await changed.wait()

    async def _ingest_room(
        self,
        origin: str,
        room_id: str,
        room_pdus: list[dict[str, Any]],
        results: dict[str, dict[str, str]],
        unpeekable: dict[str, str],
    ) -> bool:
        """Check one room's PDUs of a transaction, fetch the ``prev_events`` we lack from
        ``origin``, and store them in DAG order (a gap before what could not be fetched).
        Returns whether anything was stored (the caller wakes the room's syncs)."""
        sub = self.subscriptions[room_id]
        assert sub.room_version is not None
        rules = room_version(sub.room_version)
        await self._fetch_signer_keys(room_pdus, sub.room_version)
        refs = [ref for p in room_pdus for ref in event_refs(p.get("prev_events"))]
        known = await self.store.read(lambda tx: tx.known_event_ids(event_ids=refs))
        batch: list[tuple[str, dict[str, Any], bool]] = []
        for pdu in room_pdus:
            verdict = check_pdu(pdu, rules, self.keyring.lookup)
            event_id = verdict.event_id
            if verdict.outcome == "reject" or verdict.pdu is None or event_id is None:
                if event_id is not None:
                    results[event_id] = {"error": verdict.reason}
                log.info("rejected PDU %s from %s: %s", event_id, origin, verdict.reason)
                continue
            batch.append((event_id, verdict.pdu, verdict.outcome == "redact"))
            known.add(event_id)
            results[event_id] = {}
            reason = _unpeekable_reason(verdict.pdu)
            if reason:
                unpeekable[room_id] = reason
        lacking = [
            event_id
            for event_id, pdu, _ in batch
            if any(p not in known for p in event_refs(pdu.get("prev_events")))
        ]
        fetched = []
        if lacking:
            fetched = await self._fetch_missing(origin, room_id, lacking, rules, known=known)
        now = self.clock_ms()
        await self.store.write(
            lambda tx: tx.append_in_dag_order(room_id, [*fetched, *batch], now_ms=now)
        )
        return bool(batch or fetched)

    async def _fetch_missing(
        self,
        server: str,
        room_id: str,
        latest: list[str],
        rules: Any,
        *,
        known: set[str],
    ) -> list[tuple[str, dict[str, Any], bool]]:
        """Fetch the ancestors of ``latest`` that are not in ``known`` from ``server``
        (SSAPI ``POST /get_missing_events``, :data:`MISSING_EVENTS_LIMIT` a round, again
        from the oldest ones found while their ``prev_events`` are unknown): at most
        :data:`MISSING_EVENTS_MAX` events within :data:`MISSING_EVENTS_TIMEOUT_S` seconds.
        Returns (event ID, PDU, redacted) of the verified ones, unordered; a failure
        returns what was found so far."""
        earliest = await self.store.read(lambda tx: tx.newest_event_ids(room_id, 10))
        known = set(known)
        found: dict[str, tuple[str, dict[str, Any], bool]] = {}
        frontier = list(latest)
        path = f"/_matrix/federation/v1/get_missing_events/{path_segment(room_id)}"
        with trio.move_on_after(MISSING_EVENTS_TIMEOUT_S) as scope:
            while frontier and len(found) < MISSING_EVENTS_MAX:
                try:
                    answer = await self.client.post_json(
                        server,
                        path,
                        {
                            "earliest_events": earliest,
                            "latest_events": frontier,
                            "limit": min(MISSING_EVENTS_LIMIT, MISSING_EVENTS_MAX - len(found)),
                            "min_depth": 0,
                        },
                        timeout=MISSING_EVENTS_TIMEOUT_S,
                    )
                except FederationError as e:
                    log.info("could not fetch events missing in %s from %s: %s", room_id, server, e)
                    break
                events = answer.get("events") if isinstance(answer, dict) else None
                if not isinstance(events, list):
                    break
                await self._fetch_signer_keys(events, rules.identifier)
                new = []
                for pdu in events:
                    verdict = check_pdu(pdu, rules, self.keyring.lookup)
                    if (
                        verdict.outcome == "reject"
                        or verdict.pdu is None
                        or verdict.event_id is None
                    ):
                        continue
                    if verdict.pdu.get("room_id") != room_id or verdict.event_id in known:
                        continue
                    if verdict.event_id not in found:
                        found[verdict.event_id] = (
                            verdict.event_id,
                            verdict.pdu,
                            verdict.outcome == "redact",
                        )
                        new.append(verdict.event_id)
                if not new:
                    break
                # Go on from the events found whose parents are still neither held nor found.
                refs = {p for e in new for p in event_refs(found[e][1].get("prev_events"))}
                refs -= found.keys() | known
                known |= await self.store.read(
                    lambda tx: tx.known_event_ids(
                        event_ids=refs,  # noqa: B023
                    )
                )
                frontier = [
                    e
                    for e in new
                    if any(
                        p not in known and p not in found
                        for p in event_refs(found[e][1].get("prev_events"))
                    )
                ]
        if scope.cancelled_caught:
            log.info("fetching events missing in %s from %s timed out", room_id, server)
        return list(found.values())


def _retry_after(now_ms: int, error: PeekError) -> int | None:
    """When a failed peek may be tried again at the earliest (ms): after the
    ``retry_after_ms`` of a 429, else ``None``."""
    wait = error.extra.get("retry_after_ms")
    return now_ms + wait if isinstance(wait, int) else None


def _best_effort_event_id(pdu: Any) -> str | None:
    """The ID of a PDU of a room we do not know the version of: its ``event_id`` field
    (v1/v2), else the reference hash under the current default room version's rules."""
    if not isinstance(pdu, dict):
        return None
    if isinstance(pdu.get("event_id"), str):
        return str(pdu["event_id"])
    try:
        return compute_event_id(pdu, room_version("12"))
    except Exception:
        return None


def _unpeekable_reason(pdu: Mapping[str, Any]) -> str | None:
    """Decision 10: a state event that ends peeking of its room."""
    if pdu.get("state_key") != "":
        return None
    content = pdu.get("content") if isinstance(pdu.get("content"), dict) else {}
    assert isinstance(content, dict)
    if (
        pdu.get("type") == "m.room.history_visibility"
        and content.get("history_visibility") != "world_readable"
    ):
        return f"history_visibility changed to {content.get('history_visibility')!r}"
    if pdu.get("type") == "m.room.encryption":
        return "encryption was enabled"
    return None


def _ephemeral(edu: Any) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(room ID, EDU type, user ID, content for that user alone) for each user an
    ``m.typing`` / ``m.receipt`` EDU speaks of (SSAPI §Typing Notifications, §Receipts);
    malformed parts and other EDUs give nothing. Content: ``m.typing`` ``{"room_id",
    "user_id", "typing": bool}``; ``m.receipt`` ``{receipt_type: {user_id: receipt}}``."""
    if not isinstance(edu, dict) or not isinstance(edu.get("content"), dict):
        return []
    kind, content = edu.get("edu_type"), edu["content"]

    def user(value: Any) -> bool:
        try:
            UserId.parse(value)
        except InvalidIdentifier:
            return False
        return True

    if kind == "m.typing":
        room_id, user_id, typing = (content.get(k) for k in ("room_id", "user_id", "typing"))
        if isinstance(room_id, str) and user(user_id) and isinstance(typing, bool):
            return [
                (room_id, kind, user_id, {"room_id": room_id, "user_id": user_id, "typing": typing})
            ]
        return []
    if kind == "m.receipt":
        found = []
        for room_id, by_type in content.items():
            if not (isinstance(room_id, str) and isinstance(by_type, dict)):
                continue
            for receipt_type, users in by_type.items():
                if not isinstance(users, dict):
                    continue
                for user_id, receipt in users.items():
                    if user(user_id) and isinstance(receipt, dict):
                        found.append((room_id, kind, user_id, {receipt_type: {user_id: receipt}}))
        return found
    return []
